"""LLM access: loading (hub / folder / GGUF, dtype, quantization, a refusal-token artifact applied), layers,
tokenization, early-exit residual extraction and the refusal-token vocabulary.

Layer ``l`` always means the residual stream right after decoder block ``l`` (0-based); see
:mod:`sae_refusal.llm.layers`.
"""

from sae_refusal.llm.artifact import (
    RefusalArtifact,
    RefusalArtifactError,
    add_artifact_tokens,
    apply_refusal_artifact,
    artifact_hash,
    read_refusal_artifact,
)
from sae_refusal.llm.extraction import (
    ResidualBatch,
    full_forward_last_token,
    iter_last_token_residuals,
    last_token_indices,
    last_token_residuals,
    position_ids_from_mask,
)
from sae_refusal.llm.hashing import file_sha256
from sae_refusal.llm.layers import d_model, decoder_layers, num_layers, validate_layers
from sae_refusal.llm.loading import (
    SMOLLM2_ALIAS,
    LLMConfig,
    load_model,
    load_model_and_tokenizer,
    load_model_config,
    load_tokenizer,
    model_fingerprint,
)
from sae_refusal.llm.refusal_tokens import (
    RefusalPrediction,
    RefusalTokenError,
    RefusalVocabulary,
    ResolvedRefusalTokens,
)
from sae_refusal.llm.tokenize import (
    OVERFLOW_POLICIES,
    EncodedPrompts,
    context_length,
    default_max_length,
    encode_prompts,
    pad_left,
    tokenizer_fingerprint,
)

__all__ = [
    "OVERFLOW_POLICIES",
    "SMOLLM2_ALIAS",
    "EncodedPrompts",
    "LLMConfig",
    "RefusalArtifact",
    "RefusalArtifactError",
    "RefusalPrediction",
    "RefusalTokenError",
    "RefusalVocabulary",
    "ResidualBatch",
    "ResolvedRefusalTokens",
    "add_artifact_tokens",
    "apply_refusal_artifact",
    "artifact_hash",
    "context_length",
    "d_model",
    "decoder_layers",
    "default_max_length",
    "encode_prompts",
    "file_sha256",
    "full_forward_last_token",
    "iter_last_token_residuals",
    "last_token_indices",
    "last_token_residuals",
    "load_model",
    "load_model_and_tokenizer",
    "load_model_config",
    "load_tokenizer",
    "model_fingerprint",
    "num_layers",
    "pad_left",
    "position_ids_from_mask",
    "read_refusal_artifact",
    "tokenizer_fingerprint",
    "validate_layers",
]
