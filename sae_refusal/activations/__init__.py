"""Last-token activations: the on-disk cache, the code that fills it, and the Lightning data module.

Exports load on first use (:mod:`sae_refusal.lazy`): importing one module of the package imports
nothing else of it.
"""

from typing import TYPE_CHECKING

from sae_refusal.lazy import lazy_exports

if TYPE_CHECKING:
    from sae_refusal.activations.build import cached_activations as cached_activations
    from sae_refusal.activations.cache import ActivationCache as ActivationCache
    from sae_refusal.activations.cache import ActivationCacheWriter as ActivationCacheWriter
    from sae_refusal.activations.cache import CacheCorruptError as CacheCorruptError
    from sae_refusal.activations.cache import CacheError as CacheError
    from sae_refusal.activations.cache import CacheIdentity as CacheIdentity
    from sae_refusal.activations.cache import CacheMismatchError as CacheMismatchError
    from sae_refusal.activations.cache import CacheNotFoundError as CacheNotFoundError
    from sae_refusal.activations.cache import NonFiniteActivationsError as NonFiniteActivationsError
    from sae_refusal.activations.config import CacheConfig as CacheConfig
    from sae_refusal.activations.datamodule import ActivationDataModule as ActivationDataModule

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "sae_refusal.activations.build": ("cached_activations",),
        "sae_refusal.activations.cache": (
            "ActivationCache",
            "ActivationCacheWriter",
            "CacheCorruptError",
            "CacheError",
            "CacheIdentity",
            "CacheMismatchError",
            "CacheNotFoundError",
            "NonFiniteActivationsError",
        ),
        "sae_refusal.activations.config": ("CacheConfig",),
        "sae_refusal.activations.datamodule": ("ActivationDataModule",),
    },
)
