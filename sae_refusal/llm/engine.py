"""One generation dispatcher for every job that generates: ``engine`` ``hf``, ``fast`` or ``auto``.

:func:`generate` has the signature and results of :func:`sae_refusal.llm.batched.generate` plus ``engine``:

* ``"hf"``: :func:`~sae_refusal.llm.batched.generate` (Hugging Face ``generate``, dynamic cache).
* ``"fast"``: :func:`~sae_refusal.llm.fast_generate.generate_static`: a static KV cache and a fixed-shape
  decode step, captured as a CUDA graph on CUDA (``"cuda_graph"`` mode) and run eagerly elsewhere
  (``"static"`` mode). The ``around`` hooks (every intervention of :mod:`sae_refusal.steer.interventions`,
  per-row gates included) act in the prefill and every decode step as with ``"hf"``; see
  :mod:`sae_refusal.llm.fast_generate` for how a graph captured once serves batches whose per-row vectors
  and alphas differ.
* ``"auto"`` (the default of the jobs' ``generation.engine``): ``"fast"`` for a model on CUDA, else ``"hf"``.

Same results: the fast engine reproduces what ``generate`` does with the model's generation config, greedy:
the single-token ``sequence_bias`` (a calibrated respond bias) is added to the float32 logits; rows are cut
at their first stop token, and with no ``stop_ids`` every row runs ``max_new_tokens`` steps
(``batched.generate`` passes ``eos_token_id=None``, which overrides the generation config's EOS ids). Greedy
tokens are equal up to floating-point rounding (bit-equal in float32 on the CPU in the tests; kernels of
other shapes, e.g. attention over a static cache, may flip a near-tie on a GPU). What the fast engine cannot
reproduce (:func:`fast_unsupported`: sampling, extra logits processors, a generation config with repetition
penalties, beams, suppressed or forced tokens..., a model spread over several devices or quantized) runs on
``"hf"`` under ``"auto"`` (logged once) and is an error under ``"fast"``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from torch import Tensor, nn

from sae_refusal.llm import batched
from sae_refusal.llm.batched import BatchContext, Generation, check_positive
from sae_refusal.llm.config import GENERATION_ENGINES

if TYPE_CHECKING:
    from transformers import LogitsProcessor

__all__ = [
    "ENGINES",
    "Engine",
    "check_engine",
    "fast_unsupported",
    "generate",
    "resolve_engine",
    "sequence_bias_vector",
]

log = logging.getLogger(__name__)

#: ``generation.engine`` values.
Engine = Literal["hf", "fast", "auto"]
ENGINES: tuple[str, ...] = GENERATION_ENGINES

#: Generation-config fields whose non-neutral values change greedy tokens in ways the fast engine does not
#: reproduce, with their neutral values.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "guidance_scale": (None, 1, 1.0),
    "repetition_penalty": (None, 1, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "remove_invalid_values": (None, False),
    "exponential_decay_length_penalty": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "watermarking_config": (None,),
    "num_beams": (None, 1),
    "penalty_alpha": (None,),
    "stop_strings": (None,),
}


_LOGGED: set[str] = set()


def check_engine(engine: str, key: str = "engine") -> None:
    """Raise ``ValueError`` naming ``key`` unless ``engine`` is one of :data:`ENGINES`."""
    if engine not in ENGINES:
        raise ValueError(f"{key}: expected one of {', '.join(ENGINES)}, got {engine!r}")


def _bias_entries(value: Any) -> list[tuple[tuple[int, ...], float]]:
    """``sequence_bias`` as ``(ids, bias)`` pairs, from its dict or its JSON list form."""
    if not value:
        return []
    items = value.items() if isinstance(value, dict) else value
    return [(tuple(int(i) for i in ids), float(bias)) for ids, bias in items]


def _logits_width(model: nn.Module) -> int:
    """Width of the model's logits: its output embedding's rows, else the config's vocabulary size."""
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, Tensor):
        return int(weight.shape[0])
    return int(cast(Any, model).config.vocab_size)


def sequence_bias_vector(model: nn.Module) -> Tensor | None:
    """The single-token ``sequence_bias`` of the model's generation config as a ``(V,)`` float32 bias.

    ``generate`` adds these entries to the float32 logits at every step (a calibrated respond bias is one).

    Args:
        model: A Hugging Face causal LM.

    Returns:
        The bias (``None`` when the config has no single-token entries).
    """
    config = getattr(model, "generation_config", None)
    entries = [(ids, bias) for ids, bias in _bias_entries(getattr(config, "sequence_bias", None))]
    single = [(ids[0], bias) for ids, bias in entries if len(ids) == 1]
    if not single:
        return None
    bias_V = torch.zeros(_logits_width(model), dtype=torch.float32)
    for token, bias in single:
        bias_V[token] += bias
    return bias_V


def fast_unsupported(
    model: nn.Module,
    *,
    temperature: float = 0.0,
    logits_processors: Sequence[Any] | None = None,
) -> str | None:
    """Why the fast engine cannot give ``generate``'s tokens for this call, or ``None`` when it can."""
    if temperature > 0:
        return f"sampling (temperature {temperature})"
    if logits_processors:
        return "extra logits processors"
    devices = {p.device for p in model.parameters()}
    if len(devices) > 1:
        return f"a model spread over {len(devices)} devices"
    if getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None:
        return "a quantized model (its kernels are not known to be capturable)"
    config = getattr(model, "generation_config", None)
    for name, neutral in _NEUTRAL.items():
        value = getattr(config, name, None)
        if not any(value is n or value == n for n in neutral):
            return f"generation_config.{name} = {value!r}"
    if any(len(ids) != 1 for ids, _ in _bias_entries(getattr(config, "sequence_bias", None))):
        return "generation_config.sequence_bias with multi-token sequences"
    return None


def resolve_engine(engine: str, model: nn.Module) -> Literal["hf", "fast"]:
    """``"hf"`` or ``"fast"``: ``"auto"`` is ``"fast"`` for a model on CUDA, else ``"hf"``.

    Raises:
        ValueError: On an unknown engine (naming ``engine``).
    """
    check_engine(engine)
    if engine == "auto":
        from sae_refusal.llm.layers import input_device

        return "fast" if input_device(model).type == "cuda" else "hf"
    return "fast" if engine == "fast" else "hf"


def generate(
    model: nn.Module,
    input_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    pad_id: int,
    stop_ids: Sequence[int],
    batch_size: int,
    temperature: float = 0.0,
    logits_processors: Sequence[LogitsProcessor] | None = None,
    around: BatchContext | None = None,
    sort_by_length: bool = False,
    engine: str = "auto",
) -> list[Generation]:
    """:func:`sae_refusal.llm.batched.generate` on the chosen engine (same arguments and results).

    Args:
        model: A Hugging Face causal LM, on any device (the fast engine needs one device).
        input_ids: One non-empty list of token ids per prompt (already chat-formatted and encoded).
        max_new_tokens: Most tokens generated per prompt.
        pad_id: Id of the padding.
        stop_ids: Tokens that end a generation; empty leaves the generation config's EOS setting.
        batch_size: Prompts per batch.
        temperature: 0 for greedy decoding (the fast engine's only mode).
        logits_processors: Extra logits processors (``"hf"`` only).
        around: ``around(indices)`` -> a context manager entered around each batch's generation.
        sort_by_length: Batch the prompts longest first; results still come back in input order.
        engine: ``"hf"``, ``"fast"`` or ``"auto"`` (module docstring).

    Returns:
        One :class:`~sae_refusal.llm.batched.Generation` per prompt, in input order.

    Raises:
        ValueError: On an unknown engine, a non-positive size, a negative temperature, or ``"fast"`` for a
            call it cannot reproduce (:func:`fast_unsupported`).
    """
    chosen = resolve_engine(engine, model)
    check_positive("max_new_tokens", max_new_tokens)
    check_positive("batch_size", batch_size)
    if temperature < 0:
        raise ValueError(f"temperature: must be >= 0 (0 = greedy), got {temperature}")
    reason = fast_unsupported(model, temperature=temperature, logits_processors=logits_processors)
    if chosen == "fast" and reason is not None:
        if engine == "fast":
            raise ValueError(f"engine: 'fast' cannot reproduce generate here ({reason}); use engine 'hf'")
        if reason not in _LOGGED:
            _LOGGED.add(reason)
            log.info("generation engine auto: %s, so the hf engine runs", reason)
        chosen = "hf"
    if chosen == "hf" or not input_ids:
        return batched.generate(
            model,
            input_ids,
            max_new_tokens=max_new_tokens,
            pad_id=pad_id,
            stop_ids=stop_ids,
            batch_size=batch_size,
            temperature=temperature,
            logits_processors=logits_processors,
            around=around,
            sort_by_length=sort_by_length,
        )
    from sae_refusal.llm.fast_generate import generate_static
    from sae_refusal.llm.layers import input_device

    device = input_device(model)
    return generate_static(
        model,
        input_ids,
        max_new_tokens=max_new_tokens,
        pad_id=pad_id,
        batch_size=batch_size,
        stop_ids=stop_ids,
        mode="cuda_graph" if device.type == "cuda" else "static",
        around=around,
        sort_by_length=sort_by_length,
        logit_bias=sequence_bias_vector(model),
    )
