"""BatchTopK and Matryoshka-BatchTopK SAEs: batch-level selection, threshold, nested loss, export."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sae_refusal.cli import main
from sae_refusal.sae import (
    BatchTopK,
    BatchTopKSAE,
    MatryoshkaBatchTopK,
    MatryoshkaBatchTopKSAE,
    architecture_from_config,
    load_sae,
)
from sae_refusal.sae.batchtopk import prefix_sizes

CONFIGS = Path(__file__).resolve().parents[1] / "lightning_configs"

#: pre-activations of ``X`` under :func:`hand_sae` (identity encoder rows, two pair sums, b_enc[5] = 0.01):
#:   row 0: [5, 4, 0, 0, 9, 0.01]   row 1: [0.2, 0.05, 0.3, 0, 0.25, 0.31]   row 2: [0, 0, 0, -1, 0, -0.99]
X = torch.tensor([[5.0, 4.0, 0.0, 0.0], [0.2, 0.05, 0.3, 0.0], [0.0, 0.0, 0.0, -1.0]])
#: the k * B = 6 largest of them over the batch: 3, 3 and 0 per row (a per-row TopK would keep 2, 2, 2)
BATCH_CODES = torch.tensor(
    [[5.0, 4.0, 0.0, 0.0, 9.0, 0.0], [0.0, 0.0, 0.3, 0.0, 0.25, 0.31], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]
)


def hand_sae(**kwargs: float) -> BatchTopKSAE:
    sae = BatchTopKSAE(4, 6, k=2, aux_k=0, generator=torch.Generator().manual_seed(0), **kwargs)  # type: ignore[arg-type]
    with torch.no_grad():
        sae.W_enc_FD.copy_(torch.cat([torch.eye(4), torch.tensor([[1.0, 1, 0, 0], [0, 0, 1, 1]])]))
        sae.b_enc_F.copy_(torch.tensor([0, 0, 0, 0, 0, 0.01]))
    return sae


def test_training_codes_keep_the_k_times_batch_largest_activations_over_the_batch() -> None:
    sae = hand_sae(threshold_momentum=0.5)
    sae.set_input_scale(1.0)
    out = sae(X, return_latents=True)
    assert out.latents_BF is not None
    torch.testing.assert_close(out.latents_BF, BATCH_CODES)
    assert (out.latents_BF > 0).sum(-1).tolist() == [3, 3, 0]  # k * B = 6 in all, variable per row
    assert out.l0.item() == pytest.approx(2.0)
    recon_BD = BATCH_CODES @ sae.W_dec_FD + sae.b_dec_D
    mse = (recon_BD - X).pow(2).sum(-1).mean()
    torch.testing.assert_close(out.loss, mse)
    torch.testing.assert_close(out.mse, mse)
    torch.testing.assert_close(out.recon_BD, recon_BD)
    assert out.fired_F.tolist() == [True, True, True, False, True, True]
    # the threshold: the first update takes the smallest kept activation, later ones an EMA of it
    assert sae.threshold.item() == pytest.approx(0.25)
    sae(X[1:2])  # B = 1 keeps 0.31 and 0.3
    assert sae.threshold.item() == pytest.approx(0.5 * 0.25 + 0.5 * 0.3)


def test_eval_codes_are_thresholded_and_do_not_depend_on_the_batch() -> None:
    sae = hand_sae()
    sae.threshold.fill_(0.28)
    sae.eval()
    codes = sae.encode(X)
    expected = BATCH_CODES.clone()
    expected[1, 4] = 0.0  # 0.25 < theta
    torch.testing.assert_close(codes, expected)
    for row in range(3):
        torch.testing.assert_close(sae.encode(X[row : row + 1]), expected[row : row + 1])
    before = sae.threshold.clone()
    sae(X)
    assert torch.equal(sae.threshold, before)  # eval never moves the threshold


def test_an_unset_threshold_falls_back_to_the_batch_selection_in_eval() -> None:
    sae = hand_sae().eval()
    assert sae.threshold.item() < 0
    torch.testing.assert_close(sae.encode(X), BATCH_CODES)
    assert sae.threshold.item() == -1.0  # still unset: only training estimates it


def test_auxk_reconstructs_the_residual_from_dead_latents() -> None:
    gen = torch.Generator().manual_seed(1)
    sae = BatchTopKSAE(8, 24, k=3, aux_k=5, aux_coef=0.5, dead_after_steps=2, generator=gen)
    with torch.no_grad():
        sae.b_enc_F.add_(0.1 * torch.randn(24, generator=gen))
    sae.steps_since_fired_F[::2] = 2  # every other latent is dead
    x = torch.randn(10, 8, generator=gen)
    out = sae(x)
    pre = (x - sae.b_dec_D) @ sae.W_enc_FD.T + sae.b_enc_F
    flat = pre.relu().reshape(-1)
    kept = flat.topk(30).indices
    z = torch.zeros_like(flat).scatter(0, kept, flat[kept]).reshape(10, 24)
    recon = z @ sae.W_dec_FD + sae.b_dec_D
    mse = (recon - x).pow(2).sum(-1).mean()
    masked = pre.masked_fill(~sae.dead_F, float("-inf"))
    values, indices = masked.topk(5, dim=-1)
    aux_z = torch.zeros_like(pre).scatter(1, indices, values.relu())
    residual = (x - recon).detach()
    aux = (aux_z @ sae.W_dec_FD - residual).pow(2).sum() / residual.pow(2).sum()
    torch.testing.assert_close(out.parts["aux"], aux)
    torch.testing.assert_close(out.loss, mse + 0.5 * aux)
    grad = torch.autograd.grad(out.loss, sae.W_enc_FD)[0]
    assert grad[::2].abs().sum() > 0  # the dead latents learn again
    sae.eval()
    assert "aux" not in sae(x).parts


def train(sae: BatchTopKSAE, data: torch.Tensor, steps: int, seed: int = 0) -> None:
    """Plain Adam on random batches of 256 rows, with the unit-norm decoder constraint; the decoder bias
    starts at the data mean (as in ``SAEModule``)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.b_dec_D.copy_(data.mean(0))
    optimizer = torch.optim.Adam(sae.parameters(), lr=3e-3)
    sae.train()
    for _ in range(steps):
        batch = data[torch.randint(0, len(data), (256,), generator=gen)]
        optimizer.zero_grad()
        out = sae(batch)
        out.loss.backward()
        sae.remove_parallel_grads()
        optimizer.step()
        sae.normalize_decoder()
        sae.update_firing(out.fired_F)
    sae.eval()


def test_the_trained_threshold_gives_about_k_latents_per_held_out_row() -> None:
    gen = torch.Generator().manual_seed(0)
    sae = BatchTopKSAE(16, 64, k=4, aux_k=16, dead_after_steps=50, threshold_momentum=0.9, generator=gen)
    train(sae, torch.randn(4096, 16, generator=gen), steps=300)
    held_out = torch.randn(2048, 16, generator=gen)
    with torch.no_grad():
        out = sae(held_out)
        l0 = (sae.encode(held_out) > 0).sum(-1).float()
    assert sae.threshold.item() > 0.0
    assert abs(out.l0.item() - 4.0) <= 0.4, out.l0.item()
    assert l0.min() < l0.max()  # variable per row
    assert out.fvu.item() < 1.0


def sparse_data(n: int, gen: torch.Generator) -> torch.Tensor:
    """Rows made of ~3 of 48 unit directions in 16 dimensions, the first ones far more frequent."""
    dictionary = torch.randn(48, 16, generator=gen)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    freq = torch.linspace(0.25, 0.02, 48)
    mask = torch.rand(n, 48, generator=gen) < freq
    return (mask * (1.0 + torch.rand(n, 48, generator=gen))) @ dictionary


def test_matryoshka_loss_is_the_sum_of_the_prefix_mses() -> None:
    gen = torch.Generator().manual_seed(2)
    sae = MatryoshkaBatchTopKSAE(8, 32, k=6, prefixes=[4, 12, 32], aux_k=0, generator=gen)
    with torch.no_grad():
        sae.b_dec_D.copy_(0.3 * torch.randn(8, generator=gen))
        sae.b_enc_F.copy_(0.2 * torch.randn(32, generator=gen))
    sae.set_input_scale(1.3)
    x = torch.randn(7, 8, generator=gen)
    out = sae(x, return_latents=True)
    z = out.latents_BF
    assert z is not None and int((z > 0).sum()) == 6 * 7
    xs = x * 1.3
    mses = [(z[:, :m] @ sae.W_dec_FD[:m] + sae.b_dec_D - xs).pow(2).sum(-1).mean() for m in (4, 12, 32)]
    torch.testing.assert_close(out.loss, sum(mses))
    torch.testing.assert_close(out.mse, mses[-1])
    for m, mse in zip((4, 12, 32), mses, strict=True):
        torch.testing.assert_close(out.parts[f"mse_prefix{m}"], mse)
        fvu = (mse * 7) / (xs - xs.mean(0)).pow(2).sum()
        torch.testing.assert_close(out.parts[f"fvu_prefix{m}"], fvu)
    torch.testing.assert_close(out.recon_BD, (z @ sae.W_dec_FD + sae.b_dec_D) / 1.3)


def common_and_rare_data(n: int, gen: torch.Generator, dictionary: torch.Tensor) -> torch.Tensor:
    """Rows of ``dictionary``'s 48 directions: 8 common ones (p 0.3, magnitude 2-4) carrying most of the
    variance, 40 rare ones (p 0.03, magnitude 1-2); what a small first prefix can capture and 8 arbitrary
    latents cannot."""
    freq = torch.cat([torch.full((8,), 0.3), torch.full((40,), 0.03)])
    scale = torch.cat([torch.full((8,), 2.0), torch.full((40,), 1.0)])
    mask = torch.rand(n, 48, generator=gen) < freq
    return (mask * scale * (1.0 + torch.rand(n, 48, generator=gen))) @ dictionary


def unit_dictionary(gen: torch.Generator) -> torch.Tensor:
    dictionary = torch.randn(48, 16, generator=gen)
    return dictionary / dictionary.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matryoshka_prefixes_reconstruct_and_are_ordered(seed: int) -> None:
    """On every seed (data, weights and batches; the global RNG is not used) the first 8 latents of a
    Matryoshka SAE are a usable small SAE (FVU well below 1 on held-out rows), each prefix adds to the
    reconstruction, and the first 8 latents of a plain BatchTopK SAE from the same start are far worse."""
    gen = torch.Generator().manual_seed(seed)
    dictionary = unit_dictionary(gen)
    data, held_out = common_and_rare_data(4096, gen, dictionary), common_and_rare_data(1024, gen, dictionary)
    matryoshka = MatryoshkaBatchTopKSAE(
        16, 64, k=4, prefixes=[8, 16, 64], aux_k=16, dead_after_steps=50, generator=gen
    )
    plain = BatchTopKSAE(16, 64, k=4, aux_k=16, dead_after_steps=50)
    plain.load_state_dict(matryoshka.state_dict())  # the same start
    train(matryoshka, data, steps=300, seed=seed)
    train(plain, data, steps=300, seed=seed)
    with torch.no_grad():
        out = matryoshka(held_out)
        fvus = [out.parts[f"fvu_prefix{m}"].item() for m in (8, 16, 64)]
        assert fvus[0] < 0.5, fvus  # seeds 0-9: 0.15-0.30
        assert fvus[0] >= fvus[1] >= fvus[2], fvus  # each prefix adds to the reconstruction
        assert fvus[2] == pytest.approx(out.fvu.item())
        # the first 8 latents of the plain SAE are an arbitrary 8: as a small SAE they do much worse
        z = plain.encode(held_out)
        xs = held_out * plain.input_scale
        recon = z[:, :8] @ plain.W_dec_FD[:8] + plain.b_dec_D
        plain_first = ((recon - xs).pow(2).sum() / (xs - xs.mean(0)).pow(2).sum()).item()
        assert plain(held_out).fvu.item() < 0.3  # the plain SAE itself reconstructs
    assert fvus[0] < plain_first - 0.3, (fvus[0], plain_first)  # seeds 0-9: 0.82-1.0


def test_matryoshka_eval_l0_stays_near_k_after_longer_training() -> None:
    """The inference threshold keeps held-out eval-mode L0 within 10% of ``k`` after 1500 steps at the shipped
    momentum (measured: 4.0-4.2 for k 4 over 300-8000 steps, as BatchTopK's)."""
    gen = torch.Generator().manual_seed(5)
    dictionary = unit_dictionary(gen)
    data, held_out = common_and_rare_data(4096, gen, dictionary), common_and_rare_data(2048, gen, dictionary)
    sae = MatryoshkaBatchTopKSAE(
        16,
        64,
        k=4,
        prefixes=[4, 16, 64],
        aux_k=16,
        dead_after_steps=50,
        threshold_momentum=0.99,
        generator=gen,
    )
    train(sae, data, steps=1500, seed=5)
    with torch.no_grad():
        l0 = (sae.encode(held_out) > 0).sum(-1).float()
    assert abs(l0.mean().item() - 4.0) <= 0.4, l0.mean().item()
    assert l0.min() < l0.max()  # variable per row


@pytest.mark.parametrize("cls", [BatchTopKSAE, MatryoshkaBatchTopKSAE])
def test_save_and_load_give_the_same_sae(cls: type[BatchTopKSAE], tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(4)
    kwargs = {"prefixes": [4, 16]} if cls is MatryoshkaBatchTopKSAE else {}
    sae = cls(
        8,
        16,
        k=3,
        aux_k=4,
        aux_coef=0.25,
        dead_after_steps=9,
        threshold_momentum=0.7,
        generator=gen,
        **kwargs,
    )
    sae.set_input_scale(2.5)
    sae(torch.randn(32, 8, generator=gen))  # sets the threshold
    sae.eval()
    loaded = load_sae(sae.save(tmp_path / "export"))
    assert type(loaded) is cls and loaded.config() == sae.config()
    assert (loaded.config()["threshold_momentum"], loaded.config()["k"], loaded.aux_coef) == (0.7, 3, 0.25)
    assert loaded.threshold.item() == sae.threshold.item() > 0
    assert loaded.input_scale.item() == 2.5
    x = torch.randn(5, 8, generator=gen)
    loaded.eval()
    a, b = sae(x), loaded(x)
    torch.testing.assert_close(a.recon_BD, b.recon_BD)
    torch.testing.assert_close(sae.encode(x), loaded.encode(x))
    assert a.parts.keys() == b.parts.keys()


def test_a_fresh_process_loads_an_export_without_importing_the_module_first(tmp_path: Path) -> None:
    """``load_sae`` alone registers both architectures (e.g. ``sae-refusal features`` on an export)."""
    sae = MatryoshkaBatchTopKSAE(4, 8, k=2, prefixes=[2, 8], generator=torch.Generator().manual_seed(0))
    folder = sae.save(tmp_path / "export")
    code = f"from sae_refusal.sae.loading import load_sae; print(type(load_sae({str(folder)!r})).__name__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "MatryoshkaBatchTopKSAE"


def test_architectures_round_trip_and_build() -> None:
    for arch in (
        BatchTopK(k=4, aux_k=8, aux_coef=0.5, dead_after_steps=7, threshold_momentum=0.9),
        MatryoshkaBatchTopK(k=4, prefix_fractions=[0.25, 0.5, 1.0], threshold_momentum=0.8),
    ):
        rebuilt = architecture_from_config(arch.config())
        assert type(rebuilt) is type(arch) and rebuilt == arch
        short = {"class_path": f"sae_refusal.sae.{type(arch).__name__}", "init_args": arch.init_args()}
        assert architecture_from_config(short) == arch
    sae = MatryoshkaBatchTopK(k=4, prefix_fractions=[0.0625, 0.25, 1.0]).build(8, 64, torch.Generator())
    assert isinstance(sae, MatryoshkaBatchTopKSAE) and sae.prefixes == [4, 16, 64]
    assert isinstance(BatchTopK(k=4).build(8, 64, torch.Generator()), BatchTopKSAE)


@pytest.mark.parametrize(
    ("make", "key"),
    [
        (lambda: BatchTopK(k=0), "model.architecture.k"),
        (lambda: BatchTopK(threshold_momentum=1.0), "model.architecture.threshold_momentum"),
        (lambda: BatchTopK(k=80).build(4, 64, torch.Generator()), "model.architecture.k"),
        (
            lambda: MatryoshkaBatchTopK(prefix_fractions=[0.5, 0.25, 1.0]),
            "model.architecture.prefix_fractions",
        ),
        (lambda: MatryoshkaBatchTopK(prefix_fractions=[0.25, 0.5]), "model.architecture.prefix_fractions"),
        (
            lambda: MatryoshkaBatchTopK(prefix_fractions=[0.001, 1.0]).build(4, 64, torch.Generator()),
            "model.architecture.prefix_fractions",
        ),
        (lambda: MatryoshkaBatchTopKSAE(4, 16, k=2, prefixes=[8, 4, 16]), "model.architecture.prefixes"),
        (lambda: MatryoshkaBatchTopKSAE(4, 16, k=2, prefixes=[4, 8]), "model.architecture.prefixes"),
    ],
)
def test_bad_settings_name_their_key(make: object, key: str) -> None:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        make()  # type: ignore[operator]


def test_prefix_sizes_round_the_fractions() -> None:
    assert prefix_sizes([0.0625, 0.25, 1.0], 1024) == [64, 256, 1024]


@pytest.mark.parametrize(
    ("fragment", "cls"), [("batchtopk", BatchTopKSAE), ("matryoshka", MatryoshkaBatchTopKSAE)]
)
def test_fit_with_the_fragment_exports_a_thresholded_sae(
    fragment: str, cls: type[BatchTopKSAE], tmp_path: Path, tiny_model_dir: Path, prompt_file: Path
) -> None:
    from tests.test_cli import tiny_config

    config = tiny_config(tmp_path, tiny_model_dir, prompt_file)
    overrides = ["--model.init_args.expansion_factor", "2", "--model.init_args.seeds", "[0]"]
    overrides += ["--model.init_args.architecture.init_args.k", "4", "--trainer.max_epochs", "2"]
    overrides += ["--trainer.callbacks", "[]"]
    main(["fit", "--config", str(config), "--config", str(CONFIGS / "sae" / f"{fragment}.yaml"), *overrides])
    log_dir = tmp_path / "run" / "tb" / "version_0"
    sae = load_sae(log_dir / "sae" / "seed0")
    assert type(sae) is cls and sae.n_latents == 64 and sae.config()["k"] == 4
    assert sae.threshold.item() > 0
    events = EventAccumulator(str(log_dir))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"val/seed0/fvu", "train/seed0/l0"} <= scalars
    if cls is MatryoshkaBatchTopKSAE:
        assert sae.config()["prefixes"] == [4, 16, 64]
        assert {"val/seed0/fvu_prefix4", "train/seed0/mse_prefix16"} <= scalars


def test_the_fit_preflight_knows_the_batchtopk_settings() -> None:
    """``ARCHITECTURE_ARGS`` lists each class's arguments and defaults, and the shipped fragments pass."""
    import inspect

    from sae_refusal.config_check import preflight_fit
    from sae_refusal.sae.settings import ARCHITECTURE_ARGS

    for cls in (BatchTopK, MatryoshkaBatchTopK):
        signature = {k: p.default for k, p in inspect.signature(cls).parameters.items()}
        assert list(signature.items()) == list(ARCHITECTURE_ARGS[cls.__name__].items()), cls
    for fragment in ("batchtopk", "matryoshka"):
        preflight_fit(
            ["--config", str(CONFIGS / "default.yaml"), "--config", str(CONFIGS / "sae" / f"{fragment}.yaml")]
        )


#: (fragment, flag's key under architecture.init_args, value, the message; the constructor's too)
BAD_PREFLIGHT = [
    ("batchtopk", "k", "0", "model.architecture.k must be >= 1, got 0"),
    (
        "batchtopk",
        "threshold_momentum",
        "1.5",
        "model.architecture.threshold_momentum must be in [0, 1), got 1.5",
    ),
    ("batchtopk", "aux_k", "-1", "model.architecture.aux_k must be >= 0 (0 disables AuxK), got -1"),
    ("batchtopk", "dead_after_steps", "0", "model.architecture.dead_after_steps must be >= 1, got 0"),
    ("matryoshka", "k", "-2", "model.architecture.k must be >= 1, got -2"),
    (
        "matryoshka",
        "threshold_momentum",
        "-0.1",
        "model.architecture.threshold_momentum must be in [0, 1), got -0.1",
    ),
    (
        "matryoshka",
        "prefix_fractions",
        "[0.5, 0.25, 1.0]",
        "model.architecture.prefix_fractions must be strictly increasing, got [0.5, 0.25, 1.0]",
    ),
    (
        "matryoshka",
        "prefix_fractions",
        "[0.25, 0.5]",
        "model.architecture.prefix_fractions must end with 1.0 (the full dictionary), got [0.25, 0.5]",
    ),
    (
        "matryoshka",
        "prefix_fractions",
        "[0.0, 1.0]",
        "model.architecture.prefix_fractions must be a non-empty list of fractions in (0, 1], got [0.0, 1.0]",
    ),
    (
        "matryoshka",
        "prefix_fractions",
        "[]",
        "model.architecture.prefix_fractions must be a non-empty list of fractions in (0, 1], got []",
    ),
]


@pytest.mark.parametrize(("fragment", "key", "value", "message"), BAD_PREFLIGHT)
@pytest.mark.parametrize("full_path", [False, True], ids=["short_path", "module_path"])
def test_the_fit_preflight_refuses_a_bad_batchtopk_setting_naming_its_key(
    fragment: str, key: str, value: str, message: str, full_path: bool, tmp_path: Path
) -> None:
    """Before Lightning is imported, with the message the constructor gives, whichever class path the config
    names (``sae_refusal.sae.BatchTopK`` or the defining module's)."""
    import yaml

    from sae_refusal.config_check import preflight_fit

    config = yaml.safe_load((CONFIGS / "sae" / f"{fragment}.yaml").read_text())
    if full_path:
        node = config["model"]["init_args"]["architecture"]
        node["class_path"] = node["class_path"].replace("sae_refusal.sae.", "sae_refusal.sae.batchtopk.")
    layered = tmp_path / "fragment.yaml"
    layered.write_text(yaml.safe_dump(config))
    args = ["--config", str(CONFIGS / "default.yaml"), "--config", str(layered)]
    preflight_fit(args)
    flag = f"--model.init_args.architecture.init_args.{key}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        preflight_fit([*args, flag, value])
    cls = MatryoshkaBatchTopK if fragment == "matryoshka" else BatchTopK
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        cls(**{key: yaml.safe_load(value)})


def test_a_bad_batchtopk_setting_is_the_first_line_of_fit(
    tmp_path: Path, tiny_model_dir: Path, prompt_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.test_cli import tiny_config
    from tests.test_user_errors import run_main

    config = tiny_config(tmp_path, tiny_model_dir, prompt_file)
    flag = "--model.init_args.architecture.init_args.prefix_fractions"
    lines = run_main(
        [
            "fit",
            "--config",
            str(config),
            "--config",
            str(CONFIGS / "sae" / "matryoshka.yaml"),
            flag,
            "[0.5, 0.25, 1]",
        ],
        capsys,
    )
    expected = "model.architecture.prefix_fractions must be strictly increasing, got [0.5, 0.25, 1]"
    assert lines[0] == f"sae-refusal: error: {expected}", lines
    assert not (tmp_path / "run").exists()
