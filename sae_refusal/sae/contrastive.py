"""Supervised terms for a contrastive SAE: SupCon on the latent codes and a harmful/benign mean separation.

Both act on the codes ``z`` of a batch whose rows carry a class: 0 for benign (and, by default, ambiguous)
prompts and ``1..C`` for harmful prompts of each CoCoNot category (``-1`` rows are ignored).

* :func:`supcon_loss` (Khosla et al., 2020) pulls codes of the same class together and pushes other classes
  apart, on L2-normalised codes with a temperature.
* :func:`mean_separation` is the cosine similarity between the mean code of harmful rows and of benign rows;
  adding it to the loss pushes the two means apart (codes are non-negative, so it lies in ``[0, 1]``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sae_refusal.activations.datamodule import LABEL_INDEX

__all__ = ["batch_classes", "mean_separation", "supcon_loss"]


def batch_classes(
    label_B: torch.Tensor, category_B: torch.Tensor, ambiguous_as_benign: bool = True
) -> torch.Tensor:
    """Class per row: 0 benign, ``category`` code for harmful, ambiguous -> 0 (or -1 = ignored)."""
    classes_B = torch.where(label_B == LABEL_INDEX["harmful"], category_B, torch.zeros_like(category_B))
    if not ambiguous_as_benign:
        classes_B = torch.where(
            label_B == LABEL_INDEX["ambiguous"], torch.full_like(classes_B, -1), classes_B
        )
    return classes_B


def supcon_loss(codes_BF: torch.Tensor, classes_B: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss over the rows with a class (``>= 0``) and at least one positive.

    Returns 0 (with a graph) when no row has a positive.

    Raises:
        ValueError: If ``temperature`` is not positive or the shapes do not match.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if codes_BF.shape[0] != classes_B.shape[0]:
        raise ValueError(f"codes_BF has {codes_BF.shape[0]} rows, classes_B {classes_B.shape[0]}")
    keep_B = classes_B >= 0
    z_NF = F.normalize(codes_BF[keep_B], dim=1)
    classes_N = classes_B[keep_B]
    n = z_NF.shape[0]
    if n < 2:
        return codes_BF.sum() * 0.0
    logits_NN = z_NF @ z_NF.T / temperature
    self_NN = torch.eye(n, dtype=torch.bool, device=z_NF.device)
    logits_NN = logits_NN.masked_fill(self_NN, float("-inf"))
    log_prob_NN = logits_NN - logits_NN.logsumexp(dim=1, keepdim=True)
    positive_NN = (classes_N[:, None] == classes_N[None, :]) & ~self_NN
    n_pos_N = positive_NN.sum(1)
    anchors_N = n_pos_N > 0
    if not anchors_N.any():
        return codes_BF.sum() * 0.0
    mean_log_prob_N = log_prob_NN.masked_fill(~positive_NN, 0.0).sum(1) / n_pos_N.clamp_min(1)
    return -mean_log_prob_N[anchors_N].mean()


def mean_separation(codes_BF: torch.Tensor, classes_B: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of the mean harmful code (classes ``>= 1``) and the mean benign code (class 0).

    Returns 0 (with a graph) when the batch lacks either group.
    """
    harmful_B, benign_B = classes_B >= 1, classes_B == 0
    if not harmful_B.any() or not benign_B.any():
        return codes_BF.sum() * 0.0
    return F.cosine_similarity(codes_BF[harmful_B].mean(0), codes_BF[benign_B].mean(0), dim=0, eps=1e-8)
