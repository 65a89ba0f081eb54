"""Stacked seeds (``StackedTopKSAE``, ``SAEModule(stack_seeds=True)``) equal the seeds' separate TopK SAEs.

* The same initial weights as ``TopK.build`` with each seed's generator (the exports byte for byte).
* The same outputs (loss, parts, mse, fvu, l0, fired latents, reconstruction) and gradients per seed, AuxK on
  with a different number of dead latents per seed (more and fewer than ``aux_k``, and none), through both
  sparse paths (``embedding_bag``: the CPU's; the CSR products: CUDA's, forced here) and both encoder dtypes.
* After N Adam steps with the decoder-norm duties and the dead-latent bookkeeping, the same weights.
* The seed views read and write the stack (fit-start statistics, firing, the AuxK reducer).
* A fit exports the same SAEs and logs the same metrics as an unstacked one; a killed stacked fit resumes
  bit for bit; 2 DDP ranks of a stacked fit export the SAEs of one unstacked process (slow).
* ``model.stack_seeds`` needs the TopK architecture (module and fit preflight); the shipped fragment parses.

Tolerances: float32 round-off (the stacked products sum in another order than the separate ones), checked
with ``OMP_NUM_THREADS`` 1 and 2. Data are Gaussian, so no two pre-activations tie at the top-k boundary.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

import tests.test_sae_ddp_metrics as ddp
import tests.test_sae_resume_ddp as resume
from sae_refusal.config_check import preflight_fit
from sae_refusal.sae import L1, BatchTopK, Contrastive, SAEModule, TopK, TopKSAE, load_sae
from sae_refusal.sae import stacked as stacked_module
from sae_refusal.sae import topk as topk_module
from sae_refusal.sae.base import start_from_data
from sae_refusal.sae.stacked import StackedTopKSAE
from sae_refusal.sae.topk import _SparseDecode, _SparseDecodePair
from tests.test_sae_module import fit

# Trainer(deterministic=True) and ddp_spawn change process-wide settings; undo them after each test
pytestmark = pytest.mark.usefixtures("lightning_globals_restored")

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "lightning_configs"
D, N_LATENTS, K, AUX_K = 16, 64, 4, 8
SEEDS = [0, 3, 5]


def separate_saes(encoder_dtype: str = "float32", seeds: list[int] = SEEDS) -> list[TopKSAE]:
    """Each seed's SAE as ``SAEModule`` builds it."""
    arch = TopK(k=K, aux_k=AUX_K, aux_coef=0.25, dead_after_steps=2, encoder_dtype=encoder_dtype)
    return [arch.build(D, N_LATENTS, torch.Generator().manual_seed(s)) for s in seeds]  # type: ignore[misc]


def perturbed(saes: list[TopKSAE]) -> list[TopKSAE]:
    """Away from the tied init (``W_enc = W_dec``, zero biases), a different scale per seed, and a different
    number of dead latents per seed: 40 (more than aux_k), 5 (fewer) and none."""
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for s, sae in enumerate(saes):
            for p in sae.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
            sae.set_input_scale(1.3 + 0.1 * s)
            sae.steps_since_fired_F[: (40, 5, 0)[s]] = 2
    return saes


def inputs(n: int = 24, seed: int = 7) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return 2.0 * torch.randn(n, D, generator=gen) + torch.randn(D, generator=gen)


@pytest.fixture(params=["embedding_bag", "csr"])
def sparse_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The CPU's sparse products, or CUDA's CSR products forced on the CPU (stack and reference alike)."""
    if request.param == "csr":

        def decode(values: torch.Tensor, indices: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
            return _SparseDecode.apply(values.contiguous(), indices.contiguous(), W)

        def pair(*args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return _SparseDecodePair.apply(*(a.contiguous() for a in args[:4]), args[4])

        for module in (topk_module, stacked_module):
            monkeypatch.setattr(module, "sparse_decode", decode)
            monkeypatch.setattr(module, "sparse_decode_pair", pair)
    return str(request.param)


# ---------------------------------------------------------------------------------------------- init
def test_a_stacked_module_starts_from_the_weights_topk_build_gives_each_seed(tmp_path: Path) -> None:
    arch = TopK(k=K, aux_k=AUX_K)
    stacked = SAEModule(d_model=D, architecture=arch, expansion_factor=4, seeds=SEEDS, stack_seeds=True)
    plain = SAEModule(d_model=D, architecture=arch, expansion_factor=4, seeds=SEEDS)
    assert stacked.stacked is not None and len(stacked.saes) == 0
    assert (
        [n for n, _ in stacked.named_saes()]
        == [n for n, _ in plain.named_saes()]
        == ["seed0", "seed3", "seed5"]
    )
    for (name, view), (_, sae) in zip(stacked.named_saes(), plain.named_saes(), strict=True):
        assert type(view) is TopKSAE and view.config() == sae.config()
        mine, theirs = view.state_dict(), sae.state_dict()
        assert list(mine) == list(theirs)
        for key in theirs:
            assert torch.equal(mine[key], theirs[key]), (name, key)
    stacked.export(tmp_path / "stacked")
    plain.export(tmp_path / "plain")
    for seed in SEEDS:  # the same files, byte for byte (cfg.json records the weights' sha256)
        for file in ("cfg.json", "sae.safetensors"):
            a = (tmp_path / "stacked" / f"seed{seed}" / file).read_bytes()
            assert a == (tmp_path / "plain" / f"seed{seed}" / file).read_bytes(), (seed, file)
    assert isinstance(load_sae(tmp_path / "stacked" / "seed3"), TopKSAE)


def test_from_saes_refuses_mixed_or_missing_seeds() -> None:
    saes = separate_saes()
    with pytest.raises(ValueError, match="share one configuration"):
        StackedTopKSAE.from_saes([saes[0], TopKSAE(D, N_LATENTS, k=K + 1)])
    with pytest.raises(ValueError, match="must be TopKSAE"):
        StackedTopKSAE.from_saes([saes[0], BatchTopK(k=K).build(D, N_LATENTS, torch.Generator())])
    with pytest.raises(ValueError, match="expected 1 TopKSAEs, got 0"):
        StackedTopKSAE.from_saes(iter([]), n_seeds=1)
    with pytest.raises(ValueError, match="more SAEs than n_seeds=2"):
        StackedTopKSAE.from_saes(iter(saes), n_seeds=2)
    with pytest.raises(ValueError, match="expected 0 TopKSAEs"):
        StackedTopKSAE.from_saes([])


# ---------------------------------------------------------------------------------------------- one step
@pytest.mark.parametrize("encoder_dtype", ["float32", "bfloat16"])
def test_outputs_and_gradients_equal_the_separate_saes(sparse_path: str, encoder_dtype: str) -> None:
    saes = perturbed(separate_saes(encoder_dtype))
    stacked = StackedTopKSAE.from_saes(saes)
    x = inputs()
    outs = stacked(x, return_latents=True)
    refs = [sae(x, return_latents=True) for sae in saes]
    assert [sorted(o.parts) for o in outs] == [["aux"], ["aux"], []]  # the seed without dead latents: no AuxK
    for s, (out, ref) in enumerate(zip(outs, refs, strict=True)):
        for field in ("loss", "mse", "fvu", "l0", "recon_BD", "latents_BF"):
            torch.testing.assert_close(
                getattr(out, field), getattr(ref, field), rtol=1e-5, atol=1e-6, msg=f"seed {s} {field}"
            )
        assert torch.equal(out.fired_F, ref.fired_F)
        assert out.parts.keys() == ref.parts.keys()
        for term in ref.parts:
            torch.testing.assert_close(out.parts[term], ref.parts[term], rtol=1e-5, atol=1e-6)
    names = ["W_enc_FD", "W_dec_FD", "b_enc_F", "b_dec_D"]
    stacked_params = [stacked.W_enc_SFD, stacked.W_dec_SFD, stacked.b_enc_SF, stacked.b_dec_SD]
    mine = torch.autograd.grad(sum(o.loss for o in outs), stacked_params)
    for s, (sae, ref) in enumerate(zip(saes, refs, strict=True)):
        theirs = torch.autograd.grad(ref.loss, [getattr(sae, n) for n in names])
        for name, a, b in zip(names, mine, theirs, strict=True):
            assert b.abs().sum() > 0, name  # every gradient is exercised
            torch.testing.assert_close(a[s], b, rtol=1e-5, atol=1e-6, msg=f"seed {s} gradient of {name}")


def test_top_k_entries_at_or_below_zero_neither_fire_nor_count() -> None:
    """A seed whose encoder bias pushes most pre-activations below zero: its l0 and fired latents."""
    saes = perturbed(separate_saes())
    with torch.no_grad():
        saes[1].b_enc_F.sub_(5.0)
    stacked = StackedTopKSAE.from_saes(saes)
    x = inputs()
    for out, sae in zip(stacked(x), saes, strict=True):
        ref = sae(x)
        assert torch.equal(out.fired_F, ref.fired_F)
        torch.testing.assert_close(out.l0, ref.l0, rtol=0.0, atol=0.0)
        torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert 0 < float(saes[1](x).l0) < K - 1  # the case is exercised


def test_the_input_gradient_equals_the_separate_saes() -> None:
    saes = perturbed(separate_saes())
    stacked = StackedTopKSAE.from_saes(saes)
    x = inputs().requires_grad_(True)
    (mine,) = torch.autograd.grad(sum(o.loss for o in stacked(x)), [x])
    (theirs,) = torch.autograd.grad(sum(sae(x).loss for sae in saes), [x])
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


def test_evaluation_mode_runs_no_auxk() -> None:
    saes = perturbed(separate_saes())
    stacked = StackedTopKSAE.from_saes(saes).eval()
    x = inputs()
    for out, sae in zip(stacked(x), saes, strict=True):
        ref = sae.eval()(x)
        assert out.parts == {} == ref.parts
        torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=0.0)


# ---------------------------------------------------------------------------------------------- N steps
def train_steps(
    trained: list[torch.nn.Module], forward: Any, x_NBD: torch.Tensor, lr: float = 1e-2
) -> list[list[float]]:
    """Step ``trained`` as SAEModule does (one fused Adam over all parameters, decoder duties, firing);
    ``forward(x)`` -> the seeds' outputs. Returns each step's per-seed losses."""
    params = [p for m in trained for p in m.parameters()]
    opt = torch.optim.Adam(params, lr=lr, fused=True)
    losses = []
    for x_BD in x_NBD:
        outs = forward(x_BD)
        sum(o.loss for o in outs).backward()
        for m in trained:
            m.remove_parallel_grads()  # type: ignore[operator]
        opt.step()
        opt.zero_grad()
        for m in trained:
            m.normalize_decoder()  # type: ignore[operator]
        fired_SF = torch.stack([o.fired_F for o in outs])
        if len(trained) == 1 and isinstance(trained[0], StackedTopKSAE):
            trained[0].update_firing(fired_SF)
        else:
            for m, fired_F in zip(trained, fired_SF, strict=True):
                m.update_firing(fired_F)  # type: ignore[operator]
        losses.append([float(o.loss.detach()) for o in outs])
    return losses


def test_adam_steps_of_the_stack_equal_separate_steps(sparse_path: str) -> None:
    """12 steps from a fit's start (input scale and decoder bias from the data), AuxK from step 3."""
    data_ND = inputs(12 * 16, seed=8)
    saes = separate_saes()
    for sae in saes:
        start_from_data(sae, data_ND)
    stacked = StackedTopKSAE.from_saes(saes)
    batches = data_ND.view(12, 16, D)
    theirs = train_steps(list(saes), lambda x: [sae(x) for sae in saes], batches)
    mine = train_steps([stacked], stacked, batches)
    assert any(bool(sae.dead_F.any()) for sae in saes)  # AuxK ran
    torch.testing.assert_close(torch.tensor(mine), torch.tensor(theirs), rtol=1e-5, atol=1e-6)
    for s, (view, sae) in enumerate(zip(stacked.seed_saes(), saes, strict=True)):
        ref = sae.state_dict()
        for key, value in view.state_dict().items():
            torch.testing.assert_close(value, ref[key], rtol=1e-5, atol=1e-6, msg=f"seed {s} {key}")
        assert torch.equal(view.steps_since_fired_F, sae.steps_since_fired_F)
        torch.testing.assert_close(view.W_dec_FD.norm(dim=1), torch.ones(N_LATENTS))


# ---------------------------------------------------------------------------------------------- views
def test_seed_views_read_and_write_the_stack() -> None:
    stacked = StackedTopKSAE.from_saes(separate_saes())
    views = stacked.seed_saes()
    assert stacked.seed_saes()[1] is views[1]  # kept while current
    views[1].set_input_scale(2.5)
    with torch.no_grad():
        views[2].b_dec_D.copy_(torch.arange(D, dtype=torch.float32))
        stacked.W_dec_SFD[0, 3, 0] = 7.0  # e.g. an optimiser step
    views[0].update_firing(torch.arange(N_LATENTS) < 10)
    assert stacked.input_scale_S.tolist() == [1.0, 2.5, 1.0]
    assert stacked.b_dec_SD[2].tolist() == list(range(D))
    assert float(views[0].W_dec_FD[3, 0]) == 7.0
    assert stacked.steps_since_fired_SF[0].tolist() == [0] * 10 + [1] * (N_LATENTS - 10)
    assert not any(p.requires_grad for v in views for p in v.parameters())  # trained through the stack only
    reducer = lambda energy: energy  # noqa: E731
    stacked.rank_mean = reducer
    assert all(v.rank_mean is reducer and not v.training for v in stacked.eval().seed_saes())
    stacked.double()  # new storage: new views
    moved = stacked.seed_saes()
    assert moved[1] is not views[1] and moved[1].W_enc_FD.dtype == torch.float64
    assert float(moved[1].input_scale) == 2.5
    moved[0].to(torch.float16)  # a view moved away is a copy: not handed out again
    again = stacked.seed_saes()
    assert again[0] is not moved[0] and again[0].W_enc_FD.dtype == torch.float64
    stacked.rank_mean = None
    state = pickle.loads(pickle.dumps(stacked))
    assert "_views" not in state.__dict__ and torch.equal(state.seed_saes()[2].b_dec_D, moved[2].b_dec_D)


def test_fit_start_statistics_land_in_the_stack() -> None:
    """``on_fit_start`` sets every seed's input scale and decoder bias through the views."""
    module = ddp.make_module()
    stacked = SAEModule(**{**dict(module.hparams), "stack_seeds": True})
    for m in (module, stacked):
        m.trainer = ddp._OneRankTrainer()  # type: ignore[assignment]
        m.on_fit_start()
    assert stacked.stacked is not None and bool(stacked.stats_ready)
    for (_, view), (_, sae) in zip(stacked.named_saes(), module.named_saes(), strict=True):
        assert float(view.input_scale) == float(sae.input_scale) != 1.0
        assert torch.equal(view.b_dec_D, sae.b_dec_D)
    assert torch.equal(stacked.stacked.b_dec_SD[1], module.named_saes()[1][1].b_dec_D.detach())


def test_the_auxk_reducer_reaches_the_stack_under_ddp_and_leaves_after_the_fit() -> None:
    module = SAEModule(**{**dict(ddp.make_module().hparams), "stack_seeds": True})
    assert module.stacked is not None
    module.stats_ready.fill_(True)
    module.trainer = ddp._Trainer()  # type: ignore[assignment]
    module.on_fit_start()
    reducer = module.stacked.rank_mean
    assert reducer is not None and all(sae.rank_mean is reducer for _, sae in module.named_saes())
    assert reducer(torch.tensor([1.0, 5.0])).tolist() == [2.0, 4.0]  # all seeds' normalisers in one call
    module.on_fit_end()
    assert module.stacked.rank_mean is None
    assert all(sae.rank_mean is None for _, sae in module.named_saes())
    pickle.dumps(module.stacked)  # no process-group reference left


# ---------------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize(
    ("architecture", "name"),
    [(L1(), "L1"), (BatchTopK(), "BatchTopK"), (Contrastive(base=TopK()), "Contrastive")],
)
def test_stack_seeds_needs_the_topk_architecture(architecture: Any, name: str) -> None:
    with pytest.raises(ValueError, match=rf"^model\.stack_seeds: .*needs the TopK architecture.*got {name};"):
        SAEModule(d_model=D, architecture=architecture, seeds=[0, 1], stack_seeds=True)
    SAEModule(d_model=D, architecture=architecture, seeds=[0, 1], stack_seeds=False)
    with pytest.raises(ValueError, match=r"^model\.stack_seeds must be true or false, got 'yes'"):
        SAEModule(d_model=D, seeds=[0, 1], stack_seeds="yes")  # type: ignore[arg-type]


def test_the_fit_preflight_checks_stack_seeds() -> None:
    default, fragment = str(CONFIGS / "default.yaml"), str(CONFIGS / "sae" / "topk_stacked.yaml")
    preflight_fit(["--config", default, "--config", fragment])
    preflight_fit(
        ["--config", default, "--model.init_args.stack_seeds", "true"]
    )  # default architecture: TopK
    for other in ("l1", "batchtopk", "contrastive"):
        args = ["--config", default, "--config", fragment, "--config", str(CONFIGS / "sae" / f"{other}.yaml")]
        args += ["--model.init_args.stack_seeds", "true"]
        with pytest.raises(ValueError, match=r"^model\.stack_seeds: .*needs the TopK architecture"):
            preflight_fit(args)


def test_the_stacked_fragment_turns_stacking_on() -> None:
    from tests.test_cli import parse

    cfg = parse(
        ["--config", str(CONFIGS / "default.yaml"), "--config", str(CONFIGS / "sae" / "topk_stacked.yaml")]
    )
    assert cfg.model.init_args.stack_seeds is True
    assert cfg.model.init_args.architecture.class_path == "sae_refusal.sae.TopK"
    plain = parse(["--config", str(CONFIGS / "default.yaml"), "--config", str(CONFIGS / "sae" / "topk.yaml")])
    assert plain.model.init_args.stack_seeds is False


# ---------------------------------------------------------------------------------------------- fit
def test_a_stacked_fit_exports_and_logs_what_an_unstacked_fit_does(tmp_path: Path) -> None:
    """3 seeds, 2 epochs (AuxK from the third step), validation each epoch: the same exports and metrics."""
    arch = TopK(k=3, aux_k=4, aux_coef=0.5, dead_after_steps=2)
    runs = {}
    for stack in (False, True):
        module = SAEModule(
            d_model=8, architecture=arch, expansion_factor=4, seeds=[0, 1, 2], lr=1e-2, stack_seeds=stack
        )
        trainer = fit(module, tmp_path / str(stack))
        runs[stack] = (module, {k: float(v) for k, v in trainer.callback_metrics.items()})
        assert trainer.log_dir is not None
        runs[stack] += (Path(trainer.log_dir) / "sae",)  # type: ignore[assignment]
    (_, plain, plain_dir), (_, mine, mine_dir) = runs[False], runs[True]
    assert "train/seed2/aux" in plain and "val/seed1/fvu_class/benign" in plain
    assert mine.keys() == plain.keys()
    for key, value in plain.items():
        assert mine[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    for seed in (0, 1, 2):
        a, b = load_sae(mine_dir / f"seed{seed}"), load_sae(plain_dir / f"seed{seed}")
        assert type(a) is type(b) is TopKSAE
        cfg_a, cfg_b = (
            json.loads((d / f"seed{seed}" / "cfg.json").read_text()) for d in (mine_dir, plain_dir)
        )
        assert {k: v for k, v in cfg_a.items() if k != "sha256"} == {
            k: v for k, v in cfg_b.items() if k != "sha256"
        }
        for key, value in b.state_dict().items():
            torch.testing.assert_close(
                a.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=f"seed{seed} {key}"
            )
        norms = a.W_dec_FD.norm(dim=1)  # renormalised after every step
        torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0.0, atol=1e-6)


def test_a_killed_stacked_fit_resumes_bit_for_bit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As ``tests/test_sae_resume_ddp.py`` (checkpoint every 5 steps, killed at step 19, resumed from 15)."""

    unstacked = resume.make_module

    def stacked(aux: bool = True) -> SAEModule:
        return SAEModule(**{**dict(unstacked(aux).hparams), "stack_seeds": True})

    monkeypatch.setattr(resume, "make_module", stacked)
    aux_steps = resume.AuxSteps()
    module_a, trainer_a = resume.fit_uninterrupted(tmp_path / "ref", aux_steps)
    assert aux_steps.steps > 0
    (module_b, trainer_b), checkpoint = resume.fit_killed_then_resumed(tmp_path / "run", 5, 19)
    assert checkpoint["global_step"] == 15
    assert {"stacked.W_enc_SFD", "stacked.steps_since_fired_SF", "stacked.input_scale_S"} <= set(
        checkpoint["state_dict"]
    )
    assert trainer_b.global_step == trainer_a.global_step == 2 * resume.STEPS_PER_EPOCH
    state_a, state_b = module_a.state_dict(), module_b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_b[key], state_a[key]), key
    adam_a = trainer_a.optimizers[0].state_dict()["state"]
    adam_b = trainer_b.optimizers[0].state_dict()["state"]
    assert adam_a.keys() == adam_b.keys() == {0, 1, 2, 3}
    for index in adam_a:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(adam_b[index][name], adam_a[index][name]), (index, name)


@pytest.mark.slow
def test_two_ddp_ranks_of_a_stacked_fit_export_one_unstacked_process(tmp_path: Path) -> None:
    """2 ranks x 4 rows stacked vs 1 process x 8 rows unstacked (AuxK on, its normaliser reduced over the
    ranks for all seeds at once): the same validation metrics and exports."""
    L.seed_everything(0)
    ddp.trainer_for(tmp_path / "one", 1).fit(ddp.make_module(), datamodule=ddp.InMemoryActivations(ddp.BATCH))
    L.seed_everything(0)
    module = SAEModule(**{**dict(ddp.make_module().hparams), "stack_seeds": True})
    ddp.trainer_for(tmp_path / "two", 2).fit(module, datamodule=ddp.InMemoryActivations(ddp.BATCH // 2))
    (one,), two = ddp.probes(tmp_path / "one", "fit", 1), ddp.probes(tmp_path / "two", "fit", 2)
    ddp.assert_no_sync_warning(two)
    assert one["aux_steps"] > 4 and two[0]["aux_steps"] == two[1]["aux_steps"] == one["aux_steps"]
    for record in two:  # the stack's reducer (the views show it): a mean over ranks, gone after the fit
        assert record["reducer_mean"] == 1.5 and record["reducers_after_fit"] == [True, True]
    assert two[0]["val"] == two[1]["val"]
    for got, expected in zip(two[0]["val"], one["val"], strict=True):
        ddp.assert_same_metrics(got, expected, rel=1e-4)
    for seed in (0, 1):
        single = load_sae(tmp_path / "one" / "sae" / f"seed{seed}").state_dict()
        double = load_sae(tmp_path / "two" / "sae" / f"seed{seed}").state_dict()
        for key in single:
            torch.testing.assert_close(double[key], single[key], atol=1e-5, rtol=0.0, msg=key)
