"""Benchmark: TopK SAE training throughput and memory, ``sae_refusal`` vs a plain PyTorch TopK SAE.

Throughput mode (default) times full training steps (forward, backward, Adam step, and each contender's
decoder-norm duties) on one fixed random Gaussian batch (throughput does not depend on the data), after
warm-up, with ``torch.cuda.synchronize()`` around every timed step on CUDA. It reports samples/s, the
median step time and the peak CUDA memory of each contender (``torch.cuda.max_memory_allocated``, reset
before each contender is built, so it counts parameters, gradients, Adam state, activations and the shared
input batch; n/a on CPU). Contenders, all in the same process on the same inputs with the same seed:

* ``ours``: :class:`sae_refusal.sae.topk.TopKSAE` (sparse decoder, sparse encoder backward, AuxK with the
  default ``aux_k``), Adam, ``update_firing`` every step, ``remove_parallel_grads`` before and
  ``normalize_decoder`` after each optimiser step.
* ``plain``: the direct TopK SAE a user would write (:class:`PlainTopKSAE` below): dense encoder matmul,
  ``topk``, scatter into a dense ``(B, F)`` code matrix, dense decoder ``z @ W_dec``, MSE loss, Adam,
  decoder rows renormalised after the step. It has **no AuxK and no dead-latent bookkeeping**, which
  favours it.
* ``saelens``: SAELens's ``TopKTrainingSAE`` stepped like its own trainer (only if ``import sae_lens``
  works; otherwise the run says it is not installed and skips it).

Quality mode (``--quality``) trains ``ours`` and ``plain`` (and ``saelens`` if installed) at matched ``k``
for ``--quality-steps`` steps on the same stream of batches, drawn either from a fixed low-rank + sparse
synthetic distribution or from an ``(N, D)`` activation tensor (``--acts``, ``.pt`` or ``.safetensors``),
and reports the final FVU and L0 on held-out rows: the "FVU and L0 at matched k against a reference TopK
implementation" check. Both contenders get the same initial weights, input scale (mean row norm
``sqrt(D)``), decoder bias (the training mean), learning rate and batches; ``ours`` uses AuxK, ``plain``
does not.

Scale mode (one GPU command, about 3-4 minutes on an H200; prints progress): ``--n-latents 65536,131072``
runs each size, ``--dead-fraction 0,0.5`` each dead fraction, ``--bf16`` adds ``ours-bf16`` (TopKSAE
``encoder_dtype="bfloat16"``), ``--sparsify`` adds EleutherAI sparsify's ``SparseCoder`` stepped like its own
trainer (wheels: ``benchmarks/sparsify_wheels.sh``), ``--seeds 3`` adds three seeds side by side (one
optimiser; ``-streams``: one CUDA stream per seed). The JSON has one entry per (F, dead fraction) in ``runs``
with samples/s per contender and ``ratios`` (``ours/sparsify``, ``ours-bf16/plain``, per-seed cost ...), and
``auxk_step_time_overhead``. Every contender's failure is recorded in the JSON and the run goes on::

    # carry [".device/whl_sparsify"]; on the GPU machine:
    python3 -m pip install -q --no-index --no-deps --target /tmp/sp .device/whl_sparsify/*.whl
    PYTHONPATH=/tmp/sp:$PWD python3 benchmarks/sae_throughput.py --device cuda --tf32 --no-saelens \
        --n-latents 65536,131072 --dead-fraction 0,0.5 --bf16 --sparsify --seeds 3 --steps 10 --warmup 3 \
        --out $OUT/sae_scale.json
    PYTHONPATH=/tmp/sp:$PWD python3 benchmarks/sae_throughput.py --device cuda --tf32 --no-saelens --quality \
        --quality-steps 300 --bf16 --sparsify --out $OUT/sae_quality.json

Examples::

    # the issue's GPU setting: d_model 4096, F = 16 * 4096 = 65536, k 64, batch 4096, fp32
    python benchmarks/sae_throughput.py --device cuda --out $OUT/sae_throughput.json
    python benchmarks/sae_throughput.py --device cuda --tf32 --out $OUT/sae_throughput_tf32.json
    python benchmarks/sae_throughput.py --device cuda --quality --quality-steps 2000 \\
        --out $OUT/sae_quality.json
    # CPU smoke (add --threads 1 on a shared machine: OpenMP threads that compete for cores time badly)
    python benchmarks/sae_throughput.py --device cpu --d-model 64 --expansion 4 --k 8 --batch 256 --steps 3 \\
        --warmup 1 --out /tmp/sae_throughput.json
    python benchmarks/sae_throughput.py --device cpu --d-model 64 --expansion 4 --k 8 --batch 256 --quality \\
        --quality-steps 200 --out /tmp/sae_quality.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae_refusal.sae.base import mean_norm_scale
from sae_refusal.sae.topk import TopKSAE

PLAIN_NOTE = (
    "plain = dense TopK SAE written in this script: MSE only, no AuxK and no dead-latent bookkeeping "
    "(this favours the baseline)"
)
DEFAULT_DEAD_AFTER = 1000  # TopKSAE's default dead_after_steps


# ---------------------------------------------------------------------------------------------- contenders
class PlainTopKSAE(nn.Module):
    """The most direct TopK SAE: every product is dense, the codes are a dense ``(B, F)`` matrix.

    Args:
        d_model: Input width ``D``.
        n_latents: Dictionary size ``F``.
        k: Active latents per input.
        generator: RNG of the initial weights (drawn exactly like :class:`TopKSAE`'s, so a shared seed gives
            the same initial SAE).
    """

    def __init__(
        self, d_model: int, n_latents: int, k: int, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        self.k = k
        self.input_scale = 1.0
        W_dec_FD = torch.randn(n_latents, d_model, generator=generator)
        W_dec_FD /= W_dec_FD.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec_FD)
        self.W_enc = nn.Parameter(W_dec_FD.T.contiguous())  # (D, F)
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.b_dec = nn.Parameter(torch.zeros(d_model))

    def forward(self, x_BD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Return ``(mse, recon_BD, z_BF)``; ``x_BD`` is raw, ``mse`` and ``recon_BD`` are normalised."""
        x_BD = x_BD.float() * self.input_scale
        pre_BF = (x_BD - self.b_dec) @ self.W_enc + self.b_enc
        values_BK, indices_BK = pre_BF.topk(self.k, dim=-1)
        z_BF = torch.zeros_like(pre_BF).scatter(-1, indices_BK, values_BK.relu())
        recon_BD = z_BF @ self.W_dec + self.b_dec
        mse = (recon_BD - x_BD).pow(2).sum(-1).mean()
        return mse, recon_BD, z_BF

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale the decoder rows to unit norm."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))


class Contender(Protocol):
    """One SAE with its optimiser and training-loop duties."""

    def step(self, x_BD: Tensor) -> Tensor:
        """One full training step on raw inputs; returns the (detached, normalised-space) batch MSE."""
        ...

    def evaluate(self, x_BD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(recon_BD in raw space, active latents per row (B,), fired_F)`` without training."""
        ...

    def aux_steps(self) -> int:
        """How many training steps had a non-zero AuxK term (0 for a contender without AuxK)."""
        ...


class OursContender:
    """:class:`TopKSAE` trained the way :class:`sae_refusal.sae.module.SAEModule` does (Adam + duties)."""

    def __init__(
        self,
        sae: TopKSAE,
        lr: float,
        forced_dead_F: Tensor | None = None,
    ) -> None:
        self.sae = sae.train()
        params = list(sae.parameters())
        # as SAEModule.configure_optimizers: the fused kernel on CUDA
        self.opt = torch.optim.Adam(params, lr=lr, fused=all(p.is_cuda for p in params))
        self.forced_dead_F = forced_dead_F
        self._aux_steps = 0

    def step(self, x_BD: Tensor) -> Tensor:
        sae = self.sae
        if self.forced_dead_F is not None:  # keep this subset "dead" so the AuxK path runs every step
            sae.steps_since_fired_F.masked_fill_(self.forced_dead_F, sae.dead_after_steps)
        out = sae(x_BD)
        out.loss.backward()
        sae.update_firing(out.fired_F)
        sae.remove_parallel_grads()
        self.opt.step()
        sae.normalize_decoder()
        self.opt.zero_grad(set_to_none=True)
        if "aux" in out.parts:
            self._aux_steps += 1
        return out.mse.detach()

    @torch.no_grad()
    def evaluate(self, x_BD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        self.sae.eval()
        try:
            out = self.sae(x_BD)
            values_BK, _ = self.sae.encode_sparse(x_BD)
            return out.recon_BD, (values_BK > 0).sum(-1), out.fired_F
        finally:
            self.sae.train()

    def aux_steps(self) -> int:
        return self._aux_steps


class OursSeedsContender:
    """``n`` :class:`TopKSAE` seeds stepped side by side on the same batch, one fused Adam over all of them,
    as :class:`sae_refusal.sae.module.SAEModule` trains its ``ModuleDict`` of seeds.

    With ``streams`` (CUDA only) each seed's forward, backward and gradient duties run on its own CUDA stream
    (the small top-k / sort / index kernels of one seed can overlap another's GEMMs), joined before the
    optimiser step. The step returns the mean MSE over the seeds.
    """

    def __init__(self, saes: list[TopKSAE], lr: float, forced_dead_F: Tensor | None, streams: bool) -> None:
        self.saes = [sae.train() for sae in saes]
        params = [p for sae in saes for p in sae.parameters()]
        self.opt = torch.optim.Adam(params, lr=lr, fused=all(p.is_cuda for p in params))
        self.forced_dead_F = forced_dead_F
        self.streams = [torch.cuda.Stream() for _ in saes] if streams and params[0].is_cuda else None
        self._aux_steps = 0

    def _one(self, sae: TopKSAE, x_BD: Tensor) -> tuple[Tensor, bool]:
        if self.forced_dead_F is not None:
            sae.steps_since_fired_F.masked_fill_(self.forced_dead_F, sae.dead_after_steps)
        out = sae(x_BD)
        out.loss.backward()
        sae.update_firing(out.fired_F)
        sae.remove_parallel_grads()
        return out.mse.detach(), "aux" in out.parts

    def step(self, x_BD: Tensor) -> Tensor:
        results: list[tuple[Tensor, bool]] = []
        if self.streams is None:
            results = [self._one(sae, x_BD) for sae in self.saes]
        else:
            main = torch.cuda.current_stream()
            for sae, stream in zip(self.saes, self.streams, strict=True):
                stream.wait_stream(main)
                with torch.cuda.stream(stream):
                    results.append(self._one(sae, x_BD))
            for stream in self.streams:
                main.wait_stream(stream)
        self.opt.step()
        for sae in self.saes:
            sae.normalize_decoder()
        self.opt.zero_grad(set_to_none=True)
        if all(aux for _, aux in results):
            self._aux_steps += 1
        return torch.stack([mse for mse, _ in results]).mean()

    @torch.no_grad()
    def evaluate(self, x_BD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return OursContender.evaluate(self, x_BD)  # type: ignore[arg-type]

    @property
    def sae(self) -> TopKSAE:
        """The first seed (what :meth:`evaluate` scores)."""
        return self.saes[0]

    def aux_steps(self) -> int:
        return self._aux_steps


class PlainContender:
    """:class:`PlainTopKSAE` with Adam and a decoder renormalisation after each step."""

    def __init__(self, sae: PlainTopKSAE, lr: float) -> None:
        self.sae = sae.train()
        self.opt = torch.optim.Adam(sae.parameters(), lr=lr)

    def step(self, x_BD: Tensor) -> Tensor:
        mse, _, _ = self.sae(x_BD)
        mse.backward()
        self.opt.step()
        self.sae.normalize_decoder()
        self.opt.zero_grad(set_to_none=True)
        return mse.detach()

    @torch.no_grad()
    def evaluate(self, x_BD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        _, recon_BD, z_BF = self.sae(x_BD)
        active_BF = z_BF > 0
        return recon_BD / self.sae.input_scale, active_BF.sum(-1), active_BF.any(0)

    def aux_steps(self) -> int:
        return 0


class SAELensContender:
    """SAELens ``TopKTrainingSAE`` stepped like ``sae_lens.training.sae_trainer`` does (written against 6.x).

    Its own defaults are kept (decoder init norm 0.1, decoder-norm rescaling inside TopK, AuxK with
    ``k_aux = D / 2``, gradient clipping at 1.0); only the optimiser (Adam, shared ``lr``), input scale,
    decoder bias and dead-latent window follow the benchmark.
    """

    def __init__(
        self,
        d_model: int,
        n_latents: int,
        k: int,
        lr: float,
        device: torch.device,
        input_scale: float,
        mean_D: Tensor,
        dead_after: int,
        forced_dead_F: Tensor | None,
    ) -> None:
        import sae_lens
        from sae_lens.saes.sae import TrainStepInput

        self.version = str(getattr(sae_lens, "__version__", "?"))
        self._step_input = TrainStepInput
        cfg = sae_lens.TopKTrainingSAEConfig(
            d_in=d_model, d_sae=n_latents, k=k, device=str(device), dtype="float32"
        )
        self.sae = sae_lens.TopKTrainingSAE(cfg).to(device)
        with torch.no_grad():
            self.sae.b_dec.copy_(mean_D)
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=lr)
        self.input_scale, self.dead_after, self.forced_dead_F = input_scale, dead_after, forced_dead_F
        self.since_fired_F = torch.zeros(n_latents, dtype=torch.long, device=device)
        self.n_steps = 0
        self._aux_count = torch.zeros((), dtype=torch.long, device=device)

    def step(self, x_BD: Tensor) -> Tensor:
        self.sae.train()
        dead_F = self.since_fired_F > self.dead_after
        if self.forced_dead_F is not None:
            dead_F |= self.forced_dead_F
        out = self.sae.training_forward_pass(
            step_input=self._step_input(
                sae_in=x_BD.float() * self.input_scale,
                coefficients={},
                dead_neuron_mask=dead_F,
                n_training_steps=self.n_steps,
                is_logging_step=False,
            )
        )
        with torch.no_grad():
            fired_F = out.feature_acts.bool().float().sum(-2).bool()
            if fired_F.is_sparse:
                fired_F = fired_F.to_dense()
            self.since_fired_F += 1
            self.since_fired_F[fired_F] = 0
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.sae.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.n_steps += 1
        aux = out.losses.get("auxiliary_reconstruction_loss")
        if aux is not None:  # counted on the device: no extra synchronisation per step
            self._aux_count += (aux.detach() != 0).long()
        return out.losses["mse_loss"].detach()

    @torch.no_grad()
    def evaluate(self, x_BD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        self.sae.eval()
        try:
            acts_BF = self.sae.encode(x_BD.float() * self.input_scale)
            if acts_BF.is_sparse:
                acts_BF = acts_BF.to_dense()
            recon_BD = self.sae.decode(acts_BF) / self.input_scale
            active_BF = acts_BF > 0
            return recon_BD, active_BF.sum(-1), active_BF.any(0)
        finally:
            self.sae.train()

    def aux_steps(self) -> int:
        return int(self._aux_count)


class SparsifyContender:
    """EleutherAI sparsify's ``SparseCoder`` stepped like ``sparsify.trainer.Trainer`` does (sparsify 1.3).

    Per step, as its trainer: decoder rows renormalised before the forward, ``fvu`` normalised by the batch's
    total variance, ``loss = fvu + auxk_alpha * auxk_loss``, parallel gradient removed, optimiser step,
    dead-latent counters in tokens. Its defaults are kept: the ``signum`` optimiser (``ScheduleFreeWrapper``
    around ``SignSGD``, momentum 0.95, lr ``5e-3 / sqrt(F / 2**14)``), bf16 autocast of its forward on CUDA,
    its Triton decoder when Triton imports, its AuxK heuristic ``k_aux = D / 2``. AuxK is off by default in
    sparsify (``auxk_alpha = 0``); it is switched on (``auxk_alpha = 1/32``, as ours) only when latents are
    forced dead or in the quality mode's dead window. Inputs arrive already scaled (the normalised space).
    """

    def __init__(
        self,
        d_model: int,
        n_latents: int,
        k: int,
        seed: int,
        device: torch.device,
        mean_D: Tensor,
        dead_after: int,
        forced_dead_F: Tensor | None,
        input_scale: float,
        auxk_alpha: float,
    ) -> None:
        from schedulefree import ScheduleFreeWrapper

        SparseCoder, SparseCoderConfig, SignSGD, self.version = import_sparsify()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)  # as the trainer seeds each SAE (the global RNG is restored here)
            self.sae = SparseCoder(
                d_model, SparseCoderConfig(num_latents=n_latents, k=k), device, torch.float32
            )
        with torch.no_grad():
            self.sae.b_dec.copy_(mean_D)
        lr = 5e-3 / (n_latents / 2**14) ** 0.5
        self.opt = ScheduleFreeWrapper(SignSGD([{"params": self.sae.parameters(), "lr": lr}]), momentum=0.95)
        self.opt.train()
        self.input_scale, self.forced_dead_F = input_scale, forced_dead_F
        self.auxk_alpha = auxk_alpha
        self.threshold = dead_after  # in tokens: dead_after steps of one row each would be dead_after*batch
        self.since_fired_F = torch.zeros(n_latents, dtype=torch.long, device=device)
        self.did_fire_F = torch.zeros(n_latents, dtype=torch.bool, device=device)
        self._aux_count = torch.zeros((), dtype=torch.long, device=device)

    def step(self, x_BD: Tensor) -> Tensor:
        sae = self.sae
        x_BD = x_BD.float() * self.input_scale
        sae.set_decoder_norm_to_unit_norm()
        dead_mask = None
        if self.auxk_alpha > 0:
            dead_mask = self.since_fired_F > self.threshold * x_BD.shape[0]
            if self.forced_dead_F is not None:
                dead_mask |= self.forced_dead_F
        total_variance = (x_BD - x_BD.mean(0)).pow(2).sum()
        out = sae(x=x_BD, y=x_BD, dead_mask=dead_mask, total_variance=total_variance)
        self.did_fire_F[out.latent_indices.flatten()] = True
        loss = out.fvu + self.auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        self.opt.step()
        self.opt.zero_grad()
        with torch.no_grad():
            self.since_fired_F += x_BD.shape[0]
            self.since_fired_F[self.did_fire_F] = 0
            self.did_fire_F.zero_()
            self._aux_count += (out.auxk_loss.detach() != 0).long()
        return (out.fvu.detach() * total_variance / x_BD.shape[0]).float()

    @torch.no_grad()
    def evaluate(self, x_BD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        self.opt.eval()  # schedule-free: evaluate the averaged weights, as its trainer saves them
        try:
            out = self.sae(x=x_BD.float() * self.input_scale)
            fired_F = torch.zeros_like(self.did_fire_F)
            fired_F[out.latent_indices[out.latent_acts > 0]] = True
            return out.sae_out.float() / self.input_scale, (out.latent_acts > 0).sum(-1), fired_F
        finally:
            self.opt.train()

    def aux_steps(self) -> int:
        return int(self._aux_count)


def import_sparsify() -> tuple[Any, Any, Any, str]:
    """``(SparseCoder, SparseCoderConfig, SignSGD, version)`` from EleutherAI sparsify.

    ``import sparsify`` also imports its trainer and data modules (``datasets``, hence pandas / pyarrow);
    when that fails, the package's modules are loaded without its ``__init__`` (only ``sparse_coder``,
    ``config``, ``utils``, ``fused_encoder`` and ``sign_sgd``, which need einops, natsort, simple-parsing,
    transformers and accelerate).
    """
    import importlib
    import importlib.machinery
    import importlib.util
    import sys

    try:
        import sparsify
    except ImportError:
        spec = importlib.util.find_spec("sparsify")
        if spec is None or not spec.submodule_search_locations:
            raise
        for name in [m for m in sys.modules if m == "sparsify" or m.startswith("sparsify.")]:
            del sys.modules[name]  # a half-imported package from the failed attempt
        sparsify = importlib.util.module_from_spec(
            importlib.machinery.ModuleSpec("sparsify", None, is_package=True)
        )
        sparsify.__path__ = list(spec.submodule_search_locations)
        sys.modules["sparsify"] = sparsify
        init = Path(sparsify.__path__[0]) / "__init__.py"
        for line in init.read_text().splitlines():  # its __version__ line only
            if line.startswith("__version__"):
                setattr(sparsify, "__version__", line.split("=", 1)[1].strip().strip("\"'"))  # noqa: B010
    coder = importlib.import_module("sparsify.sparse_coder")
    config = importlib.import_module("sparsify.config")
    sign_sgd = importlib.import_module("sparsify.sign_sgd")
    version = str(getattr(sparsify, "__version__", "?"))
    return coder.SparseCoder, config.SparseCoderConfig, sign_sgd.SignSGD, version


def sparsify_status() -> tuple[bool, str]:
    """Whether sparsify's ``SparseCoder`` (and ``schedulefree``, its default optimiser) import, and a line."""
    try:
        import schedulefree  # noqa: F401

        *_, version = import_sparsify()
    except Exception as err:  # ImportError, or a missing dependency of its package import
        return False, f"sparsify is not importable ({type(err).__name__}: {err}); skipped"
    return True, f"eai-sparsify {version}"


def saelens_status() -> tuple[bool, str]:
    """Whether ``import sae_lens`` works, and a line saying so."""
    try:
        import sae_lens
    except Exception as err:  # ImportError, or a broken install of one of its dependencies
        return False, f"SAELens is not installed ({type(err).__name__}: {err}); skipped"
    return True, f"sae_lens {getattr(sae_lens, '__version__', '?')}"


# ---------------------------------------------------------------------------------------------- helpers
def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_name() -> str:
    """The CPU model from ``/proc/cpuinfo`` (or whatever :mod:`platform` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {torch.get_num_threads()} threads"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def free_memory(device: torch.device) -> None:
    """Drop what the previous contender left and reset the CUDA peak counter (no-op on CPU)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak CUDA memory since the last reset, in GiB (``None`` on CPU)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def set_tf32(enabled: bool) -> str:
    """Allow (or forbid) TF32 float32 matmuls for every contender; returns the matmul precision in force."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    return torch.get_float32_matmul_precision()


def forced_dead_mask(n_latents: int, fraction: float, seed: int, device: torch.device) -> Tensor | None:
    """A fixed random subset of ``fraction * n_latents`` latents, or ``None`` when ``fraction`` is 0."""
    n_dead = round(fraction * n_latents)
    if n_dead == 0:
        return None
    generator = torch.Generator().manual_seed(seed + 2)
    mask_F = torch.zeros(n_latents, dtype=torch.bool)
    mask_F[torch.randperm(n_latents, generator=generator)[:n_dead]] = True
    return mask_F.to(device)


def build_contender(
    name: str,
    *,
    d_model: int,
    n_latents: int,
    k: int,
    lr: float,
    seed: int,
    device: torch.device,
    input_scale: float,
    mean_D: Tensor,
    dead_after: int,
    forced_dead_F: Tensor | None,
    aux_alpha: float = 0.0,
    aux_k: int = 256,
) -> Contender:
    """Build one contender with its initial weights drawn from ``seed`` (the same for ours and plain).

    Names: ``ours``, ``ours-bf16`` (bfloat16 encoder product), ``ours-x<N>`` / ``ours-x<N>-streams`` /
    ``ours-bf16-x<N>...`` (``N`` seeds side by side, one optimiser), ``plain``, ``sparsify``, ``saelens``.
    ``aux_alpha`` switches sparsify's AuxK on (ours always has it).
    """

    def ours_sae(sae_seed: int, encoder_dtype: str) -> TopKSAE:
        gen = torch.Generator().manual_seed(sae_seed)
        sae = TopKSAE(
            d_model,
            n_latents,
            k,
            aux_k=aux_k,
            dead_after_steps=dead_after,
            generator=gen,
            encoder_dtype=encoder_dtype,
        )
        sae.set_input_scale(input_scale)
        with torch.no_grad():
            sae.b_dec_D.copy_(mean_D.cpu())
        return sae.to(device)

    generator = torch.Generator().manual_seed(seed)
    if name.startswith("ours"):
        base, _, rest = name.partition("-x")
        if base not in ("ours", "ours-bf16"):
            raise ValueError(f"unknown contender {name!r}")
        encoder_dtype = "bfloat16" if base == "ours-bf16" else "float32"
        if not rest:
            return OursContender(ours_sae(seed, encoder_dtype), lr, forced_dead_F)
        count, _, streams = rest.partition("-")
        if not count.isdigit() or streams not in ("", "streams"):
            raise ValueError(f"unknown contender {name!r}")
        saes = [ours_sae(seed + i, encoder_dtype) for i in range(int(count))]
        return OursSeedsContender(saes, lr, forced_dead_F, streams == "streams")
    if name == "sparsify":
        return SparsifyContender(
            d_model,
            n_latents,
            k,
            seed,
            device,
            mean_D.to(device),
            dead_after,
            forced_dead_F,
            input_scale,
            aux_alpha if forced_dead_F is None else 1.0 / 32.0,
        )
    if name == "plain":
        plain = PlainTopKSAE(d_model, n_latents, k, generator=generator)
        plain.input_scale = input_scale
        with torch.no_grad():
            plain.b_dec.copy_(mean_D.cpu())
        return PlainContender(plain.to(device), lr)
    if name == "saelens":
        return SAELensContender(
            d_model, n_latents, k, lr, device, input_scale, mean_D.to(device), dead_after, forced_dead_F
        )
    raise ValueError(f"unknown contender {name!r}")


def is_oom(err: BaseException) -> bool:
    """Whether ``err`` is an out-of-memory error (CUDA or host)."""
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


# ---------------------------------------------------------------------------------------------- throughput
def time_contender(contender: Contender, x_BD: Tensor, steps: int, warmup: int) -> dict[str, Any]:
    """Warm up, then time ``steps`` training steps one by one (synchronised on CUDA)."""
    device = x_BD.device
    first_mse = float(contender.step(x_BD))  # also the first warm-up step
    for _ in range(warmup - 1):
        contender.step(x_BD)
    synchronize(device)
    step_s: list[float] = []
    last = x_BD.new_zeros(())
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        last = contender.step(x_BD)
        synchronize(device)
        step_s.append(time.perf_counter() - start)
    batch = x_BD.shape[0]
    return {
        "status": "ok",
        "samples_per_s": steps * batch / sum(step_s),
        "step_ms_median": 1e3 * statistics.median(step_s),
        "step_ms_min": 1e3 * min(step_s),
        "step_ms_mean": 1e3 * statistics.fmean(step_s),
        "first_step_mse": first_mse,
        "last_step_mse": float(last),
        "aux_steps": contender.aux_steps(),
    }


def run_throughput(
    args: argparse.Namespace,
    device: torch.device,
    names: Sequence[str],
    n_latents: int | None = None,
    dead_fraction: float | None = None,
) -> dict[str, Any]:
    """Time every contender on one shared random batch; a failing contender is recorded, not raised."""
    n_latents = n_latents or args.d_model * args.expansion
    dead_fraction = args.dead_fraction if dead_fraction is None else dead_fraction
    dead_after = args.dead_after or DEFAULT_DEAD_AFTER
    data_gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    x_BD = torch.randn(args.batch, args.d_model, generator=data_gen, device=device)
    input_scale = mean_norm_scale(x_BD)
    mean_D = torch.zeros(args.d_model)
    forced_dead_F = forced_dead_mask(n_latents, dead_fraction, args.seed, device)
    results: dict[str, Any] = {}
    for name in names:
        free_memory(device)
        contender: Contender | None = None
        started = time.perf_counter()
        try:
            contender = build_contender(
                name,
                aux_k=args.aux_k,
                d_model=args.d_model,
                n_latents=n_latents,
                k=args.k,
                lr=args.lr,
                seed=args.seed,
                device=device,
                input_scale=input_scale,
                mean_D=mean_D,
                dead_after=dead_after,
                forced_dead_F=forced_dead_F,
            )
            result = time_contender(contender, x_BD, args.steps, args.warmup)
            n_seeds = len(getattr(contender, "saes", [None]))
            if n_seeds > 1:
                result["seeds"] = n_seeds
                result["step_ms_median_per_seed"] = result["step_ms_median"] / n_seeds
                result["samples_per_s_per_seed_equivalent"] = result["samples_per_s"] * n_seeds
        except Exception as err:  # one failing contender must not end the run: record it and go on
            result = {"status": "oom" if is_oom(err) else "failed", "error": f"{type(err).__name__}: {err}"}
        result["peak_mem_gib"] = peak_memory_gib(device)
        if isinstance(contender, SAELensContender | SparsifyContender):
            result["version"] = contender.version
        results[name] = result
        ok = result["status"] == "ok"
        print(
            f"  F={n_latents} dead={dead_fraction:g} {name}: "
            + (
                f"{result['samples_per_s']:.0f} samples/s"
                if ok
                else f"{result['status']} ({result['error']})"
            )
            + f" [{time.perf_counter() - started:.1f} s]",
            flush=True,
        )
        del contender
    free_memory(device)
    return results


def _rate(results: dict[str, Any], name: str) -> float | None:
    r = results.get(name, {})
    return r["samples_per_s"] if r.get("status") == "ok" else None


def ratios_of(results: dict[str, Any]) -> dict[str, float]:
    """``<ours variant>/<other>`` samples/s ratios for every pair that ran (``ours``, ``ours-bf16`` against
    ``plain``, ``sparsify``, ``saelens``), and each multi-seed contender's per-seed cost against ``ours``."""
    ratios: dict[str, float] = {}
    for mine in ("ours", "ours-bf16"):
        for other in ("plain", "sparsify", "saelens"):
            a, b = _rate(results, mine), _rate(results, other)
            if a is not None and b is not None:
                ratios[f"{mine}/{other}"] = a / b
    for name, r in results.items():
        alone = results.get(name.split("-x")[0], {})
        if r.get("seeds") and r.get("status") == "ok" and alone.get("status") == "ok":
            # < 1: a seed costs less side by side than alone
            ratios[f"{name} per-seed step / alone"] = r["step_ms_median_per_seed"] / alone["step_ms_median"]
    return ratios


def auxk_overheads(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Per ``F`` and ours variant: step time with latents forced dead over step time without, minus one."""
    overheads: dict[str, float] = {}
    clean = {run["n_latents"]: run for run in runs if run["dead_fraction"] == 0.0}
    for run in runs:
        base = clean.get(run["n_latents"])
        if run["dead_fraction"] == 0.0 or base is None:
            continue
        for name in ("ours", "ours-bf16", "sparsify"):
            a, b = _rate(base["contenders"], name), _rate(run["contenders"], name)
            if a is not None and b is not None:
                overheads[f"{name} F={run['n_latents']} dead={run['dead_fraction']:g}"] = a / b - 1.0
    return overheads


# ---------------------------------------------------------------------------------------------- quality
class SyntheticActivations:
    """A fixed low-rank + sparse distribution over ``R^D``.

    ``x = mean + sum_{i in S} m_i d_i + U^T g + noise``: ``|S| = n_active`` ground-truth features drawn with
    Zipf-like frequencies from ``n_features`` random unit directions, magnitudes ``m_i ~ Exp(1)``, a
    rank-``rank`` Gaussian component ``U^T g`` (30% of the sparse part's RMS) and small isotropic noise.

    Args:
        d_model: Input width.
        n_features: Number of ground-truth sparse directions.
        n_active: Ground-truth features per sample.
        rank: Rank of the dense component.
        seed: Seed of the distribution's parameters (fixed for the whole run).
        device: Where samples are drawn.
    """

    def __init__(
        self, d_model: int, n_features: int, n_active: int, rank: int, seed: int, device: torch.device
    ) -> None:
        generator = torch.Generator().manual_seed(seed)
        dict_FD = torch.randn(n_features, d_model, generator=generator)
        self.dict_FD = (dict_FD / dict_FD.norm(dim=1, keepdim=True)).to(device)
        probs_F = torch.arange(1, n_features + 1, dtype=torch.float64).pow(-0.8)
        self.probs_F = (probs_F / probs_F.sum()).float().to(device)
        sparse_rms = math.sqrt(2.0 * n_active / d_model)  # E[m^2] = 2 for Exp(1)
        self.U_RD = (torch.randn(rank, d_model, generator=generator) * 0.3 * sparse_rms / math.sqrt(rank)).to(
            device
        )
        self.mean_D = (torch.randn(d_model, generator=generator) * sparse_rms).to(device)
        self.noise = 0.05 * sparse_rms
        self.n_active, self.rank, self.device = n_active, rank, device

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """Draw ``n`` rows (``generator`` must live on the distribution's device)."""
        idx_NA = torch.multinomial(self.probs_F, n * self.n_active, replacement=True, generator=generator)
        idx_NA = idx_NA.view(n, self.n_active)
        mags_NA = torch.empty(n, self.n_active, device=self.device).exponential_(1.0, generator=generator)
        x_ND = F.embedding_bag(idx_NA, self.dict_FD, per_sample_weights=mags_NA, mode="sum")
        x_ND += torch.randn(n, self.rank, generator=generator, device=self.device) @ self.U_RD
        x_ND += self.noise * torch.randn(x_ND.shape, generator=generator, device=self.device)
        return x_ND + self.mean_D


def load_acts(path: Path, key: str | None) -> Tensor:
    """Read an ``(N, D)`` activation tensor from a ``.pt`` / ``.safetensors`` file (float32, CPU).

    Raises:
        ValueError: If the file holds several tensors and ``key`` does not pick one, or the tensor is not 2-D.
    """
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: Any = load_file(str(path))
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict):
        if key is not None:
            obj = obj[key]
        elif len(obj) == 1:
            obj = next(iter(obj.values()))
        else:
            raise ValueError(f"{path} holds {sorted(obj)}; pick one with --acts-key")
    if not isinstance(obj, Tensor) or obj.ndim != 2:
        raise ValueError(f"{path}: expected an (N, D) tensor, got {getattr(obj, 'shape', type(obj))}")
    return obj.float()


def make_data(
    args: argparse.Namespace, device: torch.device, n_latents: int
) -> tuple[Callable[[], Iterator[Tensor]], Tensor, Tensor, str]:
    """``(stream factory, calibration rows, held-out rows, description)``.

    Each call of the factory starts the same deterministic stream of training batches, so every contender
    sees identical batches in identical order.
    """
    batch, seed = args.batch, args.seed
    if args.acts is not None:
        acts_ND = load_acts(Path(args.acts), args.acts_key)
        n_rows = acts_ND.shape[0]
        n_eval = min(args.eval_rows, n_rows // 5)
        if n_eval < 1 or n_rows - n_eval < batch:
            raise ValueError(f"--acts has {n_rows} rows: too few for --batch {batch} plus held-out rows")
        perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed + 3))
        eval_ND = acts_ND[perm[:n_eval]].to(device)
        train_ND = acts_ND[perm[n_eval:]].to(device)

        def file_stream() -> Iterator[Tensor]:
            generator = torch.Generator().manual_seed(seed + 4)
            while True:
                order = torch.randperm(train_ND.shape[0], generator=generator).to(device)
                for start in range(0, train_ND.shape[0] - batch + 1, batch):
                    yield train_ND[order[start : start + batch]]

        calib_ND = train_ND[: min(train_ND.shape[0], 16384)]
        return file_stream, calib_ND, eval_ND, f"{args.acts} ({n_rows} x {acts_ND.shape[1]})"

    dist = SyntheticActivations(
        args.d_model, n_latents, max(1, args.k // 2), args.synthetic_rank, seed + 5, device
    )

    def synthetic_stream() -> Iterator[Tensor]:
        generator = torch.Generator(device=device).manual_seed(seed + 6)
        while True:
            yield dist.sample(batch, generator)

    calib_ND = dist.sample(max(batch, 4096), torch.Generator(device=device).manual_seed(seed + 7))
    eval_ND = dist.sample(args.eval_rows, torch.Generator(device=device).manual_seed(seed + 8))
    description = (
        f"synthetic low-rank + sparse: {n_latents} Zipf features, {max(1, args.k // 2)} active per row, "
        f"rank {args.synthetic_rank}"
    )
    return synthetic_stream, calib_ND, eval_ND, description


@torch.no_grad()
def held_out_metrics(contender: Contender, eval_ND: Tensor, batch: int) -> dict[str, float]:
    """FVU (over all held-out rows, around their mean), mean L0 and the fraction of latents never active."""
    sq_err = 0.0
    l0_sum = 0.0
    fired_F: Tensor | None = None
    for start in range(0, eval_ND.shape[0], batch):
        x_BD = eval_ND[start : start + batch]
        recon_BD, active_B, fired = contender.evaluate(x_BD)
        sq_err += float((recon_BD.float() - x_BD).pow(2).sum())
        l0_sum += float(active_B.float().sum())
        fired_F = fired if fired_F is None else fired_F | fired
    total = float((eval_ND - eval_ND.mean(0, keepdim=True)).pow(2).sum())
    assert fired_F is not None
    return {
        "fvu": sq_err / max(total, 1e-12),
        "l0": l0_sum / eval_ND.shape[0],
        "never_active_fraction": 1.0 - float(fired_F.float().mean()),
    }


def run_quality(args: argparse.Namespace, device: torch.device, names: Sequence[str]) -> dict[str, Any]:
    """Train every contender on the same batches and score it on held-out rows."""
    n_latents = args.n_latents_list[0]
    stream, calib_ND, eval_ND, description = make_data(args, device, n_latents)
    input_scale = mean_norm_scale(calib_ND)
    mean_D = (calib_ND.mean(0) * input_scale).cpu()
    dead_after = args.dead_after or max(1, args.quality_steps // 10)
    results: dict[str, Any] = {}
    for name in names:
        free_memory(device)
        try:
            contender = build_contender(
                name,
                aux_k=args.aux_k,
                d_model=args.d_model,
                n_latents=n_latents,
                k=args.k,
                lr=args.lr,
                seed=args.seed,
                device=device,
                input_scale=input_scale,
                mean_D=mean_D,
                dead_after=dead_after,
                forced_dead_F=None,
                aux_alpha=1.0 / 32.0,
            )
            batches = stream()
            synchronize(device)
            start = time.perf_counter()
            mse = torch.zeros(())
            for _ in range(args.quality_steps):
                mse = contender.step(next(batches))
            synchronize(device)
            seconds = time.perf_counter() - start
            result: dict[str, Any] = {
                "status": "ok",
                **held_out_metrics(contender, eval_ND, args.batch),
                "train_mse_last": float(mse),
                "train_seconds": seconds,
                "aux_steps": contender.aux_steps(),
            }
            if isinstance(contender, SAELensContender | SparsifyContender):
                result["version"] = contender.version
            del contender
        except Exception as err:  # recorded: one failing contender must not end the run
            result = {"status": "oom" if is_oom(err) else "failed", "error": f"{type(err).__name__}: {err}"}
        result["peak_mem_gib"] = peak_memory_gib(device)
        results[name] = result
        print(f"  {name}: {result.get('fvu', result.get('error'))}", flush=True)
    free_memory(device)
    return {
        "data": description,
        "eval_rows": int(eval_ND.shape[0]),
        "input_scale": input_scale,
        "dead_after_steps": dead_after,
        "contenders": results,
    }


# ---------------------------------------------------------------------------------------------- report
def _mem(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def throughput_table(results: dict[str, Any]) -> str:
    """The throughput results as a Markdown table."""
    lines = [
        "| contender | samples/s | step ms (median) | peak mem GiB | AuxK steps | first-step MSE | status |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in results.items():
        if r.get("status") != "ok":
            lines.append(f"| {name} | - | - | {_mem(r.get('peak_mem_gib'))} | - | - | {r.get('status')} |")
            continue
        lines.append(
            f"| {name} | {r['samples_per_s']:.1f} | {r['step_ms_median']:.2f} | {_mem(r['peak_mem_gib'])} | "
            f"{r['aux_steps']} | {r['first_step_mse']:.4f} | ok |"
        )
    return "\n".join(lines)


def quality_table(results: dict[str, Any]) -> str:
    """The quality results as a Markdown table."""
    lines = [
        "| contender | held-out FVU | held-out L0 | never active | AuxK steps | train s | status |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in results.items():
        if r.get("status") != "ok":
            lines.append(f"| {name} | - | - | - | - | - | {r.get('status')} |")
            continue
        lines.append(
            f"| {name} | {r['fvu']:.4f} | {r['l0']:.2f} | {r['never_active_fraction']:.3f} | "
            f"{r['aux_steps']} | {r['train_seconds']:.1f} | ok |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--aux-k", type=int, default=256, help="ours: dead latents in the AuxK loss")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--d-model", type=int, default=4096)
    parser.add_argument("--expansion", type=int, default=16, help="n_latents = expansion * d_model")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=20, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed training steps first (>= 1)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (all contenders)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--tf32", action="store_true", help="allow TF32 float32 matmuls for every contender (default: off)"
    )
    parser.add_argument(
        "--dead-after",
        type=int,
        default=None,
        help="dead_after_steps of the AuxK contenders (default: 1000 for throughput, quality-steps/10 for "
        "--quality)",
    )
    parser.add_argument(
        "--dead-fraction",
        default="0",
        help="throughput only: keep this fraction of latents marked dead so the AuxK path runs every step; "
        "a comma list (e.g. 0,0.5) runs each (default 0: no latent is dead within a short benchmark, so AuxK "
        "costs only its dead-latent check)",
    )
    parser.add_argument(
        "--n-latents",
        default=None,
        help="comma list of dictionary sizes, e.g. 65536,131072 (default: expansion * d_model); each is run",
    )
    parser.add_argument("--bf16", action="store_true", help="add ours-bf16 (TopKSAE encoder_dtype=bfloat16)")
    parser.add_argument(
        "--sparsify",
        action="store_true",
        help="add EleutherAI sparsify's SparseCoder (skipped if not importable)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="throughput: also step this many TopKSAE seeds side by side (one optimiser; and on CUDA one "
        "stream per seed), at the first --dead-fraction only, and report the per-seed cost against one alone",
    )
    parser.add_argument("--no-saelens", action="store_true", help="skip SAELens even if it is installed")
    parser.add_argument("--quality", action="store_true", help="train and compare held-out FVU / L0 instead")
    parser.add_argument("--quality-steps", type=int, default=1000)
    parser.add_argument("--eval-rows", type=int, default=4096, help="held-out rows for --quality")
    parser.add_argument("--acts", default=None, help="(N, D) activations (.pt / .safetensors) for --quality")
    parser.add_argument("--acts-key", default=None, help="tensor name in --acts when it holds several")
    parser.add_argument("--synthetic-rank", type=int, default=16, help="rank of the synthetic dense part")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print a Markdown report, write ``--out``; returns the JSON record."""
    args = build_parser().parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.quality_steps < 1:
        raise SystemExit("--warmup, --steps and --quality-steps must be >= 1")
    try:
        args.dead_fractions = [float(v) for v in str(args.dead_fraction).split(",")]
    except ValueError:
        raise SystemExit(
            f"--dead-fraction: expected numbers separated by commas, got {args.dead_fraction!r}"
        ) from None
    if not all(0.0 <= f < 1.0 for f in args.dead_fractions):
        raise SystemExit("--dead-fraction must be in [0, 1)")
    if args.seeds < 1:
        raise SystemExit("--seeds must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    precision = set_tf32(args.tf32)
    if args.acts is not None:
        if not args.quality:
            raise SystemExit("--acts is only used with --quality")
        args.d_model = int(load_acts(Path(args.acts), args.acts_key).shape[1])
    if args.n_latents:
        try:
            args.n_latents_list = [int(v) for v in str(args.n_latents).split(",")]
        except ValueError:
            raise SystemExit(
                f"--n-latents: expected integers separated by commas, got {args.n_latents!r}"
            ) from None
        if min(args.n_latents_list) < args.k:
            raise SystemExit("--n-latents must all be >= --k")
    else:
        args.n_latents_list = [args.d_model * args.expansion]
    n_latents = args.n_latents_list[0]

    have_saelens, saelens_line = saelens_status()
    names = ["ours"] + (["ours-bf16"] if args.bf16 else []) + ["plain"]
    if have_saelens and not args.no_saelens:
        names.append("saelens")
    notes = [PLAIN_NOTE, "ours = sae_refusal TopKSAE with AuxK (aux_k 256) and its decoder-norm duties"]
    if args.bf16:
        notes.append("ours-bf16 = ours with encoder_dtype='bfloat16' (fp32 master weights and gradients)")
    notes.append(saelens_line if not args.no_saelens else "SAELens skipped (--no-saelens)")
    sparsify_skipped: str | None = None
    if args.sparsify:
        have_sparsify, sparsify_line = sparsify_status()
        notes.append(sparsify_line)
        if have_sparsify:
            names.append("sparsify")
            notes.append(
                "sparsify = SparseCoder stepped like its Trainer (signum = ScheduleFree SignSGD, bf16 "
                "autocast forward on CUDA, unit-norm decoder before each forward); AuxK (its k_aux = D/2, "
                "alpha 1/32 as ours) only when latents are forced dead"
            )
        else:
            sparsify_skipped = sparsify_line

    config: dict[str, Any] = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "d_model": args.d_model,
        "n_latents": n_latents,
        "n_latents_list": args.n_latents_list,
        "expansion": args.expansion,
        "k": args.k,
        "batch": args.batch,
        "lr": args.lr,
        "seed": args.seed,
        "param_dtype": "float32",
        "tf32": args.tf32,
        "matmul_precision": precision,
    }
    print(
        f"# TopK SAE {'quality' if args.quality else 'training throughput'}: D={args.d_model}, "
        f"F={','.join(map(str, args.n_latents_list))}, k={args.k}, batch={args.batch}, "
        f"{config['device']} ({config['device_name']}), "
        f"fp32 params, TF32 {'on' if args.tf32 else 'off'} (matmul precision '{precision}'), torch "
        f"{torch.__version__}"
    )
    record: dict[str, Any] = {"config": config, "notes": notes}
    if args.quality:
        config["quality_steps"] = args.quality_steps
        quality = run_quality(args, device, names)
        record.update(mode="quality", **quality)
        results = quality["contenders"]
        print(
            f"data: {quality['data']}; {args.quality_steps} steps; held-out rows {quality['eval_rows']}; "
            f"dead_after_steps {quality['dead_after_steps']}\n"
        )
        print(quality_table(results))
        if results["ours"].get("status") == "ok" and results["plain"].get("status") == "ok":
            record["fvu_ours_minus_plain"] = results["ours"]["fvu"] - results["plain"]["fvu"]
            print(f"\nheld-out FVU ours - plain: {record['fvu_ours_minus_plain']:+.4f} (matched k={args.k})")
        for other in ("ours-bf16", "sparsify"):
            if results["ours"].get("status") == "ok" and results.get(other, {}).get("status") == "ok":
                key = f"fvu_{other.replace('-', '_')}_minus_ours"
                record[key] = results[other]["fvu"] - results["ours"]["fvu"]
                print(f"held-out FVU {other} - ours: {record[key]:+.4f}")
    else:
        config.update(steps=args.steps, warmup=args.warmup, dead_fraction=args.dead_fractions[0])
        config.update(dead_fractions=args.dead_fractions, seeds=args.seeds)
        config["dead_after_steps"] = args.dead_after or DEFAULT_DEAD_AFTER
        print(f"{args.warmup} warm-up + {args.steps} timed steps (forward + backward + optimiser step)\n")
        runs: list[dict[str, Any]] = []
        for n_lat in args.n_latents_list:
            for i, fraction in enumerate(args.dead_fractions):
                run_names = list(names)
                if args.seeds > 1 and i == 0:
                    base = "ours-bf16" if args.bf16 else "ours"
                    run_names.append(f"{base}-x{args.seeds}")
                    if device.type == "cuda":
                        run_names.append(f"{base}-x{args.seeds}-streams")
                results = run_throughput(args, device, run_names, n_lat, fraction)
                if sparsify_skipped is not None:
                    results["sparsify"] = {"status": "skipped", "error": sparsify_skipped}
                run = {"n_latents": n_lat, "dead_fraction": fraction, "contenders": results}
                run["ratios"] = ratios_of(results)
                runs.append(run)
                print(f"\n## F={n_lat}, dead fraction {fraction:g}\n")
                print(throughput_table(results))
                for key, value in run["ratios"].items():
                    print(f"- {key}: {value:.2f}x")
                print(flush=True)
        record.update(mode="throughput", runs=runs, contenders=runs[0]["contenders"])
        record["auxk_step_time_overhead"] = auxk_overheads(runs)
        for key, value in record["auxk_step_time_overhead"].items():
            print(f"- AuxK step-time overhead {key}: {100 * value:+.1f}%")
        results = runs[0]["contenders"]
        ours, plain = results["ours"], results["plain"]
        if ours.get("status") == "ok" and plain.get("status") == "ok":
            record["speedup_ours_over_plain"] = ours["samples_per_s"] / plain["samples_per_s"]
            line = f"\nspeed ours/plain (first run): {record['speedup_ours_over_plain']:.2f}x"
            if ours["peak_mem_gib"] is not None and plain["peak_mem_gib"] is not None:
                record["peak_mem_ratio_ours_over_plain"] = ours["peak_mem_gib"] / plain["peak_mem_gib"]
                line += f"; peak memory ours/plain: {record['peak_mem_ratio_ours_over_plain']:.2f}x"
            print(line)
        if not any(run["contenders"]["ours"].get("aux_steps") for run in runs):
            notes.append(
                "AuxK never ran in the timed steps (no latent was dead); --dead-fraction 0,0.5 times it"
            )
    print()
    for note in notes:
        print(f"- {note}")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2))
        print(f"\nwrote {out}")
    return record


if __name__ == "__main__":
    main()
