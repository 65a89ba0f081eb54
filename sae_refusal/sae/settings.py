"""The checks of the SAE settings a fit config gives (``model.*``): one rule each, no torch needed.

:class:`~sae_refusal.sae.module.SAEModule` and the architectures (:mod:`sae_refusal.sae.architectures`)
call these when they are built, and ``sae-refusal fit`` calls them on the config files and flags before it
imports Lightning (:func:`sae_refusal.config_check.preflight_fit`), so an out-of-range setting is reported
in a second with the same message. Each message names the config key (``model.lr``,
``model.architecture.k``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Final

__all__ = [
    "ARCHITECTURE_ARGS",
    "ENCODER_DTYPE_NAMES",
    "MODULE_ARGS",
    "REQUIRED",
    "check_batchtopk_settings",
    "check_contrastive_settings",
    "check_jumprelu_settings",
    "check_l1_settings",
    "check_module_settings",
    "check_prefix_fractions",
    "check_stack_seeds",
    "check_topk_settings",
]

#: The default of an argument that has none (``d_model``, a contrastive SAE's ``base``).
REQUIRED: Final = "<required>"

#: The arguments :class:`~sae_refusal.sae.module.SAEModule` takes in a config (``model.init_args``), each
#: with its default; a test checks them against its signature. The fit preflight takes a setting that a
#: config leaves out from here.
MODULE_ARGS: dict[str, object] = {
    "d_model": REQUIRED,
    "architecture": None,
    "expansion_factor": 8,
    "seeds": None,
    "lr": 1e-3,
    "normalize_inputs": True,
    "stack_seeds": False,
}
#: The arguments of each architecture (``model.init_args.architecture.init_args``) with their defaults,
#: checked the same way.
ARCHITECTURE_ARGS: dict[str, dict[str, object]] = {
    "TopK": {
        "k": 32,
        "aux_k": 256,
        "aux_coef": 1.0 / 32.0,
        "dead_after_steps": 1000,
        "encoder_dtype": "float32",
    },
    "L1": {"l1_coef": 0.5, "init_decoder_norm": 0.1},
    "JumpReLU": {
        "l0_coef": 1.0,
        "bandwidth": 0.001,
        "init_threshold": 0.001,
        "init_decoder_norm": 0.1,
        "init_l0": None,
        "sparsity_loss": "step",
        "tanh_scale": 4.0,
    },
    "BatchTopK": {
        "k": 32,
        "aux_k": 256,
        "aux_coef": 1.0 / 32.0,
        "dead_after_steps": 1000,
        "threshold_momentum": 0.99,
    },
    "MatryoshkaBatchTopK": {
        "k": 32,
        "prefix_fractions": (0.0625, 0.25, 1.0),
        "aux_k": 256,
        "aux_coef": 1.0 / 32.0,
        "dead_after_steps": 1000,
        "threshold_momentum": 0.99,
    },
    "Contrastive": {
        "base": REQUIRED,
        "supcon_weight": 0.1,
        "separation_weight": 0.0,
        "temperature": 0.1,
        "ambiguous_as_benign": True,
    },
}
#: ``model.architecture.sparsity_loss`` values of a JumpReLU SAE (:mod:`sae_refusal.sae.jumprelu_train`).
JUMPRELU_SPARSITY_LOSSES = ("step", "tanh")
#: ``model.architecture.encoder_dtype`` values of a TopK SAE.
ENCODER_DTYPE_NAMES: tuple[str, ...] = ("bfloat16", "float32")


def _finite(value: object) -> float | None:
    """``value`` as a float if it is a finite number (not a bool), else ``None``."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _integer(value: object) -> int | None:
    """``value`` if it is an int (not a bool), else ``None``."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _require_at_least(
    key: str, value: object, number: float | None, bound: float, *, strict: bool = False, note: str = ""
) -> None:
    """Raise naming ``key`` unless ``number`` (``value`` parsed, ``None`` if not a number) is >= ``bound``.

    ``strict`` asks for > ``bound``; ``note`` follows the rule in the message.
    """
    if number is None or number < bound or (strict and number == bound):
        raise ValueError(f"{key} must be {'>' if strict else '>='} {bound}{note}, got {value}")


def check_module_settings(expansion_factor: object, seeds: Sequence[object] | None, lr: object) -> None:
    """``model.expansion_factor`` >= 1, ``model.seeds`` non-empty and distinct, ``model.lr`` > 0 and finite.

    Raises:
        ValueError: Naming the key, the rule and the value.
    """
    _require_at_least("model.expansion_factor", expansion_factor, _integer(expansion_factor), 1)
    if seeds is not None and (not seeds or len(set(seeds)) != len(seeds)):
        raise ValueError(f"model.seeds must be a non-empty list of distinct seeds, got {list(seeds)}")
    _require_at_least("model.lr", lr, _finite(lr), 0, strict=True)


def check_stack_seeds(stack_seeds: object, architecture: str) -> None:
    """``model.stack_seeds`` is a bool, and true only with the ``TopK`` architecture.

    Args:
        stack_seeds: The setting.
        architecture: The class name of ``model.architecture`` (``TopK`` when it is left out).

    Raises:
        ValueError: Naming ``model.stack_seeds``, the rule and the value.
    """
    if not isinstance(stack_seeds, bool):
        raise ValueError(f"model.stack_seeds must be true or false, got {stack_seeds!r}")
    if stack_seeds and architecture != "TopK":
        raise ValueError(
            "model.stack_seeds: stacking the seeds into one batched SAE needs the TopK architecture "
            f"(model.architecture), got {architecture}; set model.stack_seeds false"
        )


def check_topk_settings(
    k: object,
    aux_k: object,
    aux_coef: object,
    dead_after_steps: object,
    encoder_dtype: object,
    n_latents: int | None = None,
) -> None:
    """A TopK SAE's settings; ``k <= n_latents`` too when the width is known.

    Raises:
        ValueError: Naming the ``model.architecture.*`` key, the rule and the value.
    """
    active = _integer(k)
    if active is None or active < 1 or (n_latents is not None and active > n_latents):
        rule = f"in [1, {n_latents}] (the latents)" if n_latents is not None else ">= 1"
        raise ValueError(f"model.architecture.k must be {rule}, got {k}")
    _require_at_least("model.architecture.aux_k", aux_k, _integer(aux_k), 0, note=" (0 disables AuxK)")
    _require_at_least("model.architecture.aux_coef", aux_coef, _finite(aux_coef), 0)
    _require_at_least("model.architecture.dead_after_steps", dead_after_steps, _integer(dead_after_steps), 1)
    if encoder_dtype not in ENCODER_DTYPE_NAMES:
        raise ValueError(
            f"model.architecture.encoder_dtype must be one of {list(ENCODER_DTYPE_NAMES)}, "
            f"got {encoder_dtype!r}"
        )


def check_batchtopk_settings(
    k: object,
    aux_k: object,
    aux_coef: object,
    dead_after_steps: object,
    threshold_momentum: object,
    n_latents: int | None = None,
) -> None:
    """A BatchTopK SAE's settings (TopK's rules, and ``threshold_momentum`` in ``[0, 1)``).

    Raises:
        ValueError: Naming the ``model.architecture.*`` key, the rule and the value.
    """
    check_topk_settings(k, aux_k, aux_coef, dead_after_steps, "float32", n_latents)
    momentum = _finite(threshold_momentum)
    if momentum is None or not 0.0 <= momentum < 1.0:
        raise ValueError(f"model.architecture.threshold_momentum must be in [0, 1), got {threshold_momentum}")


def check_prefix_fractions(prefix_fractions: object, n_latents: int | None = None) -> list[int] | None:
    """A Matryoshka SAE's ``prefix_fractions``: a non-empty list of fractions in ``(0, 1]`` ending with
    ``1.0``; with the width known, the prefix sizes ``round(f * n_latents)`` they give, strictly increasing
    and >= 1.

    Returns:
        The prefix sizes when ``n_latents`` is given, else ``None``.

    Raises:
        ValueError: Naming ``model.architecture.prefix_fractions``, the rule and the value.
    """
    key = "model.architecture.prefix_fractions"
    if isinstance(prefix_fractions, str | bytes) or not isinstance(prefix_fractions, Sequence):
        raise ValueError(f"{key} must be a non-empty list of fractions in (0, 1], got {prefix_fractions!r}")
    fractions = list(prefix_fractions)
    parsed = [_finite(f) for f in fractions]
    numbers = [f for f in parsed if f is not None and 0.0 < f <= 1.0]
    if not fractions or len(numbers) != len(fractions):
        raise ValueError(f"{key} must be a non-empty list of fractions in (0, 1], got {fractions}")
    if numbers[-1] != 1.0:
        raise ValueError(f"{key} must end with 1.0 (the full dictionary), got {fractions}")
    if any(b <= a for a, b in itertools.pairwise(numbers)):
        raise ValueError(f"{key} must be strictly increasing, got {fractions}")
    if n_latents is None:
        return None
    sizes = [round(f * n_latents) for f in numbers]
    if sizes[0] < 1 or any(b <= a for a, b in itertools.pairwise(sizes)):
        raise ValueError(
            f"{key} must give strictly increasing prefix sizes >= 1 of the {n_latents} latents, got {sizes} "
            f"from {fractions}"
        )
    return sizes


def check_l1_settings(l1_coef: object, init_decoder_norm: object) -> None:
    """An L1 SAE's ``l1_coef`` >= 0 and ``init_decoder_norm`` > 0.

    Raises:
        ValueError: Naming the ``model.architecture.*`` key and the value.
    """
    _require_at_least("model.architecture.l1_coef", l1_coef, _finite(l1_coef), 0)
    _require_at_least(
        "model.architecture.init_decoder_norm", init_decoder_norm, _finite(init_decoder_norm), 0, strict=True
    )


def check_jumprelu_settings(
    l0_coef: object,
    bandwidth: object,
    init_threshold: object,
    init_decoder_norm: object,
    init_l0: object = None,
    sparsity_loss: object = "step",
    tanh_scale: object = 4.0,
) -> None:
    """A JumpReLU SAE's ``l0_coef`` >= 0, ``bandwidth``, ``init_threshold``, ``init_decoder_norm`` > 0,
    ``init_l0`` ``None`` or > 0, ``sparsity_loss`` one of :data:`JUMPRELU_SPARSITY_LOSSES` and
    ``tanh_scale`` > 0.

    Raises:
        ValueError: Naming the ``model.architecture.*`` key and the value.
    """
    _require_at_least("model.architecture.l0_coef", l0_coef, _finite(l0_coef), 0)
    for key, value in (
        ("bandwidth", bandwidth),
        ("init_threshold", init_threshold),
        ("init_decoder_norm", init_decoder_norm),
    ):
        _require_at_least(f"model.architecture.{key}", value, _finite(value), 0, strict=True)
    if init_l0 is not None:
        _require_at_least("model.architecture.init_l0", init_l0, _finite(init_l0), 0, strict=True)
    if sparsity_loss not in JUMPRELU_SPARSITY_LOSSES:
        raise ValueError(
            f"model.architecture.sparsity_loss must be one of {list(JUMPRELU_SPARSITY_LOSSES)}, "
            f"got {sparsity_loss!r}"
        )
    _require_at_least("model.architecture.tanh_scale", tanh_scale, _finite(tanh_scale), 0, strict=True)


def check_contrastive_settings(supcon_weight: object, separation_weight: object, temperature: object) -> None:
    """A contrastive SAE's term weights >= 0 and temperature > 0.

    Raises:
        ValueError: Naming the ``model.architecture.*`` key and the value.
    """
    for key, value in (("supcon_weight", supcon_weight), ("separation_weight", separation_weight)):
        _require_at_least(f"model.architecture.{key}", value, _finite(value), 0)
    _require_at_least("model.architecture.temperature", temperature, _finite(temperature), 0, strict=True)
