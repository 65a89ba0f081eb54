"""Where and how last-token activations are cached (``data.cache``): plain settings, no torch needed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sae_refusal.llm.config import OVERFLOW_POLICIES, check_max_length

__all__ = ["DATA_MODULE_ARGS", "KEY", "STORAGE_DTYPES", "VERIFY_MODES", "CacheConfig"]

#: The arguments :class:`~sae_refusal.activations.datamodule.ActivationDataModule` takes in a config
#: (``data``); a test checks them against its signature.
DATA_MODULE_ARGS: tuple[str, ...] = (
    "llm",
    "prompts",
    "split",
    "manifest_path",
    "cache",
    "layer",
    "batch_size",
    "num_workers",
    "shuffle_seed",
)

#: How much of a cache is checked when it is opened.
VERIFY_MODES = ("none", "size", "hash")
STORAGE_DTYPES = ("float32", "bfloat16", "float16")
#: Prefix of the cache settings' config keys in errors (the ``cache`` argument of the ``data`` section).
KEY = "data.cache"


@dataclass
class CacheConfig:
    """Where and how activations are cached.

    Args:
        root: Folder holding one sub-folder per cache (named by the identity hash).
        layers: Layers to cache (residual stream after decoder block ``l``, 0-based; negative indices
            count from the end).
        dtype: Storage dtype of the activations (``float32``, ``bfloat16`` or ``float16``).
        batch_size: Most prompts per forward pass.
        token_budget: Most padded tokens (rows x longest prompt) per forward pass, so short prompts run many
            to a pass and long ones few (e.g. 16384 on a GPU); ``null``: ``batch_size`` prompts per pass.
        sort_window: Passes' worth of prompts (``sort_window x batch_size``) sorted by length together, to
            pad little; 1 runs prompts in input order. Batching changes the activations only by float
            round-off (the cache records it in ``extra``, not in its identity).
        pack_length: Pack prompts into rows of this many tokens, each attending only to itself, in passes of
            ``token_budget`` tokens (``batch_size x pack_length`` without one): no padding but the rows'
            tails (:mod:`sae_refusal.llm.packing`; eager or SDPA attention). ``null``: padded passes.
        max_length: Token budget per prompt; ``None`` uses the model's context (capped).
        overflow: ``truncate_left`` (keep the last ``max_length`` tokens and count them) or ``error``.
        shard_rows: Rows per safetensors shard.
        verify: Check on open: ``hash`` (sha256 of every file and no ``inf``/``nan``; costs about one read of
            the cache, see ``benchmarks/cache_verify_cost.py``), ``size`` (file byte sizes) or ``none``.
        chat_template: Jinja chat template, or the path of a file holding one, overriding the tokenizer's own
            (needed when it has none).
        system_prompt: Optional system message prepended to every prompt.
    """

    root: str = "runs/activation_cache"
    layers: Sequence[int] = (10, 15)
    dtype: str = "float32"
    batch_size: int = 16
    token_budget: int | None = None
    sort_window: int = 16
    pack_length: int | None = None
    max_length: int | None = None
    overflow: str = "truncate_left"
    shard_rows: int = 4096
    verify: str = "hash"
    chat_template: str | None = None
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in STORAGE_DTYPES:
            raise ValueError(f"{KEY}.dtype must be one of {STORAGE_DTYPES}, got {self.dtype!r}")
        if self.overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"{KEY}.overflow must be one of {OVERFLOW_POLICIES}, got {self.overflow!r}")
        if self.verify not in VERIFY_MODES:
            raise ValueError(f"{KEY}.verify must be one of {VERIFY_MODES}, got {self.verify!r}")
        if self.batch_size < 1:
            raise ValueError(f"{KEY}.batch_size must be >= 1, got {self.batch_size}")
        if self.token_budget is not None and self.token_budget < 1:
            raise ValueError(f"{KEY}.token_budget must be >= 1 or null, got {self.token_budget}")
        if self.sort_window < 1:
            raise ValueError(f"{KEY}.sort_window must be >= 1, got {self.sort_window}")
        if self.pack_length is not None and (isinstance(self.pack_length, bool) or self.pack_length < 1):
            raise ValueError(f"{KEY}.pack_length must be >= 1 or null, got {self.pack_length}")
        if not self.layers:
            raise ValueError(f"{KEY}.layers must name at least one layer")
        if self.max_length is not None:
            check_max_length(self.max_length, None, key=f"{KEY}.max_length")
