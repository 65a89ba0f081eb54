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

_EXPORTS = {
    "CacheConfig": "sae_refusal.activations.config",
    "cached_activations": "sae_refusal.activations.build",
    "ActivationCache": "sae_refusal.activations.cache",
    "ActivationCacheWriter": "sae_refusal.activations.cache",
    "CacheCorruptError": "sae_refusal.activations.cache",
    "CacheError": "sae_refusal.activations.cache",
    "CacheIdentity": "sae_refusal.activations.cache",
    "CacheMismatchError": "sae_refusal.activations.cache",
    "CacheNotFoundError": "sae_refusal.activations.cache",
    "NonFiniteActivationsError": "sae_refusal.activations.cache",
    "ActivationDataModule": "sae_refusal.activations.datamodule",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

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
