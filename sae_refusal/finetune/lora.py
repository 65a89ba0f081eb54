"""LoRA for the refusal-token recipe, with the new token rows trained sparsely.

How the new rows train under LoRA: the base weights are frozen by peft, so the rows of the added refusal
tokens would stay at their initial values. ``LoraConfig(trainable_token_indices=...)`` (peft >= 0.15) wraps
the embedding in a ``TrainableTokensWrapper`` that trains only those rows (a ``(n_new, d_model)`` parameter
per matrix) and writes them into the matrix on merge. With tied embeddings one list of ids is given: peft
wraps the input embedding and ties the LM head to the same trainable rows. With untied embeddings the input
embedding and the LM head are both named, each with its own trainable rows. ``save_pretrained`` then stores
only LoRA matrices plus ``n_new`` rows per matrix (``save_embedding_layers=False``), never the full
embedding; :mod:`sae_refusal.finetune.artifact` relies on that.

Training whole embedding matrices (``modules_to_save=["embed_tokens", "lm_head"]``) is not offered: it
saves the full ``vocab x d_model`` matrices (hundreds of MB on large vocabularies).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from sae_refusal.finetune.config import DEFAULT_LORA_TARGETS, LoraSettings
from sae_refusal.llm.layers import embeddings_tied

__all__ = ["DEFAULT_LORA_TARGETS", "LoraSettings", "lora_config", "wrap_with_lora"]


def lora_config(
    settings: LoraSettings,
    new_token_ids: Sequence[int],
    *,
    embedding_modules: Sequence[str] | None = None,
) -> Any:
    """Build the ``peft.LoraConfig`` for ``settings`` that also trains the rows of ``new_token_ids``.

    Args:
        settings: LoRA hyper-parameters.
        new_token_ids: Ids of the added refusal tokens; their embedding rows become trainable (none if empty).
        embedding_modules: Module names whose rows are trained. ``None`` (tied embeddings) targets the input
            embedding, and peft ties the LM head to it; for untied embeddings pass both names, e.g.
            ``["model.embed_tokens", "lm_head"]`` (what :func:`wrap_with_lora` does).

    Returns:
        A ``peft.LoraConfig`` for a causal LM.
    """
    from peft import LoraConfig, TaskType

    ids = sorted({int(i) for i in new_token_ids})
    trainable: list[int] | dict[str, list[int]] | None = None
    if ids:
        trainable = ids if embedding_modules is None else {name: list(ids) for name in embedding_modules}
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        trainable_token_indices=trainable,
    )


def _module_name(model: nn.Module, module: nn.Module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise ValueError(f"{type(module).__name__} is not a submodule of {type(model).__name__}")


def wrap_with_lora(model: nn.Module, settings: LoraSettings, new_token_ids: Sequence[int]) -> Any:
    """Wrap ``model`` with LoRA adapters and trainable rows for the new tokens.

    Only the LoRA matrices and the rows of ``new_token_ids`` (input embedding and, when untied, LM head)
    require gradients afterwards.

    Args:
        model: A Hugging Face causal LM, already resized by
            :func:`~sae_refusal.finetune.tokens.init_refusal_embeddings`.
        settings: LoRA hyper-parameters.
        new_token_ids: Ids of the added refusal tokens.

    Returns:
        The ``peft.PeftModel``.

    Raises:
        ValueError: If a token id is outside the embedding (config key ``lora``: resize first) or no
            ``lora.target_modules`` entry matches a layer of the model.
    """
    from peft import get_peft_model

    from sae_refusal.llm.compat import quiet_peft_wrap

    n_rows = int(model.get_input_embeddings().weight.shape[0])  # type: ignore[operator]
    bad = [i for i in new_token_ids if not 0 <= int(i) < n_rows]
    if bad:
        raise ValueError(
            f"lora: new token ids {bad} are outside the embedding ({n_rows} rows); resize the embeddings "
            "(init_refusal_embeddings) before wrapping"
        )
    embedding_modules: list[str] | None = None
    if not embeddings_tied(model):
        embedding_modules = [
            _module_name(model, model.get_input_embeddings()),  # type: ignore[operator]
            _module_name(model, model.get_output_embeddings()),  # type: ignore[operator]
        ]
    config = lora_config(settings, new_token_ids, embedding_modules=embedding_modules)
    try:
        with quiet_peft_wrap():
            return get_peft_model(model, config)
    except ValueError as err:
        if "target modules" in str(err).lower():
            raise ValueError(f"lora.target_modules: {settings.target_modules} match no layer: {err}") from err
        raise
