"""The refusal-token fine-tuning recipe's settings that a config gives, and their checks (no torch needed).

:class:`~sae_refusal.finetune.module.RefusalSFTModule` checks them when it is built, and ``sae-refusal
finetune`` checks the config files and flags with the same rules before it imports Lightning
(:func:`sae_refusal.config_check.preflight_finetune`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["DEFAULT_LORA_TARGETS", "FINETUNE_MODULE_ARGS", "LoraSettings", "check_finetune_settings"]

#: The arguments :class:`~sae_refusal.finetune.module.RefusalSFTModule` takes in a config (``model``), each
#: with its default; a test checks them against its signature. The finetune preflight takes a setting that
#: a config leaves out from here.
FINETUNE_MODULE_ARGS: dict[str, object] = {
    "llm": None,
    "refusal_tokens": None,
    "token_init": "category_words",
    "lora": None,
    "lr": 2e-4,
    "weight_decay": 0.0,
    "warmup_steps": 20,
    "gradient_checkpointing": False,
    "decision_weight": 1.0,
}

#: Attention and MLP projections of Llama / Qwen2 / Mistral style decoder blocks.
DEFAULT_LORA_TARGETS: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)


@dataclass
class LoraSettings:
    """LoRA hyper-parameters.

    Args:
        r: Rank of each low-rank update.
        alpha: Scaling numerator; the update is scaled by ``alpha / r``.
        dropout: Dropout on the LoRA branch input.
        target_modules: Names (suffixes) of the linear layers that get LoRA updates.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"lora.r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("lora.target_modules: empty; name at least one linear layer, e.g. q_proj")


def check_finetune_settings(lr: float, warmup_steps: int, decision_weight: float) -> None:
    """``model.lr`` > 0, ``model.warmup_steps`` >= 0, ``model.decision_weight`` finite and > 0.

    Raises:
        ValueError: Naming the key and the value.
    """
    if not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"model.lr must be > 0, got {lr}")
    if warmup_steps < 0:
        raise ValueError(f"model.warmup_steps must be >= 0, got {warmup_steps}")
    if not math.isfinite(decision_weight) or decision_weight <= 0:
        raise ValueError(f"model.decision_weight must be a finite number > 0, got {decision_weight}")
