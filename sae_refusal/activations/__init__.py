"""Last-token activations: the on-disk cache, the code that fills it, and the Lightning data module."""

from sae_refusal.activations.build import CacheConfig, cached_activations
from sae_refusal.activations.cache import (
    ActivationCache,
    ActivationCacheWriter,
    CacheCorruptError,
    CacheError,
    CacheIdentity,
    CacheMismatchError,
    CacheNotFoundError,
    NonFiniteActivationsError,
)
from sae_refusal.activations.datamodule import ActivationDataModule

__all__ = [
    "ActivationCache",
    "ActivationCacheWriter",
    "ActivationDataModule",
    "CacheConfig",
    "CacheCorruptError",
    "CacheError",
    "CacheIdentity",
    "CacheMismatchError",
    "CacheNotFoundError",
    "NonFiniteActivationsError",
    "cached_activations",
]
