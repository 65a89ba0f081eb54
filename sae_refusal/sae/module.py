"""``SAEModule``: a thin LightningModule training one SAE per seed, side by side on the same batches.

The SAEs are plain modules (:mod:`sae_refusal.sae.topk`, :mod:`sae_refusal.sae.relu`) built by the configured
architecture (:mod:`sae_refusal.sae.architectures`); this class only wires losses, the decoder constraint,
dead-latent bookkeeping, metrics and the export. Each seed has its own ``torch.Generator`` for its weights and
its own parameters, so training them together is the same as training each alone on the same batches (Adam is
per parameter; nothing couples the seeds).

With ``stack_seeds`` (TopK only) the seeds train as one batched module
(:class:`~sae_refusal.sae.stacked.StackedTopKSAE`: one batched encoder product, one sparse decode, one
decoder-norm kernel for all seeds) with the same per-seed results. Everything that reads or writes a seed goes
through :meth:`SAEModule.named_saes`, which then gives each seed as a :class:`~sae_refusal.sae.topk.TopKSAE`
viewing the stacked tensors (exports, callbacks and the fit-start statistics are unchanged); checkpoints hold
the stacked tensors (``stacked.*``), so a stacked fit resumes from a stacked checkpoint only.

At the start of fit (once; a resumed run keeps the stored values) the input scale is set from the training
split so that the mean activation norm is ``sqrt(d_model)``, and every seed's decoder bias starts at the
(normalised) mean activation. Metrics per seed go to ``{stage}/seed{n}/...``: ``mse``, ``fvu``, ``l0``,
``loss``, the architecture's terms (``aux``, ``l1``, ``supcon``, ``separation``), ``dead_fraction`` per epoch,
``shrinkage`` (validation and test: the split's mean of ``||x_hat|| / ||x||``) and per class FVU (benign,
ambiguous and each harmful category) on validation and test. Validation and test
``fvu`` is computed once over the whole split (sum of squared errors / total variance about the split's mean),
never averaged over batches (a 1-row batch has no variance); the per-step training ``fvu`` divides by the
squared distance to the training mean for the same reason.

The architecture is kept in the hyperparameters as ``{"class_path", "init_args"}`` (plain data), so
``SAEModule.load_from_checkpoint`` and ``sae-refusal validate|test --ckpt_path`` rebuild exactly the trained
SAE. Each checkpoint also records what the SAEs were trained on (``layer``, ``d_model``, ``model``,
``model_fingerprint``: :data:`~sae_refusal.sae.provenance.CHECKPOINT_KEY`), and a trainer restoring one onto
a data module serving another layer, model or width refuses it (:meth:`SAEModule.on_load_checkpoint`).

A non-finite loss raises :class:`FloatingPointError` naming the step and the seed before any optimiser step;
the exports (``<log_dir>/sae/seed{n}/cfg.json`` + ``sae.safetensors``) are written only at the end of a
successful fit, each atomically, on global rank zero.

Under DDP a fit with per-rank batch ``B / world_size`` matches a one-process fit with batch ``B``: the losses
are means over rows (DDP averages the gradients), dead latents are OR-ed over ranks, and during the fit each
TopK SAE's AuxK normaliser (the batch's residual energy) is the mean over ranks (``rank_mean``,
unset again at the end of the fit). Every epoch-level metric is reduced over ranks by this module (one
all-reduce per seed) and is the whole split's value, the same on every rank: the evaluation loaders pad the
split to equal shards (:class:`~sae_refusal.activations.datamodule.PaddedEvalDataset`) and the repeated rows
(``valid`` false) are left out. Validation and test ``mse``, ``l0``, ``loss`` and the architecture's terms are
means over the split's batches weighted by their rows (for per-row quantities such as ``mse`` and ``l0``, the
split's mean).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import lightning as L
import torch
from lightning.pytorch.strategies import Strategy

from sae_refusal.activations.datamodule import LABEL_INDEX
from sae_refusal.categories import CATEGORY_SHORT_NAMES
from sae_refusal.distributed import destroy_process_group_at_exit
from sae_refusal.llm.loading import LLMConfig, model_fingerprint
from sae_refusal.sae.architectures import SAEArchitecture, TopK, architecture_from_config
from sae_refusal.sae.base import SAEOutput, SparseAutoencoder, start_from_data
from sae_refusal.sae.provenance import CHECKPOINT_KEY, check_checkpoint_matches_data
from sae_refusal.sae.settings import check_module_settings, check_stack_seeds
from sae_refusal.sae.stacked import StackedTopKSAE
from sae_refusal.sae.topk import TopKSAE

__all__ = ["EVAL_CLASS_NAMES", "SAEModule", "class_names_of_batch"]

#: Classes of the per-class metrics: index of :func:`class_names_of_batch`.
EVAL_CLASS_NAMES = ["benign", "ambiguous", *CATEGORY_SHORT_NAMES.values()]


class _MeanOverRanks:
    """``rank_mean`` of a TopK SAE under DDP: the mean of a scalar over the ranks (an all-reduce).

    The input (the AuxK normaliser) is detached; the result carries no graph.

    Args:
        strategy: The running strategy (its ``reduce`` is the all-reduce).
    """

    def __init__(self, strategy: Strategy):
        self.strategy = strategy

    def __call__(self, value: torch.Tensor) -> torch.Tensor:
        # `reduce` works in place: reduce a copy
        return torch.as_tensor(self.strategy.reduce(value.detach().clone(), reduce_op="mean"))


def _join_device_streams(device: torch.device) -> None:
    """Wait for all work queued on ``device``, on every stream (CUDA only; elsewhere nothing to do)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def class_names_of_batch(label_B: torch.Tensor, category_B: torch.Tensor) -> torch.Tensor:
    """Per-row index into ``benign, ambiguous, <harmful categories>`` (harmful rows by their category)."""
    out_B = torch.where(label_B == LABEL_INDEX["ambiguous"], 1, 0)
    harmful_B = label_B == LABEL_INDEX["harmful"]
    return torch.where(harmful_B, category_B + 1, out_B)  # category codes 1..C -> 2..C+1


class SAEModule(L.LightningModule):
    """Train sparse autoencoders (one per seed) on residual activations.

    Args:
        d_model: Input width (linked from the data module; leave unset in configs).
        architecture: ``TopK``, ``L1`` or ``Contrastive`` (``class_path`` in YAML); default ``TopK(k=32)``.
        expansion_factor: Latents per input dimension.
        seeds: One SAE per seed, each initialised from its own generator.
        lr: Adam learning rate.
        normalize_inputs: Scale inputs to mean norm ``sqrt(d_model)`` (stored with each SAE).
        stack_seeds: Train the seeds as one batched module (:class:`~sae_refusal.sae.stacked.StackedTopKSAE`;
            ``TopK`` architecture only): the same per-seed results and exports, fewer and larger kernels.
            Its checkpoints hold the stacked tensors: resume a stacked fit with ``stack_seeds`` on.

    Attributes:
        saes: The seeds' SAEs (``seed{n}`` -> SAE), trained as they are; empty with ``stack_seeds``.
        stacked: The trained :class:`~sae_refusal.sae.stacked.StackedTopKSAE` with ``stack_seeds``, else
            ``None``. Read the seeds through :meth:`named_saes` either way.

    Raises:
        ValueError: On a setting out of range, naming its key (``model.stack_seeds`` with another
            architecture than ``TopK``).
    """

    def __init__(
        self,
        d_model: int,
        architecture: SAEArchitecture | None = None,
        expansion_factor: int = 8,
        seeds: list[int] | None = None,
        lr: float = 1e-3,
        normalize_inputs: bool = True,
        stack_seeds: bool = False,
    ):
        super().__init__()
        if isinstance(architecture, dict):  # as kept in a checkpoint's hyperparameters
            architecture = architecture_from_config(architecture)
        self.architecture = architecture or TopK()
        self.save_hyperparameters(ignore=["architecture"])
        # the architecture as plain data (class_path + init_args), so a checkpoint rebuilds exactly what was
        # trained, also under `--ckpt_path` (LightningCLI re-parses these) and with weights_only loading
        self.hparams["architecture"] = self.architecture.config()
        seeds = [0] if seeds is None else list(seeds)
        if d_model < 1:
            raise ValueError(f"model.d_model must be >= 1, got {d_model}")
        check_module_settings(expansion_factor, seeds, lr)  # the rules `fit` also checks before any import
        arch_name = "TopK" if type(self.architecture) is TopK else type(self.architecture).__name__
        check_stack_seeds(stack_seeds, arch_name)
        self.seeds, self.lr, self.normalize_inputs = seeds, lr, normalize_inputs
        n_latents = expansion_factor * d_model
        built = (self.architecture.build(d_model, n_latents, torch.Generator().manual_seed(s)) for s in seeds)
        self.stacked: StackedTopKSAE | None = None
        if stack_seeds:  # each seed built as alone, then copied into the stack (one seed's weights at a time)
            self.saes = torch.nn.ModuleDict()
            self.stacked = StackedTopKSAE.from_saes(cast(Iterator[TopKSAE], built), n_seeds=len(seeds))
        else:
            self.saes = torch.nn.ModuleDict({f"seed{s}": sae for s, sae in zip(seeds, built, strict=True)})
        self.stats_ready: torch.Tensor
        self.data_mean_D: torch.Tensor
        self.register_buffer("stats_ready", torch.tensor(False))
        self.register_buffer("data_mean_D", torch.zeros(d_model))
        self._fired: dict[str, torch.Tensor] = {}
        self._class_sums: dict[str, dict[str, Any]] = {}
        self._data_record: dict[str, Any] | None = None

    @property
    def _bar_seed(self) -> str:
        """The seed whose training loss and val FVU the progress bar shows (the first one)."""
        return f"seed{self.seeds[0]}"

    def named_saes(self) -> list[tuple[str, SparseAutoencoder]]:
        """``(seed{n}, SAE)`` pairs in seed order.

        With ``stack_seeds``, :class:`~sae_refusal.sae.topk.TopKSAE` views of the stacked tensors
        (:meth:`~sae_refusal.sae.stacked.StackedTopKSAE.seed_saes`): what they read is current, what they
        write lands in the stack, they are not trained through.
        """
        if self.stacked is not None:
            return [(f"seed{s}", sae) for s, sae in zip(self.seeds, self.stacked.seed_saes(), strict=True)]
        return [(name, cast(SparseAutoencoder, sae)) for name, sae in self.saes.items()]

    def _trained(self) -> list[torch.nn.Module]:
        """The modules the optimiser steps: the stack, or each seed's SAE."""
        return [self.stacked] if self.stacked is not None else list(self.saes.values())

    def _forward_seeds(self, acts_BD: torch.Tensor) -> list[tuple[str, SparseAutoencoder, SAEOutput]]:
        """Every seed's name, SAE (:meth:`named_saes`) and output on ``acts_BD`` (the stack: one forward)."""
        named = self.named_saes()
        if self.stacked is not None:
            outs = self.stacked(acts_BD, return_latents=self.architecture.needs_latents)
        else:
            outs = [sae(acts_BD, return_latents=self.architecture.needs_latents) for _, sae in named]
        return [(name, sae, out) for (name, sae), out in zip(named, outs, strict=True)]

    def setup(self, stage: str) -> None:
        # a gloo group left to interpreter finalisation can abort a finished DDP run (sae_refusal.distributed)
        destroy_process_group_at_exit()

    def teardown(self, stage: str) -> None:
        self._set_rank_mean(None)

    def _set_rank_mean(self, reducer: _MeanOverRanks | None) -> None:
        """Set (or unset) every seed's AuxK normaliser reduction (SAEs without AuxK lack the attribute)."""
        if self.stacked is not None:  # the stack's forward reads its own (its seed views copy it)
            self.stacked.rank_mean = reducer
        for _, sae in self.named_saes():
            if hasattr(sae, "rank_mean"):
                cast(Any, sae).rank_mean = reducer  # a plain attribute (TopKSAE)

    # ------------------------------------------------------------------ data statistics
    def on_fit_start(self) -> None:
        # Lightning builds the DDP wrapper on a side CUDA stream and does not join it: DDP's initial
        # broadcast of the parameters and buffers copies them back (old values, rank 0's too) on that stream,
        # asynchronously. Without this wait those copies can land after the writes below (on the default
        # stream) and undo them on every rank: a DDP fit on GPUs then trained with input_scale 1 and a zero
        # decoder bias (benchmarks/ddp_scaling.py found it). Once per fit; a no-op off CUDA.
        _join_device_streams(self.device)
        if self.trainer.world_size > 1:
            # the AuxK loss is normalised by the mean residual energy over ranks, so DDP's mean of the
            # per-rank gradients is the one-process gradient of the global batch
            self._set_rank_mean(_MeanOverRanks(self.trainer.strategy))
        if bool(self.stats_ready):
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        splits = getattr(datamodule, "splits", None) or {}
        if "train" not in splits:
            raise RuntimeError("SAEModule needs a data module with a `train` split (ActivationDataModule)")
        acts_ND = splits["train"].acts_ND
        with torch.no_grad():
            saes = [sae for _, sae in self.named_saes()]
            self.data_mean_D.copy_(start_from_data(saes, acts_ND, normalize_inputs=self.normalize_inputs))
            self.stats_ready.fill_(True)

    # ------------------------------------------------------------------ training
    def _seed_loss(
        self,
        name: str,
        sae: SparseAutoencoder,
        batch: dict[str, torch.Tensor],
        stage: str,
        out: SAEOutput | None = None,
    ) -> tuple[torch.Tensor, SAEOutput, dict[str, torch.Tensor]]:
        """Loss and output of one seed on a batch; logs the training metrics (per step, this rank's batch).

        Args:
            name: The seed's name (``seed{n}``).
            sae: The seed's SAE.
            batch: The batch.
            stage: ``train``, ``val`` or ``test``.
            out: The seed's output on the batch when already computed (:meth:`_forward_seeds`), else ``sae``
                runs it.

        Returns:
            The loss, the SAE output, and the batch's metrics (detached; evaluation accumulates them).
        """
        if out is None:
            out = sae(batch["acts"], return_latents=self.architecture.needs_latents)
        loss = out.loss
        terms = dict(out.parts)
        extras = self.architecture.extra_losses(out, batch)
        for term, weight in self.architecture.loss_weights().items():
            if weight:
                loss = loss + weight * extras[term]
        terms.update(extras)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite SAE loss ({loss.item()}) at step {self.global_step} for {name} "
                f"(mse {out.mse.item()}, terms { {k: v.item() for k, v in terms.items()} }); stopping "
                "before the optimiser step, nothing exported. Try a lower model.lr"
            )
        n = batch["acts"].shape[0]
        metrics = {"mse": out.mse, "l0": out.l0, "loss": loss, **terms}
        if stage == "train":
            # against the training mean, not the batch's own: a 1-row batch has no variance of its own
            # (validation and test FVU are computed over the whole split at epoch end)
            x_BD = batch["acts"].float() * sae.input_scale
            var = (x_BD - self.data_mean_D).pow(2).sum().clamp_min(1e-12)
            metrics["fvu"] = out.mse.detach() * n / var
        metrics = {k: v.detach() for k, v in metrics.items()}
        if stage == "train":  # per step (this rank's batch); evaluation metrics are logged at epoch end
            # the progress bar shows the first seed's training loss (and its val FVU, logged at epoch end)
            on_bar = {"loss"} if name == self._bar_seed else set()
            self.log_dict(
                {f"{stage}/{name}/{k}": v for k, v in metrics.items() if k not in on_bar},
                batch_size=n,
                prog_bar=False,
            )
            for k in on_bar:
                self.log(f"{stage}/{name}/{k}", metrics[k], batch_size=n, prog_bar=True)
        return loss, out, metrics

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        total = batch["acts"].new_zeros(())
        seeds = self._forward_seeds(batch["acts"])
        for name, sae, out in seeds:
            loss, _, _ = self._seed_loss(name, sae, batch, "train", out)
            total = total + loss
        # one OR over the ranks for all seeds (every rank then sees the same dead latents)
        fired_SF = self._any_rank(torch.stack([out.fired_F for _, _, out in seeds]))
        if self.stacked is not None:
            self.stacked.update_firing(fired_SF)
        for (name, sae, _), fired_F in zip(seeds, fired_SF, strict=True):
            if self.stacked is None:
                sae.update_firing(fired_F)
            self._fired[name] = self._fired.get(name, torch.zeros_like(fired_F)) | fired_F
        return total

    def _any_rank(self, flags: torch.Tensor) -> torch.Tensor:
        """OR of a bool tensor over the DDP ranks (so every rank sees the same dead latents)."""
        if self.trainer.world_size == 1:
            return flags
        summed = self.trainer.strategy.reduce(flags.float(), reduce_op="sum")
        return torch.as_tensor(summed) > 0

    def _log_global(self, name: str, value: float | torch.Tensor, prog_bar: bool = False) -> None:
        """Log an epoch-level value that is already the same on every rank (reduced by this module).

        ``sync_dist=True`` says it is synchronised (Lightning's warning about unsynchronised epoch metrics is
        for per-rank values) and ``rank_zero_only=True`` turns Lightning's own all-reduce of it off (it would
        average equal values); every rank logs it, so a callback on any rank can monitor it.
        """
        self.log(name, value, sync_dist=True, rank_zero_only=True, batch_size=1, prog_bar=prog_bar)

    def on_train_epoch_end(self) -> None:
        for name, fired_F in self._fired.items():  # OR-ed over ranks at every step: the same on every rank
            self._log_global(f"train/{name}/dead_fraction", 1.0 - fired_F.float().mean())
        self._fired = {}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        for trained in self._trained():
            cast(Any, trained).remove_parallel_grads()

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # renormalise right after the step (before any callback's on_train_batch_end, e.g. a step-based
        # ModelCheckpoint, so a checkpoint holds the renormalised decoder and a resumed fit matches)
        super().optimizer_step(*args, **kwargs)
        for trained in self._trained():
            cast(Any, trained).normalize_decoder()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for trained in self._trained() for p in trained.parameters()]
        # the fused kernel (CUDA and CPU): one pass over all parameters, the same update as the default
        # implementation; on CPU it halves the optimizer step of the main job's three SAEs (benchmarks/)
        fused = all(p.device.type in ("cuda", "cpu") and p.dtype.is_floating_point for p in params)
        return torch.optim.Adam(params, lr=self.lr, fused=fused)

    # ------------------------------------------------------------------ evaluation
    def _new_sums(self) -> dict[str, Any]:
        zeros = torch.zeros(len(EVAL_CLASS_NAMES), dtype=torch.float64, device=self.device)
        return {
            # per class: squared errors and squared distances to the training mean
            "err": zeros,
            "var": zeros.clone(),
            "x_sum": torch.zeros_like(self.data_mean_D, dtype=torch.float64),
            # rows, sum of squared errors, sum of squared norms (float64: a split's sums)
            "totals": torch.zeros(3, dtype=torch.float64, device=self.device),
            # the per-batch metrics times the batch's rows (in the order first seen)
            "weighted": {},
        }

    @torch.no_grad()
    def _eval_step(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        weight = 1.0
        valid_B = batch.get("valid")
        if valid_B is not None and not bool(valid_B.all()):  # rows repeated to pad a DDP shard
            if bool(valid_B.any()):
                batch = {k: v[valid_B] for k, v in batch.items()}
            else:  # run it all the same (every rank logs the same metrics), counted with weight 0
                weight = 0.0
        classes_B = class_names_of_batch(batch["label"], batch["category"])
        for name, sae, out in self._forward_seeds(batch["acts"]):
            _, _, metrics = self._seed_loss(name, sae, batch, stage, out)
            # shrinkage: mean over rows of ||x_hat|| / ||x|| (raw space; 1 = none), SAEBench's l2_ratio
            norm_B = batch["acts"].float().norm(dim=-1).clamp_min(1e-12)
            metrics["shrinkage"] = (out.recon_BD.detach().float().norm(dim=-1) / norm_B).mean()
            if name not in self._class_sums:
                self._class_sums[name] = self._new_sums()
            sums = self._class_sums[name]
            rows = weight * len(classes_B)
            for key, value in metrics.items():
                sums["weighted"][key] = sums["weighted"].get(key, 0.0) + (
                    rows * value.double() if rows else 0.0
                )
            if not weight:
                continue
            x_BD = batch["acts"].float() * sae.input_scale
            err_B = (out.recon_BD.float() * sae.input_scale - x_BD).pow(2).sum(-1)
            var_B = (x_BD - self.data_mean_D).pow(2).sum(-1)
            sums["err"].index_add_(0, classes_B, err_B.double())
            sums["var"].index_add_(0, classes_B, var_B.double())
            x64_BD = x_BD.double()  # the split's variance is a difference of sums: float64
            sums["x_sum"] += x64_BD.sum(0)
            sums["totals"] += torch.stack(
                [x64_BD.new_tensor(len(err_B)), err_B.double().sum(), x64_BD.pow(2).sum()]
            )

    def _reduced(self, value: torch.Tensor) -> torch.Tensor:
        """Sum over the DDP ranks (``value`` itself is overwritten)."""
        if self.trainer.world_size == 1:
            return value
        return torch.as_tensor(self.trainer.strategy.reduce(value, reduce_op="sum"))

    def _log_split_fvu(self, stage: str) -> None:
        """FVU of the whole split (sum of squared errors / total variance about the split's mean), per class
        (squared errors / squared distance to the training mean, per class), and the row-weighted means of
        the per-batch metrics; sums over all ranks (one all-reduce per seed)."""
        for name, sums in self._class_sums.items():
            keys = list(sums["weighted"])
            weighted = [
                torch.as_tensor(sums["weighted"][k], dtype=torch.float64, device=self.device) for k in keys
            ]
            packed = torch.cat(
                [sums["err"], sums["var"], sums["x_sum"], sums["totals"], torch.stack(weighted)]
            )
            sizes = [len(sums["err"]), len(sums["var"]), len(sums["x_sum"]), 3, len(keys)]
            err, var, x_sum_D, totals, weighted_totals = self._reduced(packed).cpu().split(sizes)
            n, err_total, x_sq = totals.tolist()
            for key, total in zip(keys, weighted_totals.tolist(), strict=True):
                if n > 0:
                    self._log_global(f"{stage}/{name}/{key}", total / n)
            total_var = x_sq - float(x_sum_D.pow(2).sum()) / max(n, 1.0)
            if n > 1 and total_var > 1e-9 * x_sq:  # no variance, up to float64 round-off
                self._log_global(
                    f"{stage}/{name}/fvu", err_total / total_var, prog_bar=name == self._bar_seed
                )
            for i, cls in enumerate(EVAL_CLASS_NAMES):
                if float(var[i]) > 0:
                    self._log_global(f"{stage}/{name}/fvu_class/{cls}", float(err[i] / var[i]))
        self._class_sums = {}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_split_fvu("val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_split_fvu("test")

    # ------------------------------------------------------------------ provenance
    def data_provenance(self) -> dict[str, Any] | None:
        """What the trainer's data module serves (layer, width, model, fingerprint), once per module; ``None``
        without a trainer or an activation data module."""
        if self._data_record is None and self._trainer is not None:
            provenance = getattr(getattr(self.trainer, "datamodule", None), "provenance", None)
            if callable(provenance):
                self._data_record = dict(provenance())
        return self._data_record

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record what the SAEs are trained on, for the check of :meth:`on_load_checkpoint`."""
        record = self.data_provenance()
        if record is not None:
            checkpoint[CHECKPOINT_KEY] = record

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of SAEs trained at another layer, width or on another model than the trainer's
        data module serves (:func:`~sae_refusal.sae.provenance.check_checkpoint_matches_data`)."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "served_layer"):
            ckpt = getattr(self.trainer, "ckpt_path", None) or "the checkpoint"
            check_checkpoint_matches_data(checkpoint, datamodule, ckpt, warn=False)

    # ------------------------------------------------------------------ export
    def export_metadata(self, seed: int) -> dict[str, Any]:
        """Facts kept in each export's ``cfg.json``: seed, architecture, data (model, layer) when known."""
        meta: dict[str, Any] = {
            "seed": seed,
            "architecture": self.architecture.describe(),
            # the 0-based epoch of the weights (the last one completed, as the feature callback's epoch{e})
            "epoch": None,
            "global_step": self.global_step if self._trainer is not None else None,
        }
        if self._trainer is not None:
            completed = int(self.trainer.fit_loop.epoch_progress.current.completed)
            meta["epoch"] = completed - 1 if completed > 0 else None
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        record = self.data_provenance()
        if record is not None:
            meta.update(record)
            meta["adapter_path"] = getattr(getattr(datamodule, "llm", None), "adapter_path", None)
        elif datamodule is not None:
            llm = getattr(datamodule, "llm", None)
            served = getattr(datamodule, "served_layer", None)
            meta["layer"] = served if served is not None else getattr(datamodule, "layer", None)
            meta["model"] = getattr(llm, "name_or_path", None)
            if isinstance(llm, LLMConfig):
                meta["adapter_path"] = llm.adapter_path
                meta["model_fingerprint"] = model_fingerprint(llm)
        return meta

    def export(self, folder: str | Path) -> dict[int, Path]:
        """Write every seed's SAE to ``<folder>/seed{n}`` (``cfg.json`` + ``sae.safetensors``)."""
        folder = Path(folder)
        written: dict[int, Path] = {}
        saes = dict(self.named_saes())
        for seed in self.seeds:
            written[seed] = saes[f"seed{seed}"].save(folder / f"seed{seed}", self.export_metadata(seed))
        return written

    def on_fit_end(self) -> None:
        self._set_rank_mean(None)  # no process-group reference outlives the fit
        log_dir = self.trainer.log_dir  # a collective under DDP: read it on every rank
        if self.trainer.is_global_zero and log_dir is not None:
            self.export(Path(log_dir) / "sae")
