"""Sparse autoencoders (plain modules) and their Lightning training shell."""

from sae_refusal.sae.module import SAEModule
from sae_refusal.sae.topk import SAEOutput, TopKSAE, TopKSAEConfig

__all__ = ["SAEModule", "SAEOutput", "TopKSAE", "TopKSAEConfig"]
