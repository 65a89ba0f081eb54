"""Training JumpReLU SAEs (:mod:`sae_refusal.sae.jumprelu_train`): the formula, the straight-through threshold
gradients (Rajamanoharan et al. 2024, eqs. 11-12), L0 against its coefficient, save/load, the inference SAE's
codes, the architecture config and a short ``sae-refusal fit``."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from sae_refusal.sae import JumpReLUSAE, load_sae
from sae_refusal.sae import base as sae_base
from sae_refusal.sae.architectures import architecture_from_config
from sae_refusal.sae.base import start_from_data
from sae_refusal.sae.jumprelu_train import JumpReLU, TrainableJumpReLUSAE, jumprelu_ste, step_ste

REPO = Path(__file__).resolve().parents[1]
D, F = 6, 10


def hand_sae(l0_coef: float = 0.5) -> TrainableJumpReLUSAE:
    """A 2 -> 3 SAE with hand-set weights: pre = (x - b_dec) @ W_enc + b_enc, thresholds (0.5, 1, 0.25)."""
    sae = TrainableJumpReLUSAE(2, 3, l0_coef=l0_coef, bandwidth=0.1, init_threshold=0.5)
    with torch.no_grad():
        sae.W_enc_DF.copy_(torch.tensor([[1.0, 0.0, 1.0], [0.0, 2.0, -1.0]]))
        sae.b_enc_F.copy_(torch.tensor([0.0, 0.0, 0.5]))
        sae.b_dec_D.copy_(torch.tensor([0.0, 1.0]))
        sae.W_dec_FD.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.5], [1.0, 1.0]]))
        sae.threshold_F = torch.tensor([0.5, 1.0, 0.25])
    return sae


def test_forward_and_loss_are_the_formula_on_a_hand_example() -> None:
    sae = hand_sae(l0_coef=0.5)
    x = torch.tensor([[1.0, 2.0], [0.2, 1.0]])
    # x - b_dec = [[1, 1], [0.2, 0]]; pre = [[1, 2, 0.5], [0.2, 0, 0.7]]
    pre = torch.tensor([[1.0, 2.0, 0.5], [0.2, 0.0, 0.7]])
    active = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 1.0]])  # vs thresholds (0.5, 1, 0.25)
    z = pre * active
    recon = z @ sae.W_dec_FD.detach() + torch.tensor([0.0, 1.0])
    mse = (recon - x).pow(2).sum(-1).mean()
    out = sae(x, return_latents=True)
    assert out.latents_BF is not None
    torch.testing.assert_close(out.latents_BF, z)
    torch.testing.assert_close(out.recon_BD, recon)
    torch.testing.assert_close(out.mse, mse)
    torch.testing.assert_close(out.parts["l0_penalty"], torch.tensor(2.0))  # (3 + 1) / 2 rows
    torch.testing.assert_close(out.loss, mse + 0.5 * 2.0)
    assert float(out.l0) == 2.0 and out.fired_F.tolist() == [True, True, True]
    torch.testing.assert_close(sae.threshold_F, torch.tensor([0.5, 1.0, 0.25]))
    # the input scale multiplies the input and divides the reconstruction
    sae.set_input_scale(2.0)
    torch.testing.assert_close(sae(x / 2.0).recon_BD, recon / 2.0)


def test_the_tanh_penalty_is_the_formula_and_reaches_the_encoder() -> None:
    """``sparsity_loss="tanh"``: ``mean_B sum_F tanh(c * z * ||W_dec_f||)``; step: no W_enc gradient."""
    x = torch.tensor([[1.0, 2.0], [0.2, 1.0]])
    z = torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.0, 0.7]])  # the hand example's codes
    norms = torch.tensor([1.0, 0.5, 2.0**0.5])
    sae = hand_sae(l0_coef=0.5)
    sae.sparsity_loss, sae.tanh_scale = "tanh", 3.0
    out = sae(x)
    expected = torch.tanh(3.0 * z * norms).sum(-1).mean()
    torch.testing.assert_close(out.parts["l0_penalty"], expected)
    torch.testing.assert_close(out.loss, out.mse + 0.5 * expected)
    out.parts["l0_penalty"].backward()
    assert sae.W_enc_DF.grad is not None and sae.W_enc_DF.grad.abs().sum() > 0
    assert sae.W_dec_FD.grad is not None and sae.W_dec_FD.grad.abs().sum() > 0
    step = hand_sae(l0_coef=0.5)
    step(x).parts["l0_penalty"].backward()
    assert step.W_enc_DF.grad is None or step.W_enc_DF.grad.abs().sum() == 0


def test_straight_through_gradients_are_the_rectangle_kernel_formula() -> None:
    """Paper eq. 12: d/dtheta H(pre - theta) = -(1/eps) K((pre - theta)/eps); eq. 11: d/dtheta of
    pre * H(pre - theta) = -(theta/eps) K((pre - theta)/eps); K(u) = 1[|u| < 1/2]; summed over the batch."""
    eps = 0.1
    pre = torch.tensor([[0.50, 1.0, 0.43], [0.55, 2.0, 0.48]], requires_grad=True)
    theta = torch.tensor([0.52, 1.0, 0.5], requires_grad=True)
    # |pre - theta| / eps = [[0.2, 0, 0.7], [0.3, 10, 0.2]] -> in the window: [[1, 1, 0], [1, 0, 1]]
    step_ste(pre, theta, eps).sum().backward()
    assert theta.grad is not None and pre.grad is not None
    torch.testing.assert_close(theta.grad, torch.tensor([-2.0, -1.0, -1.0]) / eps)
    torch.testing.assert_close(pre.grad, torch.zeros(2, 3))
    theta.grad, pre.grad = None, None
    jumprelu_ste(pre, theta, eps).sum().backward()
    assert theta.grad is not None and pre.grad is not None
    torch.testing.assert_close(theta.grad, torch.tensor([-2 * 0.52, -1.0, -0.5]) / eps)
    torch.testing.assert_close(pre.grad, torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 0.0]]))  # H(pre - theta)


def test_the_l0_term_reaches_the_log_thresholds_through_the_estimator() -> None:
    """SAE: d(l0_penalty)/d(log theta) = -(theta/eps) * mean_B K((pre - theta)/eps); no encoder grad."""
    sae = hand_sae()
    x = torch.tensor([[1.0, 2.0], [0.2, 1.0]])  # pre = [[1, 2, 0.5], [0.2, 0, 0.7]], eps = 0.1
    sae(x).parts["l0_penalty"].backward()
    # (pre - theta) / eps = [[5, 10, 2.5], [-3, -10, 4.5]]: nothing in the window
    assert sae.log_threshold_F.grad is not None
    torch.testing.assert_close(sae.log_threshold_F.grad, torch.zeros(3))
    sae.zero_grad()
    # now (pre - theta) / eps = [[0.4, 10, -2.2], [-7.6, -10, -0.2]]
    sae.threshold_F = torch.tensor([0.96, 1.0, 0.72])
    sae(x).parts["l0_penalty"].backward()
    theta = torch.tensor([0.96, 1.0, 0.72])
    assert sae.log_threshold_F.grad is not None and sae.W_enc_DF.grad is not None
    torch.testing.assert_close(sae.log_threshold_F.grad, theta * torch.tensor([-1.0, 0.0, -1.0]) / 0.1 / 2)
    torch.testing.assert_close(sae.W_enc_DF.grad, torch.zeros(2, 3))


def test_l0_falls_as_its_coefficient_rises() -> None:
    """Plain torch, 300 full-batch Adam steps on Gaussian data: a larger ``l0_coef`` gives a lower L0."""
    x = torch.randn(256, 8, generator=torch.Generator().manual_seed(0))
    l0s, fvus = [], []
    for coef in (0.0, 0.1, 1.0):
        sae = TrainableJumpReLUSAE(
            8,
            32,
            l0_coef=coef,
            bandwidth=0.1,
            init_threshold=0.1,
            init_decoder_norm=0.5,
            generator=torch.Generator().manual_seed(1),
        )
        opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
        for _ in range(300):
            loss = sae(x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            out = sae(x)
        l0s.append(float(out.l0))
        fvus.append(float(out.fvu))
    assert l0s[0] > l0s[1] > l0s[2], l0s
    assert l0s[0] > 2 * l0s[2] and fvus[0] < 0.05, (l0s, fvus)  # the trade is real, not noise


def trained_like(generator: torch.Generator) -> TrainableJumpReLUSAE:
    """A trainable SAE with random biases, thresholds and input scale."""
    sae = TrainableJumpReLUSAE(D, F, l0_coef=0.3, bandwidth=0.05, init_threshold=0.2, generator=generator)
    with torch.no_grad():
        sae.b_enc_F.normal_(0.0, 0.1, generator=generator)
        sae.b_dec_D.normal_(0.0, 0.1, generator=generator)
        sae.log_threshold_F.add_(torch.randn(F, generator=generator))
    sae.set_input_scale(1.7)
    return sae


def centred_rows(n: int = 400, d: int = 16) -> torch.Tensor:
    """Rows far from the origin (mean norm ~24, as a residual stream's), whose centred parts are small."""
    gen = torch.Generator().manual_seed(3)
    return 6.0 * torch.ones(d) + 0.5 * torch.randn(n, d, generator=gen)


def test_init_l0_starts_each_latent_firing_on_its_share_of_the_training_rows() -> None:
    """``b_enc_f = theta_f - q_f``: each latent fires on ``round(N * init_l0 / F)`` rows, thresholds kept."""
    x_ND, n_latents = centred_rows(), 64
    sae = JumpReLU(init_threshold=0.3, bandwidth=0.05, init_l0=8.0).build(16, n_latents, torch.Generator())
    start_from_data(sae, x_ND)
    with torch.no_grad():
        fires_F = (sae.encode(x_ND) != 0).sum(0)
    assert fires_F.tolist() == [round(400 * 8.0 / n_latents)] * n_latents  # 50 rows each: L0 8
    torch.testing.assert_close(sae.threshold_F, torch.full((n_latents,), 0.3))
    assert sae.b_enc_F.abs().min() > 0  # the bias moved, not the threshold
    # the start of every latent is its own quantile: a latent with a wider spread needs a larger bias shift
    wide = JumpReLU(init_threshold=0.3, init_l0=8.0).build(16, n_latents, torch.Generator().manual_seed(1))
    with torch.no_grad():
        wide.W_enc_DF[:, 0] *= 10.0
    start_from_data(wide, x_ND)
    with torch.no_grad():
        assert int((wide.encode(x_ND)[:, 0] != 0).sum()) == 50


def test_a_threshold_above_every_centred_pre_activation_is_an_error_not_a_silent_collapse() -> None:
    """Decoder bias at the data mean (as a fit starts) + a constant 0.35 threshold: nothing could learn."""
    x_ND = centred_rows()
    too_high = JumpReLU(init_threshold=5.0, bandwidth=0.05).build(16, 64, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"^model\.architecture\.init_threshold: 5 is above every pre-activ"):
        start_from_data(too_high, x_ND)
    reachable = JumpReLU(init_threshold=0.001, bandwidth=0.05).build(16, 64, torch.Generator().manual_seed(0))
    start_from_data(reachable, x_ND)
    assert torch.equal(reachable.b_enc_F, torch.zeros(64))  # checked, not moved
    with pytest.raises(ValueError, match=r"^model\.architecture\.init_l0: needs at least 2 training rows"):
        start_from_data(JumpReLU(init_l0=1.0).build(16, 64, torch.Generator()), x_ND[:1])


def test_start_from_data_sets_the_scale_the_decoder_bias_and_reads_evenly_spaced_rows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    x_ND = centred_rows(n=10)
    seen: list[torch.Tensor] = []
    sae = JumpReLU(init_l0=1.0).build(16, 64, torch.Generator())
    monkeypatch.setattr(sae_base, "INIT_SAMPLE_ROWS", 4)
    monkeypatch.setattr(sae, "init_from_data", lambda rows: seen.append(rows))
    mean_D = start_from_data(sae, x_ND)
    scale = sae_base.mean_norm_scale(x_ND)
    assert math.isclose(float(sae.input_scale), scale, rel_tol=1e-6)
    torch.testing.assert_close(sae.b_dec_D.detach(), x_ND.mean(0) * scale)
    torch.testing.assert_close(mean_D, x_ND.mean(0) * scale)
    torch.testing.assert_close(seen[0], x_ND[[0, 3, 6, 9]])  # first, last and evenly between
    start_from_data(sae, x_ND, normalize_inputs=False)
    assert float(sae.input_scale) == 1.0
    # every seed of a fit at once: each gets the scale, the bias and the same sample
    other = JumpReLU(init_l0=1.0).build(16, 64, torch.Generator().manual_seed(1))
    monkeypatch.setattr(other, "init_from_data", lambda rows: seen.append(rows))
    start_from_data([sae, other], x_ND)
    for each in (sae, other):
        assert math.isclose(float(each.input_scale), scale, rel_tol=1e-6)
        torch.testing.assert_close(each.b_dec_D.detach(), x_ND.mean(0) * scale)
    assert len(seen) == 4 and torch.equal(seen[2], seen[3])
    with pytest.raises(ValueError, match="no SAE given"):
        start_from_data([], x_ND)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    sae, x = trained_like(gen), torch.randn(16, D, generator=gen)
    sae.save(tmp_path / "sae", metadata={"seed": 0})
    loaded = load_sae(tmp_path / "sae")
    assert type(loaded) is TrainableJumpReLUSAE and loaded.config() == sae.config()
    assert loaded.config()["l0_coef"] == 0.3 and float(loaded.input_scale) == pytest.approx(1.7)
    ours, theirs = sae(x, return_latents=True), loaded(x, return_latents=True)
    assert theirs.latents_BF is not None and ours.latents_BF is not None
    torch.testing.assert_close(theirs.latents_BF, ours.latents_BF, rtol=0, atol=0)
    torch.testing.assert_close(theirs.recon_BD, ours.recon_BD, rtol=0, atol=0)
    torch.testing.assert_close(theirs.loss, ours.loss, rtol=0, atol=0)


def test_load_sae_knows_the_architecture_without_importing_it_first(tmp_path: Path) -> None:
    """A fresh process that imports only the loader reads a ``jumprelu_trained`` export."""
    TrainableJumpReLUSAE(D, F, generator=torch.Generator().manual_seed(0)).save(tmp_path / "sae")
    code = (
        "import sys\n"
        "from sae_refusal.sae.loading import load_sae\n"
        f"sae = load_sae({str(tmp_path / 'sae')!r})\n"
        "assert type(sae).__name__ == 'TrainableJumpReLUSAE', type(sae)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_inference_forward_equals_the_jumprelu_sae_on_the_same_weights() -> None:
    gen = torch.Generator().manual_seed(2)
    sae, x = trained_like(gen), torch.randn(64, D, generator=gen)
    plain = JumpReLUSAE(D, F)
    plain.load_state_dict(
        {
            **{k: v for k, v in sae.state_dict().items() if k != "log_threshold_F"},
            "threshold_F": sae.threshold_F.detach(),
        }
    )
    for other in (plain, sae.to_inference()):
        assert type(other) is JumpReLUSAE
        ours, theirs = sae(x, return_latents=True), other(x, return_latents=True)
        assert ours.latents_BF is not None and theirs.latents_BF is not None
        assert 0 < float(ours.l0) < F  # the thresholds cut some codes, not all
        torch.testing.assert_close(ours.latents_BF, theirs.latents_BF)
        torch.testing.assert_close(ours.recon_BD, theirs.recon_BD)
        for name in ("mse", "fvu", "l0"):
            torch.testing.assert_close(getattr(ours, name), getattr(theirs, name))
        assert torch.equal(ours.fired_F, theirs.fired_F)
        torch.testing.assert_close(sae.encode(x), other.encode(x))
        torch.testing.assert_close(ours.loss, theirs.loss + 0.3 * ours.parts["l0_penalty"])


def test_a_trained_sae_exports_to_saelens_as_a_jumprelu_sae(tmp_path: Path) -> None:
    """The SAELens exporter reads ``threshold_F`` (exp of the trained log thresholds): same codes after."""
    from sae_refusal.sae.formats.saelens import load_saelens, save_saelens

    gen = torch.Generator().manual_seed(3)
    sae, x = trained_like(gen), torch.randn(32, D, generator=gen)
    save_saelens(sae, tmp_path / "saelens")
    back = load_saelens(tmp_path / "saelens")
    assert type(back) is JumpReLUSAE
    torch.testing.assert_close(back.encode(x), sae.encode(x))
    torch.testing.assert_close(back(x).recon_BD, sae(x).recon_BD)


def test_architecture_builds_from_its_class_path_and_checks_its_settings() -> None:
    arch = architecture_from_config(
        {"class_path": "sae_refusal.sae.JumpReLU", "init_args": {"l0_coef": 2.0, "bandwidth": 0.01}}
    )
    assert isinstance(arch, JumpReLU) and architecture_from_config(arch.config()) == arch
    sae = arch.build(D, F, torch.Generator().manual_seed(0))
    assert isinstance(sae, TrainableJumpReLUSAE)
    assert sae.config() == {
        "d_model": D,
        "n_latents": F,
        "l0_coef": 2.0,
        "bandwidth": 0.01,
        "init_threshold": 0.001,
        "init_decoder_norm": 0.1,
        "init_l0": None,
        "sparsity_loss": "step",
        "tanh_scale": 4.0,
    }
    torch.testing.assert_close(sae.threshold_F, torch.full((F,), 0.001))
    torch.testing.assert_close(sae.W_dec_FD.norm(dim=1), torch.full((F,), 0.1))
    torch.testing.assert_close(sae.W_enc_DF, sae.W_dec_FD.T)
    assert math.isclose(float(sae.log_threshold_F[0].detach()), math.log(0.001), rel_tol=1e-6)
    for key, value in (
        ("l0_coef", -1.0),
        ("bandwidth", 0.0),
        ("init_threshold", -0.1),
        ("init_decoder_norm", float("nan")),
        ("init_l0", 0.0),
        ("init_l0", float("inf")),
        ("tanh_scale", 0),
    ):
        with pytest.raises(ValueError, match=f"^model\\.architecture\\.{key} must be"):
            JumpReLU(**{key: value})
    with pytest.raises(
        ValueError, match=r"^model\.architecture\.init_l0: must be below the number of latents"
    ):
        JumpReLU(init_l0=F).build(D, F, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="thresholds > 0"):
        sae.threshold_F = torch.zeros(F)


def test_the_fit_preflight_knows_the_jumprelu_settings() -> None:
    """``sae-refusal fit`` checks them before Lightning loads: the signature's defaults, the same message."""
    import inspect

    from sae_refusal.config_check import preflight_fit
    from sae_refusal.sae.settings import ARCHITECTURE_ARGS

    signature = {k: p.default for k, p in inspect.signature(JumpReLU).parameters.items()}
    assert list(signature.items()) == list(ARCHITECTURE_ARGS["JumpReLU"].items())
    default, fragment = (
        REPO / "lightning_configs" / "default.yaml",
        REPO / "lightning_configs" / "sae" / "jumprelu.yaml",
    )
    args = ["--config", str(default), "--config", str(fragment)]
    preflight_fit(args)
    with pytest.raises(ValueError, match=r"^model\.architecture\.bandwidth must be > 0, got -0\.5$"):
        preflight_fit([*args, "--model.init_args.architecture.init_args.bandwidth", "-0.5"])


@pytest.mark.usefixtures("lightning_globals_restored")
def test_fit_with_the_jumprelu_config_exports_trained_jumprelu_saes(
    tmp_path: Path, tiny_model_dir: Path, prompt_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sae_refusal.cli import main
    from tests.test_cli import tiny_config

    config = tiny_config(tmp_path, tiny_model_dir, prompt_file)
    fragment = REPO / "lightning_configs" / "sae" / "jumprelu.yaml"
    assert yaml.safe_load(fragment.read_text())["model"]["init_args"]["seeds"] == [0, 1, 2]
    main(["cache", "--config", str(config)])
    main(["fit", "--config", str(config), "--config", str(fragment), "--trainer.max_epochs", "1"])
    folder = tmp_path / "run" / "tb" / "version_0" / "sae"
    saes = [load_sae(folder / f"seed{seed}") for seed in (0, 1, 2)]
    for sae in saes:
        assert isinstance(sae, TrainableJumpReLUSAE) and sae.config()["l0_coef"] == 0.18
        assert (sae.d_model, sae.n_latents) == (32, 32 * 16)
        assert not torch.equal(sae.log_threshold_F, torch.full_like(sae.log_threshold_F, math.log(0.001)))
    assert not torch.equal(saes[0].W_dec_FD, saes[1].W_dec_FD)
    # the fit starts every seed through start_from_data: without init_l0, a threshold out of reach stops it
    # before a step
    key = "--model.init_args.architecture.init_args"
    out = ["--trainer.default_root_dir", str(tmp_path / "run2"), "--trainer.max_epochs", "1"]
    no_start = tmp_path / "no_start.yaml"  # a YAML null (jsonargparse reads a command-line null as a string)
    no_start.write_text("model:\n  init_args:\n    architecture:\n      init_args:\n        init_l0: null\n")
    with pytest.raises(SystemExit):
        main(
            [
                *["fit", "--config", str(config), "--config", str(fragment), "--config", str(no_start), *out],
                *[f"{key}.init_threshold", "1000"],
            ]
        )
    assert (
        "error: model.architecture.init_threshold: 1000 is above every pre-activation"
        in capsys.readouterr().err
    )
    # ... and init_l0 starts the same threshold from the data (the export records it)
    main(
        [
            "fit",
            "--config",
            str(config),
            "--config",
            str(fragment),
            *out,
            f"{key}.init_threshold",
            "1000",
            f"{key}.init_l0",
            "4",
            "--trainer.logger.init_args.save_dir",
            str(tmp_path / "run2"),
        ]
    )
    started = load_sae(next((tmp_path / "run2").rglob("seed0/cfg.json")).parent)
    assert isinstance(started, TrainableJumpReLUSAE) and started.config()["init_l0"] == 4.0
