"""Sparse autoencoders (plain modules), architectures (chosen with ``class_path``), the Lightning shell.

Exports load on first use (:mod:`sae_refusal.lazy`): importing one module of the package imports
nothing else of it.
"""

from typing import TYPE_CHECKING

from sae_refusal.lazy import lazy_exports

if TYPE_CHECKING:
    from sae_refusal.sae.architectures import L1 as L1
    from sae_refusal.sae.architectures import Contrastive as Contrastive
    from sae_refusal.sae.architectures import SAEArchitecture as SAEArchitecture
    from sae_refusal.sae.architectures import TopK as TopK
    from sae_refusal.sae.architectures import architecture_from_config as architecture_from_config
    from sae_refusal.sae.base import SAE_REGISTRY as SAE_REGISTRY
    from sae_refusal.sae.base import SAEOutput as SAEOutput
    from sae_refusal.sae.base import SparseAutoencoder as SparseAutoencoder
    from sae_refusal.sae.base import mean_norm_scale as mean_norm_scale
    from sae_refusal.sae.batchtopk import BatchTopK as BatchTopK
    from sae_refusal.sae.batchtopk import BatchTopKSAE as BatchTopKSAE
    from sae_refusal.sae.batchtopk import MatryoshkaBatchTopK as MatryoshkaBatchTopK
    from sae_refusal.sae.batchtopk import MatryoshkaBatchTopKSAE as MatryoshkaBatchTopKSAE
    from sae_refusal.sae.jumprelu import JumpReLUSAE as JumpReLUSAE
    from sae_refusal.sae.jumprelu_train import JumpReLU as JumpReLU
    from sae_refusal.sae.jumprelu_train import TrainableJumpReLUSAE as TrainableJumpReLUSAE
    from sae_refusal.sae.loading import find_sae_exports as find_sae_exports
    from sae_refusal.sae.loading import load_sae as load_sae
    from sae_refusal.sae.module import SAEModule as SAEModule
    from sae_refusal.sae.relu import ReLUSAE as ReLUSAE
    from sae_refusal.sae.stacked import StackedTopKSAE as StackedTopKSAE
    from sae_refusal.sae.topk import TopKSAE as TopKSAE
    from sae_refusal.sae.topk import sparse_decode as sparse_decode

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "sae_refusal.sae.architectures": (
            "Contrastive",
            "L1",
            "SAEArchitecture",
            "TopK",
            "architecture_from_config",
        ),
        "sae_refusal.sae.base": ("SAEOutput", "SAE_REGISTRY", "SparseAutoencoder", "mean_norm_scale"),
        "sae_refusal.sae.batchtopk": (
            "BatchTopK",
            "BatchTopKSAE",
            "MatryoshkaBatchTopK",
            "MatryoshkaBatchTopKSAE",
        ),
        "sae_refusal.sae.jumprelu": ("JumpReLUSAE",),
        "sae_refusal.sae.jumprelu_train": ("JumpReLU", "TrainableJumpReLUSAE"),
        "sae_refusal.sae.loading": ("find_sae_exports", "load_sae"),
        "sae_refusal.sae.module": ("SAEModule",),
        "sae_refusal.sae.relu": ("ReLUSAE",),
        "sae_refusal.sae.stacked": ("StackedTopKSAE",),
        "sae_refusal.sae.topk": ("TopKSAE", "sparse_decode"),
    },
)
