"""LLM access: loading (hub / folder / GGUF, dtype, quantization, a refusal-token artifact applied), layers,
tokenization, early-exit residual extraction and the refusal-token vocabulary.

Layer ``l`` always means the residual stream right after decoder block ``l`` (0-based); see
:mod:`sae_refusal.llm.layers`.

Exports load on first use (:mod:`sae_refusal.lazy`): importing one module of the package imports
nothing else of it.
"""

from typing import TYPE_CHECKING

from sae_refusal.lazy import lazy_exports

if TYPE_CHECKING:
    from sae_refusal.llm.artifact import RefusalArtifact as RefusalArtifact
    from sae_refusal.llm.artifact import RefusalArtifactError as RefusalArtifactError
    from sae_refusal.llm.artifact import add_artifact_tokens as add_artifact_tokens
    from sae_refusal.llm.artifact import apply_refusal_artifact as apply_refusal_artifact
    from sae_refusal.llm.artifact import artifact_hash as artifact_hash
    from sae_refusal.llm.artifact import read_refusal_artifact as read_refusal_artifact
    from sae_refusal.llm.config import OVERFLOW_POLICIES as OVERFLOW_POLICIES
    from sae_refusal.llm.config import SMOLLM2_ALIAS as SMOLLM2_ALIAS
    from sae_refusal.llm.config import LLMConfig as LLMConfig
    from sae_refusal.llm.extraction import ResidualBatch as ResidualBatch
    from sae_refusal.llm.extraction import full_forward_last_token as full_forward_last_token
    from sae_refusal.llm.extraction import iter_last_token_residuals as iter_last_token_residuals
    from sae_refusal.llm.extraction import last_token_indices as last_token_indices
    from sae_refusal.llm.extraction import last_token_residuals as last_token_residuals
    from sae_refusal.llm.extraction import position_ids_from_mask as position_ids_from_mask
    from sae_refusal.llm.hashing import file_sha256 as file_sha256
    from sae_refusal.llm.layers import d_model as d_model
    from sae_refusal.llm.layers import decoder_layers as decoder_layers
    from sae_refusal.llm.layers import num_layers as num_layers
    from sae_refusal.llm.layers import validate_layers as validate_layers
    from sae_refusal.llm.loading import load_model as load_model
    from sae_refusal.llm.loading import load_model_and_tokenizer as load_model_and_tokenizer
    from sae_refusal.llm.loading import load_model_config as load_model_config
    from sae_refusal.llm.loading import load_tokenizer as load_tokenizer
    from sae_refusal.llm.loading import model_fingerprint as model_fingerprint
    from sae_refusal.llm.refusal_tokens import RefusalPrediction as RefusalPrediction
    from sae_refusal.llm.refusal_tokens import RefusalTokenError as RefusalTokenError
    from sae_refusal.llm.refusal_tokens import RefusalVocabulary as RefusalVocabulary
    from sae_refusal.llm.refusal_tokens import ResolvedRefusalTokens as ResolvedRefusalTokens
    from sae_refusal.llm.tokenize import EncodedPrompts as EncodedPrompts
    from sae_refusal.llm.tokenize import context_length as context_length
    from sae_refusal.llm.tokenize import default_max_length as default_max_length
    from sae_refusal.llm.tokenize import encode_prompts as encode_prompts
    from sae_refusal.llm.tokenize import pad_left as pad_left
    from sae_refusal.llm.tokenize import tokenizer_fingerprint as tokenizer_fingerprint

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "sae_refusal.llm.artifact": (
            "RefusalArtifact",
            "RefusalArtifactError",
            "add_artifact_tokens",
            "apply_refusal_artifact",
            "artifact_hash",
            "read_refusal_artifact",
        ),
        "sae_refusal.llm.config": ("LLMConfig", "OVERFLOW_POLICIES", "SMOLLM2_ALIAS"),
        "sae_refusal.llm.extraction": (
            "ResidualBatch",
            "full_forward_last_token",
            "iter_last_token_residuals",
            "last_token_indices",
            "last_token_residuals",
            "position_ids_from_mask",
        ),
        "sae_refusal.llm.hashing": ("file_sha256",),
        "sae_refusal.llm.layers": ("d_model", "decoder_layers", "num_layers", "validate_layers"),
        "sae_refusal.llm.loading": (
            "load_model",
            "load_model_and_tokenizer",
            "load_model_config",
            "load_tokenizer",
            "model_fingerprint",
        ),
        "sae_refusal.llm.refusal_tokens": (
            "RefusalPrediction",
            "RefusalTokenError",
            "RefusalVocabulary",
            "ResolvedRefusalTokens",
        ),
        "sae_refusal.llm.tokenize": (
            "EncodedPrompts",
            "context_length",
            "default_max_length",
            "encode_prompts",
            "pad_left",
            "tokenizer_fingerprint",
        ),
    },
)
