"""SAE-latent steering on the refusal-token model: specificity of SAS vectors vs CAA, and alpha-0 identity.

Reads a fit run's SAE export and its feature-analysis vectors (``features/epoch*/seed*/vectors.*``: CAA,
SAS in latent space and SAS decoded) at the SAE's layer, steers benign prompts the shipped model never saw
(rows of the Alpaca *test* file; its fine-tuning read only the train file) with each category's vector and
counts the first token, for three interventions:

* ``latent``: :class:`~sae_refusal.steer.interventions.LatentSteering` (z <- z + alpha v_z, error term kept);
* ``sas_decoded``: the same direction added in the residual stream (``alpha * v_z @ W_dec / s``);
* ``caa``: the category's CAA vector (alpha in units of the CAA vector).

Also checks on the real model that latent steering at alpha 0 and with a zero vector gives bit-identical /
round-off-identical first-token logits. Prints progress and, last, one JSON line.

    python benchmarks/latent_steering_check.py --run /tmp/mainjob2/runs/default/tensorboard/version_0
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sae_refusal.features.vectors import SteeringVectors
from sae_refusal.llm.hooks import ResidualFn
from sae_refusal.llm.loading import LLMConfig, load_model_and_tokenizer
from sae_refusal.llm.refusal_tokens import RefusalVocabulary
from sae_refusal.sae.loading import load_sae
from sae_refusal.steer.interventions import LatentSteering, ResidualSteering
from sae_refusal.steer.scoring import first_token_decisions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="a fit run's log folder (holds sae/ and features/)")
    parser.add_argument("--seed", default="seed0")
    parser.add_argument("--adapter", default="checkpoints/refuse-smollm2")
    parser.add_argument("--data_root", default="../shared/data")
    parser.add_argument("--n", type=int, default=40, help="benign prompts")
    parser.add_argument("--alphas", default="1,4,16", help="latent / decoded alphas (comma-separated)")
    parser.add_argument("--caa_alphas", default="1,2", help="CAA alphas")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip_specificity", action="store_true", help="only the identity checks")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    epochs = sorted((run / "features").glob("epoch*"), key=lambda p: int(p.name[5:]))
    if not epochs:
        raise SystemExit(f"--run: {run} has no features/epoch*/ folder")
    vectors = SteeringVectors.load(epochs[-1] / args.seed)
    sae = load_sae(run / "sae" / args.seed).eval()
    layer = int(vectors.metadata["layer"])
    model, tokenizer = load_model_and_tokenizer(
        LLMConfig(name_or_path="smollm2", dtype="float32", adapter_path=args.adapter)
    )
    resolved = RefusalVocabulary().resolve(tokenizer)
    rows = json.loads((Path(args.data_root) / "benign" / "alpaca_harmless_test.json").read_text())
    texts = [r["instruction"] for r in rows[: args.n]]

    def decide(edit: ResidualFn | None) -> torch.Tensor:
        edits = None if edit is None else (lambda _rows: {layer: edit})
        return first_token_decisions(model, tokenizer, texts, resolved, edits=edits, batch_size=20).probs_NC

    start = time.perf_counter()
    with torch.no_grad():
        warm_up = decide(None)  # CPU kernels may pick another algorithm on the very first call
        plain = decide(None)
        zero_alpha = decide(LatentSteering(sae, vectors.vector(1, "sas"), alpha=0.0))
        zero_vector = decide(LatentSteering(sae, torch.zeros(sae.n_latents), alpha=5.0))
    identity = {
        "unsteered_repeat_bit_identical": bool(torch.equal(warm_up, plain)),
        "alpha0_bit_identical": bool(torch.equal(zero_alpha, plain)),
        "zero_vector_max_abs_diff": float((zero_vector - plain).abs().max()),
    }
    print(f"identity checks: {identity}", flush=True)
    results: dict[str, dict[str, list[float]]] = {}
    plans = [("latent", float(a)) for a in args.alphas.split(",")]
    plans += [("sas_decoded", float(a)) for a in args.alphas.split(",")]
    plans += [("caa", float(a)) for a in args.caa_alphas.split(",")]
    if args.skip_specificity:
        plans = []
    for mode, alpha in plans:
        spec = []
        for c in range(1, len(vectors.class_names)):
            if mode == "latent":
                edit: ResidualFn = LatentSteering(sae, vectors.vector(c, "sas"), alpha=alpha)
            elif mode == "sas_decoded":
                edit = ResidualSteering(vectors.vector(c, "sas_decoded"), alpha=alpha)
            else:
                edit = ResidualSteering(vectors.vector(c, "caa"), alpha=alpha)
            with torch.no_grad():
                pred = decide(edit).argmax(dim=1)
            spec.append(round(float((pred == c).float().mean()), 3))
        results.setdefault(mode, {})[str(alpha)] = spec
        print(f"{mode:12s} alpha {alpha:5g}: specificity per category {spec}", flush=True)
    record = {
        "layer": layer,
        "run": str(run),
        "seed": args.seed,
        "n_prompts": len(texts),
        "class_names": vectors.class_names[1:],
        "identity": identity,
        "specificity": results,
        "wall_s": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
