"""SAELens format: export with the input scale folded, import with SAELens' own semantics, named errors.

The reference formulas are written out here (SAELens 6's ``encode`` / ``decode`` for standard, topk and
jumprelu, and its BatchTopK training SAEs' batch top-k and ``save_inference_model`` threshold). The project's
BatchTopK / Matryoshka-BatchTopK SAEs are written as SAELens writes its own for inference (``jumprelu``, the
scalar threshold for every latent), a trainable JumpReLU one as ``jumprelu``. The ``interop`` tests check the
same against the real library when ``sae_lens`` is importable (``PYTHONPATH=/path/to/site pytest -m interop
...``; they skip with the reason otherwise).
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae_refusal.llm.config import SMOLLM2_HUB_ID
from sae_refusal.sae import ReLUSAE, SparseAutoencoder, TopKSAE, load_sae
from sae_refusal.sae.batchtopk import BatchTopKSAE, MatryoshkaBatchTopKSAE
from sae_refusal.sae.formats.saelens import (
    ADAPTER_FIELD,
    PROVENANCE_KEY,
    SAELENS_VERSION,
    SAELENS_WEIGHTS,
    is_saelens_folder,
    load_saelens,
    read_saelens_metadata,
    saelens_model_name,
    save_saelens,
)
from sae_refusal.sae.jumprelu import JumpReLUSAE
from sae_refusal.sae.jumprelu_train import TrainableJumpReLUSAE

D, F, K = 12, 40, 5
SCALE = 0.37
ATOL = 1e-5
#: SAELens' architectures that map onto the project's SAEs as they are.
ARCHS = ("topk", "standard", "jumprelu")
#: The project's SAEs with a SAELens form.
OURS = (*ARCHS, "batchtopk", "matryoshka_batchtopk", "jumprelu_trained")
#: The project's architecture -> (the SAELens architecture it is written as, the class it is read back as).
EXPORTED_AS: dict[str, tuple[str, type[SparseAutoencoder]]] = {
    "topk": ("topk", TopKSAE),
    "standard": ("standard", ReLUSAE),
    "jumprelu": ("jumprelu", JumpReLUSAE),
    "batchtopk": ("jumprelu", BatchTopKSAE),
    "matryoshka_batchtopk": ("jumprelu", MatryoshkaBatchTopKSAE),
    "jumprelu_trained": ("jumprelu", JumpReLUSAE),  # its inference form
}
PREFIXES = [4, 16, F]
THETA = 0.35  # a BatchTopK SAE's inference threshold (in the normalised space)
BATCHTOPK = ("batchtopk", "matryoshka_batchtopk")


def make_sae(arch: str, seed: int = 0) -> SparseAutoencoder:
    """A project SAE (eval mode) with perturbed weights, non-zero biases, positive thresholds, input scale
    0.37."""
    gen = torch.Generator().manual_seed(seed)
    sae: SparseAutoencoder
    if arch == "topk":
        sae = TopKSAE(D, F, K, generator=gen)
    elif arch == "standard":
        sae = ReLUSAE(D, F, init_decoder_norm=0.8, generator=gen)
    elif arch == "batchtopk":
        sae = BatchTopKSAE(D, F, K, aux_k=8, threshold_momentum=0.9, generator=gen)
    elif arch == "matryoshka_batchtopk":
        sae = MatryoshkaBatchTopKSAE(D, F, K, PREFIXES, aux_k=8, threshold_momentum=0.9, generator=gen)
    elif arch == "jumprelu_trained":
        sae = TrainableJumpReLUSAE(D, F, l0_coef=0.5, generator=gen)
    else:
        sae = JumpReLUSAE(D, F, generator=gen)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name == "threshold_F":
                p.copy_(0.2 + 0.6 * torch.rand(p.shape, generator=gen))
            elif name == "log_threshold_F":
                p.copy_((0.2 + 0.6 * torch.rand(p.shape, generator=gen)).log())
            else:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
        if isinstance(sae, BatchTopKSAE):
            sae.threshold.fill_(THETA)
    sae.set_input_scale(SCALE)
    return sae.eval()


def pre_and_threshold(sae: SparseAutoencoder, x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A threshold SAE's pre-activations of raw ``x_BD`` and its threshold(s), written out."""
    xs = x_BD * SCALE
    if isinstance(sae, BatchTopKSAE):
        return (xs - sae.b_dec_D) @ sae.W_enc_FD.T + sae.b_enc_F, sae.threshold
    assert isinstance(sae, JumpReLUSAE)
    return (xs - sae.b_dec_D) @ sae.W_enc_DF + sae.b_enc_F, sae.threshold_F


def raw_inputs(seed: int = 1, rows: int = 9) -> torch.Tensor:
    """Raw activations (norm ~ sqrt(D) / SCALE, as the scale expects)."""
    return torch.randn(rows, D, generator=torch.Generator().manual_seed(seed)) / SCALE


def saelens_reference(
    folder: Path, x_BD: torch.Tensor, *, inference: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAELens 6's codes and reconstruction of ``x_BD``, computed from the files as its classes would.

    A BatchTopK training folder: its training SAE's batch top-k, or (``inference``) what its
    ``save_inference_model`` computes, ``ReLU(pre) * (pre > topk_threshold)``.
    """
    cfg = json.loads((folder / "cfg.json").read_text())
    t = {k: v.double() for k, v in load_file(str(folder / SAELENS_WEIGHTS)).items()}
    x = x_BD.double()
    sae_in = x - t["b_dec"] * bool(cfg.get("apply_b_dec_to_input", True))
    pre = sae_in @ t["W_enc"] + t["b_enc"]
    norm_F = t["W_dec"].norm(dim=-1)
    if cfg["architecture"] in BATCHTOPK:
        rescale = cfg.get("rescale_acts_by_decoder_norm", True)  # TopKTrainingSAEConfig's default
    else:
        rescale = cfg["architecture"] == "topk" and cfg.get("rescale_acts_by_decoder_norm", False)
    if rescale:
        pre = pre * norm_F
    if cfg["architecture"] in BATCHTOPK and inference:
        z = pre.relu() * (pre > t["topk_threshold"])
    elif cfg["architecture"] in BATCHTOPK:  # its BatchTopK: the int(k * B) largest of ReLU(pre), flattened
        flat = pre.relu().flatten()
        kept = flat.topk(int(cfg["k"] * pre.shape[0]))
        z = torch.zeros_like(flat).scatter(-1, kept.indices, kept.values).reshape(pre.shape)
    elif cfg["architecture"] == "topk":
        values, indices = pre.topk(cfg["k"], dim=-1)
        z = torch.zeros_like(pre).scatter(-1, indices, values.relu())
    elif cfg["architecture"] == "jumprelu":
        z = pre.relu() * (pre > t["threshold"])
    else:
        z = pre.relu()
    recon = (z / norm_F if rescale else z) @ t["W_dec"] + t["b_dec"]
    return z.float(), recon.float()


def assert_same_outputs(a: SparseAutoencoder, b: SparseAutoencoder, x_BD: torch.Tensor) -> None:
    """Same codes, decode and forward reconstruction on raw inputs."""
    with torch.no_grad():
        za, zb = a.encode(x_BD), b.encode(x_BD)
        torch.testing.assert_close(za, zb, atol=ATOL, rtol=0)
        torch.testing.assert_close(a.decode(za), b.decode(zb), atol=ATOL, rtol=0)
        torch.testing.assert_close(a(x_BD).recon_BD, b(x_BD).recon_BD, atol=ATOL, rtol=0)


# --------------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("arch", OURS)
def test_export_import_round_trip_same_codes_and_reconstruction(arch: str, tmp_path: Path) -> None:
    sae, x = make_sae(arch), raw_inputs()
    folder = save_saelens(sae, tmp_path / arch, metadata={"model": "org/m", "layer": 3, "seed": 7})
    assert is_saelens_folder(folder)
    loaded = load_sae(folder)  # dispatches to load_saelens
    assert type(loaded) is EXPORTED_AS[arch][1] and not loaded.training
    if isinstance(sae, BatchTopKSAE):  # the project's class comes back, config and threshold as they were
        assert loaded.config() == sae.config() and isinstance(loaded, BatchTopKSAE)
        assert loaded.threshold.item() == pytest.approx(THETA)
    assert float(loaded.input_scale) == 1.0
    z = sae.encode(x)
    assert (z > 0).any() and (z == 0).any()  # some latents fire, some do not
    if isinstance(sae, (JumpReLUSAE, BatchTopKSAE)):  # the thresholds cut some positive pre-activations
        pre, threshold = pre_and_threshold(sae, x)
        assert ((pre > 0) & (pre <= threshold)).any()
    assert_same_outputs(sae, loaded, x)
    # and the files compute, with SAELens' formulas, what the project's SAE computes on raw inputs
    z_ref, recon_ref = saelens_reference(folder, x)
    torch.testing.assert_close(z_ref, z, atol=ATOL, rtol=0)
    torch.testing.assert_close(recon_ref, sae(x).recon_BD.detach(), atol=ATOL, rtol=0)


def test_written_layout_folds_the_scale(tmp_path: Path) -> None:
    sae = cast(JumpReLUSAE, make_sae("jumprelu"))
    folder = save_saelens(sae, tmp_path / "j", metadata={"model": "org/m", "layer": 21, "seed": 3})
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and (cfg["d_in"], cfg["d_sae"]) == (D, F)
    assert cfg["normalize_activations"] == "none" and cfg["apply_b_dec_to_input"] is True
    assert cfg["dtype"] == "float32" and cfg["reshape_activations"] == "none"
    meta = cfg["metadata"]
    assert meta["model_name"] == "org/m" and meta["hook_name"] == "blocks.21.hook_resid_post"
    assert meta["sae_lens_version"] == SAELENS_VERSION
    prov = meta[PROVENANCE_KEY]
    assert prov["seed"] == 3 and prov["layer"] == 21 and prov["architecture"] == "jumprelu"
    assert prov["input_scale_folded"] == pytest.approx(SCALE)
    t = load_file(str(folder / SAELENS_WEIGHTS))
    assert sorted(t) == ["W_dec", "W_enc", "b_dec", "b_enc", "threshold"]
    assert all(v.dtype == torch.float32 for v in t.values())
    torch.testing.assert_close(t["W_enc"], sae.W_enc_DF.detach() * SCALE)
    torch.testing.assert_close(t["W_dec"], sae.W_dec_FD.detach() / SCALE)
    torch.testing.assert_close(t["b_dec"], sae.b_dec_D.detach() / SCALE)
    torch.testing.assert_close(t["b_enc"], sae.b_enc_F.detach())
    torch.testing.assert_close(t["threshold"], sae.threshold_F.detach())
    topk_cfg = json.loads((save_saelens(make_sae("topk"), tmp_path / "t") / "cfg.json").read_text())
    assert topk_cfg["k"] == K and topk_cfg["rescale_acts_by_decoder_norm"] is False
    assert topk_cfg["architecture"] == "topk"
    relu_cfg = json.loads((save_saelens(make_sae("standard"), tmp_path / "r") / "cfg.json").read_text())
    assert relu_cfg["architecture"] == "standard" and "k" not in relu_cfg


@pytest.mark.parametrize("arch", BATCHTOPK)
def test_batchtopk_is_written_as_saelens_writes_its_inference_sae(arch: str, tmp_path: Path) -> None:
    """As SAELens' save_inference_model of a BatchTopK training SAE: jumprelu, the threshold per latent."""
    sae = cast(BatchTopKSAE, make_sae(arch))
    folder = save_saelens(sae, tmp_path / arch, metadata={"model": "org/m", "layer": 21, "seed": 3})
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and "k" not in cfg and (cfg["d_in"], cfg["d_sae"]) == (D, F)
    meta = cfg["metadata"]
    assert meta["training_architecture"] == arch
    details = {"k": K, "topk_threshold_lr": pytest.approx(1 - 0.9)}  # theta <- (1 - lr) theta + lr m
    if arch == "matryoshka_batchtopk":
        details["matryoshka_widths"] = PREFIXES
    assert meta["training_architecture_details"] == details
    prov = meta[PROVENANCE_KEY]
    assert prov["architecture"] == arch and prov["sae_config"] == sae.config()
    t = load_file(str(folder / SAELENS_WEIGHTS))
    assert sorted(t) == ["W_dec", "W_enc", "b_dec", "b_enc", "threshold"]
    torch.testing.assert_close(t["threshold"], torch.full((F,), THETA))  # the scalar, unchanged by the fold
    torch.testing.assert_close(t["W_enc"], sae.W_enc_FD.detach().T * SCALE)
    torch.testing.assert_close(t["W_dec"], sae.W_dec_FD.detach() / SCALE)
    torch.testing.assert_close(t["b_dec"], sae.b_dec_D.detach() / SCALE)
    torch.testing.assert_close(t["b_enc"], sae.b_enc_F.detach())
    # SAELens' jumprelu formulas on the files give the project's eval-mode codes: ReLU(pre) * (pre > theta)
    x = raw_inputs()
    pre, _ = pre_and_threshold(sae, x)
    z_ref, recon_ref = saelens_reference(folder, x)
    torch.testing.assert_close(z_ref, (pre.relu() * (pre > THETA)).detach(), atol=ATOL, rtol=0)
    recon = (z_ref @ sae.W_dec_FD + sae.b_dec_D) / SCALE
    torch.testing.assert_close(recon_ref, recon.detach(), atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", BATCHTOPK)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_batchtopk_with_an_unset_threshold_is_refused(arch: str, mode: str, tmp_path: Path) -> None:
    sae = cast(BatchTopKSAE, make_sae(arch))
    sae.threshold.fill_(-1.0)  # never estimated: its codes are the batch top-k even in eval mode
    sae.train(mode == "train")
    name = type(sae).__name__
    with pytest.raises(ValueError, match=rf"threshold: this {name}'s inference threshold was never set"):
        save_saelens(sae, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_trainable_jumprelu_is_written_with_its_thresholds(tmp_path: Path) -> None:
    sae = cast(TrainableJumpReLUSAE, make_sae("jumprelu_trained"))
    folder = save_saelens(sae, tmp_path / "j", metadata={"layer": 2})
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and "training_architecture" not in cfg["metadata"]
    assert cfg["metadata"][PROVENANCE_KEY]["sae_config"] == sae.config()
    t = load_file(str(folder / SAELENS_WEIGHTS))
    torch.testing.assert_close(t["threshold"], sae.log_threshold_F.detach().exp())
    torch.testing.assert_close(t["W_enc"], sae.W_enc_DF.detach() * SCALE)


def test_metadata_fields_and_provenance(tmp_path: Path) -> None:
    given = {"model": "org/m", "layer": 4, "seed": 1, "context_size": 128, "hook_name": "blocks.4.hook_x"}
    folder = save_saelens(make_sae("topk"), tmp_path / "t", metadata=given)
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.4.hook_x"  # an explicit hook_name wins over the layer
    assert cfg["metadata"]["context_size"] == 128
    meta = read_saelens_metadata(folder)
    assert meta["format"] == "saelens" and meta["saelens_architecture"] == "topk"
    assert meta["model"] == "org/m" and meta["hook_name"] == "blocks.4.hook_x" and meta["k"] == K
    assert meta["layer"] == 4 and meta["seed"] == 1 and meta["input_scale_folded"] == pytest.approx(SCALE)
    assert meta["sae_config"]["k"] == K and meta["d_in"] == D and meta["d_sae"] == F
    assert (tmp_path / "t").is_dir() and not list(tmp_path.glob(".*tmp*"))  # atomic: no temporary left
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        save_saelens(make_sae("topk"), tmp_path / "bad", metadata={"x": object()})
    assert not (tmp_path / "bad").exists()


def _model_names(tmp_path: Path) -> dict[str, tuple[str | None, str | None]]:
    """What the project may record as ``model`` -> the ``model_name`` SAELens gets (a hub id)."""
    named = tmp_path / "finetuned-copy"  # save_pretrained of a hub model keeps its id
    named.mkdir()
    (named / "config.json").write_text(json.dumps({"_name_or_path": "meta-llama/Llama-3.1-8B-Instruct"}))
    local = tmp_path / "my-model"  # trained here: config.json names a path, not a hub id
    local.mkdir()
    (local / "config.json").write_text(json.dumps({"_name_or_path": "/scratch/ckpt/last"}))
    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    return {
        "alias": ("smollm2", SMOLLM2_HUB_ID),
        "hub id": ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct"),
        "folder of a hub model": (str(named), "meta-llama/Llama-3.1-8B-Instruct"),
        "folder of a local model": (str(local), "my-model"),
        "folder without config": (str(tmp_path), tmp_path.name),
        "gguf file": (str(gguf), "SmolLM2-135M-Instruct.Q4_1"),
        "path of another machine": ("/nowhere/models/other-model", "other-model"),
        "none": (None, None),
    }


@pytest.mark.parametrize(
    "case",
    [
        "alias",
        "hub id",
        "folder of a hub model",
        "folder of a local model",
        "folder without config",
        "gguf file",
        "path of another machine",
        "none",
    ],
)
def test_saelens_model_name_is_a_hub_id(case: str, tmp_path: Path) -> None:
    model, expected = _model_names(tmp_path)[case]
    assert saelens_model_name(model) == expected


def test_export_names_the_hub_id_and_the_adapter_beside_it(tmp_path: Path) -> None:
    adapter = tmp_path / "finetune" / "artifact"
    adapter.mkdir(parents=True)
    given = {"model": "smollm2", "layer": 3, "seed": 0, "adapter_path": str(adapter)}
    folder = save_saelens(make_sae("topk"), tmp_path / "export" / "blocks.3.hook_resid_post", metadata=given)
    cfg = json.loads((folder / "cfg.json").read_text())
    meta = cfg["metadata"]
    assert meta["model_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"  # what TransformerLens loads
    assert meta[ADAPTER_FIELD] == "../../finetune/artifact"  # its own field, relative to the export
    assert "model_from_pretrained_kwargs" not in meta  # SAELens passes those to the model loader
    assert meta[PROVENANCE_KEY]["model"] == "smollm2"  # the project's own name, for its checks
    read = read_saelens_metadata(folder)
    assert read["model"] == "smollm2" and read["adapter_path"] == read[ADAPTER_FIELD] == str(adapter)
    base = save_saelens(make_sae("topk"), tmp_path / "base", metadata={"model": "org/m", "layer": 3})
    assert ADAPTER_FIELD not in json.loads((base / "cfg.json").read_text())["metadata"]  # no adapter: none

    # an export written before: the alias as model_name, an absolute path of another machine
    meta["model_name"] = "smollm2"
    del meta[ADAPTER_FIELD]
    meta[PROVENANCE_KEY]["adapter_path"] = "/old/machine/finetune/artifact"
    (folder / "cfg.json").write_text(json.dumps(cfg))
    sae, x = make_sae("topk"), raw_inputs()
    assert_same_outputs(load_sae(folder), sae, x)
    read = read_saelens_metadata(folder)
    assert read["model"] == "smollm2" and read["adapter_path"] == "/old/machine/finetune/artifact"


def test_project_save_and_load_sae_round_trip_jumprelu(tmp_path: Path) -> None:
    sae, x = make_sae("jumprelu"), raw_inputs()
    folder = sae.save(tmp_path / "own", metadata={"layer": 2})
    loaded = load_sae(folder)
    assert isinstance(loaded, JumpReLUSAE) and loaded.config() == {"d_model": D, "n_latents": F}
    assert float(loaded.input_scale) == pytest.approx(SCALE)
    for key, value in sae.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)
    assert_same_outputs(sae, loaded, x)
    assert not is_saelens_folder(folder)  # the project's own export is not a SAELens folder


def test_jumprelu_forward_is_the_formula() -> None:
    sae, x = cast(JumpReLUSAE, make_sae("jumprelu")), raw_inputs()
    with torch.no_grad():
        sae.threshold_F[0] = -5.0  # a negative threshold acts as 0 (SAELens: ReLU, then the mask)
    xs = x * SCALE
    pre = (xs - sae.b_dec_D) @ sae.W_enc_DF + sae.b_enc_F
    z = torch.where(pre > sae.threshold_F.clamp_min(0), pre, torch.zeros_like(pre))
    out = sae(x, return_latents=True)
    assert out.latents_BF is not None
    torch.testing.assert_close(out.latents_BF, z)
    recon_scaled = z @ sae.W_dec_FD + sae.b_dec_D
    torch.testing.assert_close(out.recon_BD, recon_scaled / SCALE)
    mse = (recon_scaled - xs).pow(2).sum(-1).mean()
    torch.testing.assert_close(out.mse, mse)
    torch.testing.assert_close(out.loss, mse)  # inference only: no sparsity term
    assert out.parts == {} and torch.equal(out.fired_F, (z > 0).any(0))
    torch.testing.assert_close(out.l0, (z > 0).float().sum(-1).mean())
    assert sae(x).latents_BF is None


# --------------------------------------------------------------------------------------------- import folds


def write_folder(folder: Path, cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """A SAELens folder written by hand."""
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / SAELENS_WEIGHTS))
    return folder


def random_tensors(arch: str, seed: int = 5) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    t = {
        "W_enc": torch.randn(D, F, generator=gen) / D**0.5,
        "b_enc": 0.3 * torch.randn(F, generator=gen),
        "W_dec": torch.randn(F, D, generator=gen) * (0.5 + torch.rand(F, 1, generator=gen)),
        "b_dec": torch.randn(D, generator=gen),
    }
    if arch == "jumprelu":
        t["threshold"] = 0.1 + 0.3 * torch.rand(F, generator=gen)
    return t


def v6_cfg(arch: str, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "architecture": arch,
        "d_in": D,
        "d_sae": F,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": "6.10.0",
            "model_name": "gpt2",
            "hook_name": "blocks.5.hook_resid_post",
        },
    }
    if arch == "topk":
        cfg["k"] = K
    cfg.update(extra)
    return cfg


@pytest.mark.parametrize("arch", ARCHS)
def test_apply_b_dec_to_input_false_is_folded_into_b_enc(arch: str, tmp_path: Path) -> None:
    folder = write_folder(tmp_path / arch, v6_cfg(arch, apply_b_dec_to_input=False), random_tensors(arch))
    x = raw_inputs() * SCALE
    z_ref, recon_ref = saelens_reference(folder, x)
    z_with_b_dec, _ = saelens_reference(write_folder(tmp_path / "on", v6_cfg(arch), random_tensors(arch)), x)
    assert not torch.allclose(z_ref, z_with_b_dec, atol=1e-3)  # the flag matters for these weights
    sae = load_saelens(folder)
    assert (z_ref > 0).any() and (z_ref == 0).any()
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), z_ref, atol=ATOL, rtol=0)
        torch.testing.assert_close(sae.decode(sae.encode(x)), recon_ref, atol=ATOL, rtol=0)


def test_topk_rescale_acts_by_decoder_norm_is_folded(tmp_path: Path) -> None:
    folder = write_folder(
        tmp_path / "t", v6_cfg("topk", rescale_acts_by_decoder_norm=True), random_tensors("topk")
    )
    x = raw_inputs() * SCALE
    z_ref, recon_ref = saelens_reference(folder, x)
    sae = load_saelens(folder)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), z_ref, atol=ATOL, rtol=0)
        torch.testing.assert_close(sae(x).recon_BD, recon_ref, atol=ATOL, rtol=0)


def test_saelens5_flat_config_topk_with_scaling_factor(tmp_path: Path) -> None:
    t = random_tensors("topk")
    scaling_F = 0.5 + torch.rand(F, generator=torch.Generator().manual_seed(9))
    cfg = {
        "architecture": "standard",
        "d_in": D,
        "d_sae": F,
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": K},
        "apply_b_dec_to_input": True,
        "finetuning_scaling_factor": True,
        "normalize_activations": False,
        "hook_point": "blocks.6.hook_resid_post",
        "hook_layer": 6,
        "model_name": "gpt2-small",
        "context_size": 128,
        "dtype": "float32",
        "device": "cpu",
        "sae_lens_training_version": "3.2.1",
    }
    folder = write_folder(tmp_path / "v5", cfg, {**t, "scaling_factor": scaling_F})
    sae = load_saelens(folder)
    assert isinstance(sae, TopKSAE) and sae.k == K
    x = raw_inputs() * SCALE
    pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    values, indices = pre.topk(K, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, indices, values.relu())
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), z, atol=ATOL, rtol=0)
        recon = (z * scaling_F) @ t["W_dec"] + t["b_dec"]  # SAELens 5 scales the codes before decoding
        torch.testing.assert_close(sae.decode(z), recon, atol=ATOL, rtol=0)
    meta = read_saelens_metadata(folder)
    assert meta["saelens_layout"] == "saelens5" and meta["saelens_architecture"] == "topk" and meta["k"] == K
    assert meta["hook_name"] == "blocks.6.hook_resid_post" and meta["hook_layer"] == 6
    assert meta["model"] == "gpt2-small" and meta["context_size"] == 128
    # a plain v5 ReLU SAE (no activation_fn_kwargs) is a standard one
    plain = {k: v for k, v in cfg.items() if k not in ("activation_fn_kwargs", "finetuning_scaling_factor")}
    plain["activation_fn_str"] = "relu"
    assert isinstance(load_saelens(write_folder(tmp_path / "v5relu", plain, t)), ReLUSAE)


def training_cfg(arch: str, **extra: Any) -> dict[str, Any]:
    """A SAELens 6.54 BatchTopK training config, as its ``save_model`` writes it (``k`` a float there)."""
    cfg: dict[str, Any] = {
        "d_in": D,
        "d_sae": F,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": "6.54.12",
            "sae_lens_training_version": "6.54.12",
            "training_architecture": arch,
        },
        "decoder_init_norm": 0.1,
        "k": float(K),
        "use_sparse_activations": False,
        "aux_loss_coefficient": 1.0,
        "rescale_acts_by_decoder_norm": True,
        "topk_threshold_lr": 0.02,
        "architecture": arch,
    }
    if arch == "matryoshka_batchtopk":
        cfg.update(matryoshka_widths=[4, 16], use_matryoshka_aux_loss=False)  # SAELens adds d_sae
    cfg.update(extra)
    return cfg


def training_tensors(arch: str, threshold: float = 0.8) -> dict[str, torch.Tensor]:
    return {**random_tensors(arch), "topk_threshold": torch.tensor(threshold, dtype=torch.float64)}


@pytest.mark.parametrize("arch", BATCHTOPK)
@pytest.mark.parametrize(
    "options",
    [{}, {"rescale_acts_by_decoder_norm": False}, {"apply_b_dec_to_input": False, "k": K}],
    ids=["rescaled", "plain", "no_b_dec_int_k"],
)
def test_saelens_batchtopk_training_folder_is_read_with_its_semantics(
    arch: str, options: dict[str, Any], tmp_path: Path
) -> None:
    folder = write_folder(tmp_path / arch, training_cfg(arch, **options), training_tensors(arch))
    sae = load_saelens(folder)
    assert type(sae) is {"batchtopk": BatchTopKSAE, "matryoshka_batchtopk": MatryoshkaBatchTopKSAE}[arch]
    assert isinstance(sae, BatchTopKSAE) and not sae.training
    assert sae.k == K and sae.threshold_momentum == pytest.approx(0.98)
    assert sae.threshold.item() == pytest.approx(0.8)
    if isinstance(sae, MatryoshkaBatchTopKSAE):
        assert sae.prefixes == [4, 16, F]
    x = raw_inputs() * SCALE
    z_inf, recon_inf = saelens_reference(folder, x, inference=True)
    z_batch, recon_batch = saelens_reference(folder, x)
    assert not torch.equal(z_inf, z_batch)  # the threshold and the batch selection differ here
    assert (z_inf > 0).any() and (z_inf == 0).any()
    with torch.no_grad():  # eval mode: SAELens' inference export (jumprelu at topk_threshold)
        torch.testing.assert_close(sae.encode(x), z_inf, atol=ATOL, rtol=0)
        torch.testing.assert_close(sae(x).recon_BD, recon_inf, atol=ATOL, rtol=0)
        sae.train()  # training mode: SAELens' training SAE (the batch top-k)
        torch.testing.assert_close(sae.encode(x), z_batch, atol=ATOL, rtol=0)
        torch.testing.assert_close(sae(x).recon_BD, recon_batch, atol=ATOL, rtol=0)
    assert read_saelens_metadata(folder)["k"] == K


def inference_export(arch: str, threshold_F: torch.Tensor, **details: Any) -> tuple[dict, dict]:
    """SAELens' ``save_inference_model`` of a BatchTopK training SAE: jumprelu + its training details."""
    cfg = v6_cfg("jumprelu")
    cfg["metadata"].update(
        sae_lens_training_version="6.54.12",
        training_architecture=arch,
        training_architecture_details={"k": float(K), "topk_threshold_lr": 0.02, **details},
    )
    return cfg, {**random_tensors("topk"), "threshold": threshold_F}


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("batchtopk", BatchTopKSAE),
        ("matryoshka_batchtopk", MatryoshkaBatchTopKSAE),
        ("thresholds differ", JumpReLUSAE),
        ("k not whole", JumpReLUSAE),
        ("no training architecture", JumpReLUSAE),
    ],
)
def test_saelens_inference_export_of_batchtopk_is_read_as_batchtopk(
    case: str, expected: type[SparseAutoencoder], tmp_path: Path
) -> None:
    arch = "batchtopk" if case not in BATCHTOPK else case
    threshold_F = torch.full((F,), 0.3)
    details: dict[str, Any] = {"matryoshka_widths": [4, 16, F]} if arch == "matryoshka_batchtopk" else {}
    if case == "thresholds differ":
        threshold_F[3] = 0.5
    if case == "k not whole":
        details["k"] = 4.5
    cfg, tensors = inference_export(arch, threshold_F, **details)
    if case == "no training architecture":
        del cfg["metadata"]["training_architecture"]
    sae = load_saelens(write_folder(tmp_path / "s", cfg, tensors))
    assert type(sae) is expected and not sae.training
    if isinstance(sae, BatchTopKSAE):
        assert sae.k == K and sae.threshold.item() == pytest.approx(0.3)
        assert sae.threshold_momentum == pytest.approx(0.98)
    if isinstance(sae, MatryoshkaBatchTopKSAE):
        assert sae.prefixes == [4, 16, F]
    x = raw_inputs() * SCALE
    z_ref, recon_ref = saelens_reference(tmp_path / "s", x)
    assert (z_ref > 0).any() and (z_ref == 0).any()
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), z_ref, atol=ATOL, rtol=0)
        torch.testing.assert_close(sae(x).recon_BD, recon_ref, atol=ATOL, rtol=0)


def test_our_batchtopk_export_with_altered_thresholds_reads_as_jumprelu(tmp_path: Path) -> None:
    """The provenance says BatchTopK but the thresholds differ: the plain JumpReLU SAE, SAELens' codes."""
    folder = save_saelens(make_sae("batchtopk"), tmp_path / "b")
    t = load_file(str(folder / SAELENS_WEIGHTS))
    t["threshold"][:5] = 0.6
    save_file(t, str(folder / SAELENS_WEIGHTS))
    sae = load_saelens(folder, verify=False)
    assert type(sae) is JumpReLUSAE
    x = raw_inputs()
    z_ref, _ = saelens_reference(folder, x)
    torch.testing.assert_close(sae.encode(x), z_ref, atol=ATOL, rtol=0)


# --------------------------------------------------------------------------------------------- errors


def test_export_refuses_other_classes(tmp_path: Path) -> None:
    class Other(SparseAutoencoder):
        architecture = "other"

    with pytest.raises(ValueError, match=r"no equivalent of a Other \(architecture 'other'\)"):
        save_saelens(Other(4, 8), tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("cfg_change", "match"),
    [
        ({"architecture": "gated"}, r"cfg\.json: field 'architecture' is 'gated'"),
        (
            {"normalize_activations": "expected_average_only_in"},
            r"cfg\.json: field 'normalize_activations' is 'expected_average_only_in'; only 'none'",
        ),
        ({"normalize_activations": "layer_norm"}, r"field 'normalize_activations' is 'layer_norm'"),
        ({"reshape_activations": "other"}, r"field 'reshape_activations' is 'other'"),
        ({"d_sae": 0}, r"field 'd_sae' must be a positive integer"),
        ({"k": F + 1}, r"field 'k' \(41\) exceeds d_sae"),
        ({"k": None}, r"field 'k' must be a positive integer"),
    ],
)
def test_import_config_errors_name_the_file_and_field(
    cfg_change: dict[str, Any], match: str, tmp_path: Path
) -> None:
    folder = write_folder(tmp_path / "s", v6_cfg("topk", **cfg_change), random_tensors("topk"))
    with pytest.raises(ValueError, match=match):
        load_saelens(folder)


@pytest.mark.parametrize(
    ("arch", "change", "match"),
    [
        ("standard", {"drop": "b_enc"}, r"sae_weights\.safetensors: missing tensor\(s\) \['b_enc'\]"),
        ("jumprelu", {"drop": "threshold"}, r"missing tensor\(s\) \['threshold'\]"),
        ("standard", {"transpose": "W_enc"}, r"tensor 'W_enc' has shape \(40, 12\), expected \(12, 40\)"),
        ("topk", {"extra": "r_mag"}, r"unexpected tensor\(s\) \['r_mag'\]"),
        ("standard", {"extra": "scaling_factor"}, r"'scaling_factor' is not all ones but cfg\.json field"),
    ],
)
def test_import_tensor_errors_name_the_file_and_tensor(
    arch: str, change: dict[str, str], match: str, tmp_path: Path
) -> None:
    t = random_tensors(arch)
    if "drop" in change:
        del t[change["drop"]]
    if "transpose" in change:
        t[change["transpose"]] = t[change["transpose"]].T
    if "extra" in change:
        t[change["extra"]] = torch.full((F,), 2.0)
    folder = write_folder(tmp_path / "s", v6_cfg(arch), t)
    with pytest.raises(ValueError, match=match):
        load_saelens(folder)


@pytest.mark.parametrize(
    ("arch", "cfg_change", "tensor_change", "match"),
    [
        ("batchtopk", {"k": 4.5}, {}, r"cfg\.json: field 'k' must be a whole number in \[1, 40\].*got 4\.5"),
        ("batchtopk", {"k": F + 1}, {}, r"field 'k' must be a whole number in \[1, 40\]"),
        ("batchtopk", {"topk_threshold_lr": 0.0}, {}, r"field 'topk_threshold_lr' must be in \(0, 1\]"),
        (
            "matryoshka_batchtopk",
            {"matryoshka_widths": [16, 4]},
            {},
            r"field 'matryoshka_widths' must be increasing widths >= 1 up to d_sae \(40\), got \[16, 4\]",
        ),
        (
            "matryoshka_batchtopk",
            {"matryoshka_widths": [4, 50]},
            {},
            r"'matryoshka_widths' must be increasing",
        ),
        ("batchtopk", {}, {"drop": "topk_threshold"}, r"missing tensor\(s\) \['topk_threshold'\]"),
        ("batchtopk", {}, {"threshold": -0.5}, r"tensor 'topk_threshold' is -0\.5 < 0"),
        ("batchtopk", {}, {"per_latent": True}, r"tensor 'topk_threshold' has shape \(40,\), expected \(\)"),
    ],
)
def test_import_batchtopk_training_folder_errors_name_the_file_and_field(
    arch: str, cfg_change: dict[str, Any], tensor_change: dict[str, Any], match: str, tmp_path: Path
) -> None:
    t = training_tensors(arch, threshold=tensor_change.get("threshold", 0.8))
    if "drop" in tensor_change:
        del t[tensor_change["drop"]]
    if tensor_change.get("per_latent"):
        t["topk_threshold"] = torch.full((F,), 0.8)
    folder = write_folder(tmp_path / "s", training_cfg(arch, **cfg_change), t)
    with pytest.raises(ValueError, match=match):
        load_saelens(folder)


def test_import_missing_files_and_bad_json(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing cfg\.json"):
        load_saelens(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps(v6_cfg("standard")))
    with pytest.raises(FileNotFoundError, match=r"lacks sae_weights\.safetensors"):
        load_saelens(tmp_path)
    assert not is_saelens_folder(tmp_path)
    (tmp_path / SAELENS_WEIGHTS).write_bytes(b"garbage")
    assert is_saelens_folder(tmp_path)
    with pytest.raises(ValueError, match=r"sae_weights\.safetensors: not a readable safetensors file"):
        load_saelens(tmp_path)
    (tmp_path / "cfg.json").write_text("[1, 2]")
    assert not is_saelens_folder(tmp_path)
    with pytest.raises(ValueError, match=r"cfg\.json: expected a JSON object"):
        load_saelens(tmp_path)
    v5 = {"d_in": D, "d_sae": F, "activation_fn_str": "tanh-relu"}
    (tmp_path / "cfg.json").write_text(json.dumps(v5))
    with pytest.raises(ValueError, match=r"field 'activation_fn_str' is 'tanh-relu'"):
        load_saelens(tmp_path)


# ----------------------------------------------------------------------------------------- the real library


@pytest.fixture(scope="module")
def sae_lens() -> Any:
    return pytest.importorskip(
        "sae_lens",
        reason="sae-lens is not importable here (install it outside the venv and put it on PYTHONPATH; "
        "see benchmarks/saelens_wheels.sh)",
    )


@pytest.mark.interop
@pytest.mark.parametrize("arch", OURS)
def test_saelens_loads_our_export_with_the_same_outputs(sae_lens: Any, arch: str, tmp_path: Path) -> None:
    sae, x = make_sae(arch), raw_inputs()
    folder = save_saelens(sae, tmp_path / arch, metadata={"model": "org/m", "layer": 21, "seed": 2})
    theirs = sae_lens.SAE.load_from_disk(str(folder), device="cpu")
    assert theirs.cfg.architecture() == EXPORTED_AS[arch][0]
    assert theirs.cfg.metadata.hook_name == "blocks.21.hook_resid_post"
    assert theirs.cfg.metadata.model_name == "org/m"
    assert theirs.cfg.metadata[PROVENANCE_KEY]["seed"] == 2  # the provenance block survives its loader
    if arch in BATCHTOPK:  # as its own BatchTopK SAEs' inference export records it
        assert theirs.cfg.metadata.training_architecture == arch
    with torch.no_grad():
        z_theirs = theirs.encode(x)
        torch.testing.assert_close(z_theirs, sae.encode(x), atol=ATOL, rtol=0)
        torch.testing.assert_close(theirs.decode(z_theirs), sae.decode(sae.encode(x)), atol=ATOL, rtol=0)
        torch.testing.assert_close(theirs(x), sae(x).recon_BD, atol=ATOL, rtol=0)


@pytest.mark.interop
def test_saelens_loads_our_export_without_a_word(
    sae_lens: Any, tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """No warning, log line or print about the provenance block, the adapter or the model name."""
    adapter = tmp_path / "artifact"
    adapter.mkdir()
    given = {"model": "smollm2", "layer": 3, "seed": 4, "adapter_path": str(adapter)}
    folder = save_saelens(
        make_sae("jumprelu"), tmp_path / "export" / "blocks.3.hook_resid_post", metadata=given
    )
    caplog.set_level(logging.DEBUG)
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = sae_lens.SAE.load_from_disk(str(folder), device="cpu")
    printed = capfd.readouterr()
    assert (printed.out, printed.err) == ("", "")
    assert [str(w.message) for w in caught] == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO] == []
    assert theirs.cfg.metadata.model_name == SMOLLM2_HUB_ID
    assert theirs.cfg.metadata[ADAPTER_FIELD] == "../../artifact"
    assert theirs.cfg.metadata[PROVENANCE_KEY]["seed"] == 4


@pytest.mark.interop
@pytest.mark.parametrize(
    ("arch", "options"),
    [
        ("topk", {}),
        ("topk", {"rescale_acts_by_decoder_norm": True, "apply_b_dec_to_input": False}),
        ("standard", {}),
        ("standard", {"apply_b_dec_to_input": False}),
        ("jumprelu", {}),
        ("jumprelu", {"apply_b_dec_to_input": False}),
    ],
)
def test_we_load_saelens_own_save_with_the_same_outputs(
    sae_lens: Any, arch: str, options: dict[str, Any], tmp_path: Path
) -> None:
    cfg = v6_cfg(arch, **options)
    del cfg["metadata"]
    theirs = sae_lens.SAE.from_dict(cfg)
    with torch.no_grad():
        for name, tensor in random_tensors(arch, seed=11).items():
            getattr(theirs, name).copy_(tensor)
    theirs.save_model(str(tmp_path / arch))
    ours = load_saelens(tmp_path / arch)
    assert type(ours) is {"topk": TopKSAE, "standard": ReLUSAE, "jumprelu": JumpReLUSAE}[arch]
    x = raw_inputs() * SCALE
    with torch.no_grad():
        z_theirs = theirs.encode(x)
        assert (z_theirs > 0).any() and (z_theirs == 0).any()
        torch.testing.assert_close(ours.encode(x), z_theirs, atol=ATOL, rtol=0)
        torch.testing.assert_close(ours.decode(z_theirs), theirs.decode(z_theirs), atol=ATOL, rtol=0)
        torch.testing.assert_close(ours(x).recon_BD, theirs(x), atol=ATOL, rtol=0)


def their_batchtopk(sae_lens: Any, arch: str, options: dict[str, Any]) -> Any:
    """SAELens' own BatchTopK / Matryoshka-BatchTopK training SAE with random weights and a threshold."""
    kwargs: dict[str, Any] = {"d_in": D, "d_sae": F, "k": K, "topk_threshold_lr": 0.02, **options}
    if arch == "matryoshka_batchtopk":
        theirs = sae_lens.MatryoshkaBatchTopKTrainingSAE(
            sae_lens.MatryoshkaBatchTopKTrainingSAEConfig(matryoshka_widths=[4, 16, F], **kwargs)
        )
    else:
        theirs = sae_lens.BatchTopKTrainingSAE(sae_lens.BatchTopKTrainingSAEConfig(**kwargs))
    with torch.no_grad():
        for name, tensor in random_tensors("topk", seed=11).items():
            getattr(theirs, name).copy_(tensor)
        theirs.topk_threshold.fill_(0.8)
    return theirs


@pytest.mark.interop
@pytest.mark.parametrize("arch", BATCHTOPK)
@pytest.mark.parametrize(
    "options",
    [{}, {"rescale_acts_by_decoder_norm": False}, {"apply_b_dec_to_input": False}],
    ids=["rescaled", "plain", "no_b_dec"],
)
def test_we_load_saelens_own_batchtopk_saves_with_the_same_outputs(
    sae_lens: Any, arch: str, options: dict[str, Any], tmp_path: Path
) -> None:
    """Its training folder (save_model) and its inference export (save_inference_model: jumprelu)."""
    theirs = their_batchtopk(sae_lens, arch, options)
    theirs.save_model(str(tmp_path / "training"))
    theirs.save_inference_model(str(tmp_path / "inference"))
    with pytest.raises(KeyError):  # SAELens itself reads the training folder as a training SAE only
        sae_lens.SAE.load_from_disk(str(tmp_path / "training"), device="cpu")
    assert type(sae_lens.TrainingSAE.load_from_disk(str(tmp_path / "training"))) is type(theirs)
    their_inference = sae_lens.SAE.load_from_disk(str(tmp_path / "inference"), device="cpu")
    assert their_inference.cfg.architecture() == "jumprelu"
    cls = {"batchtopk": BatchTopKSAE, "matryoshka_batchtopk": MatryoshkaBatchTopKSAE}[arch]
    ours_training, ours_inference = load_saelens(tmp_path / "training"), load_saelens(tmp_path / "inference")
    x = raw_inputs() * SCALE
    for ours in (ours_training, ours_inference):
        assert type(ours) is cls and isinstance(ours, BatchTopKSAE) and not ours.training
        assert ours.k == K and ours.threshold_momentum == pytest.approx(0.98)
        assert ours.threshold.item() == pytest.approx(0.8)
        if isinstance(ours, MatryoshkaBatchTopKSAE):
            assert ours.prefixes == [4, 16, F]
        with torch.no_grad():  # eval mode: its inference SAE's codes (jumprelu at topk_threshold)
            z_theirs = their_inference.encode(x)
            assert (z_theirs > 0).any() and (z_theirs == 0).any()
            torch.testing.assert_close(ours.encode(x), z_theirs, atol=ATOL, rtol=0)
            torch.testing.assert_close(
                ours.decode(z_theirs), their_inference.decode(z_theirs), atol=ATOL, rtol=0
            )
            torch.testing.assert_close(ours(x).recon_BD, their_inference(x), atol=ATOL, rtol=0)
    with torch.no_grad():  # training mode: its training SAE's batch top-k
        ours_training.train()
        z_batch = theirs.encode(x)
        assert not torch.equal(z_batch, their_inference.encode(x))  # the two selections differ here
        torch.testing.assert_close(ours_training.encode(x), z_batch, atol=ATOL, rtol=0)
        torch.testing.assert_close(ours_training.decode(z_batch), theirs.decode(z_batch), atol=ATOL, rtol=0)
        torch.testing.assert_close(ours_training(x).recon_BD, theirs(x), atol=ATOL, rtol=0)


@pytest.mark.interop
def test_we_load_saelens_own_jumprelu_training_save_with_the_same_outputs(
    sae_lens: Any, tmp_path: Path
) -> None:
    """Its JumpReLU training SAE (the trainable JumpReLU's counterpart) reads as a plain JumpReLU SAE."""
    theirs = sae_lens.JumpReLUTrainingSAE(sae_lens.JumpReLUTrainingSAEConfig(d_in=D, d_sae=F))
    with torch.no_grad():
        for name, tensor in random_tensors("jumprelu", seed=11).items():
            getattr(theirs, name).copy_(tensor)
    theirs.save_model(str(tmp_path / "training"))
    ours = load_saelens(tmp_path / "training")
    assert type(ours) is JumpReLUSAE
    x = raw_inputs() * SCALE
    with torch.no_grad():
        z_theirs = theirs.encode(x)
        assert (z_theirs > 0).any() and (z_theirs == 0).any()
        torch.testing.assert_close(ours.encode(x), z_theirs, atol=ATOL, rtol=0)
        torch.testing.assert_close(ours.decode(z_theirs), theirs.decode(z_theirs), atol=ATOL, rtol=0)
        torch.testing.assert_close(ours(x).recon_BD, theirs(x), atol=ATOL, rtol=0)
