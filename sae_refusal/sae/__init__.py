"""Sparse autoencoders (plain modules), architectures (chosen with ``class_path``), the Lightning shell."""

from sae_refusal.sae.architectures import L1, Contrastive, SAEArchitecture, TopK, architecture_from_config
from sae_refusal.sae.base import SAE_REGISTRY, SAEOutput, SparseAutoencoder, mean_norm_scale
from sae_refusal.sae.jumprelu import JumpReLUSAE as JumpReLUSAE  # registers "jumprelu"
from sae_refusal.sae.loading import find_sae_exports, load_sae
from sae_refusal.sae.module import SAEModule
from sae_refusal.sae.relu import ReLUSAE
from sae_refusal.sae.topk import TopKSAE, sparse_decode

__all__ = [
    "L1",
    "SAE_REGISTRY",
    "Contrastive",
    "ReLUSAE",
    "SAEArchitecture",
    "SAEModule",
    "SAEOutput",
    "SparseAutoencoder",
    "TopK",
    "TopKSAE",
    "architecture_from_config",
    "find_sae_exports",
    "load_sae",
    "mean_norm_scale",
    "sparse_decode",
]
