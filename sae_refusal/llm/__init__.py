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

_EXPORTS = {
    "RefusalArtifact": "sae_refusal.llm.artifact",
    "RefusalArtifactError": "sae_refusal.llm.artifact",
    "add_artifact_tokens": "sae_refusal.llm.artifact",
    "apply_refusal_artifact": "sae_refusal.llm.artifact",
    "artifact_hash": "sae_refusal.llm.artifact",
    "read_refusal_artifact": "sae_refusal.llm.artifact",
    "ResidualBatch": "sae_refusal.llm.extraction",
    "full_forward_last_token": "sae_refusal.llm.extraction",
    "iter_last_token_residuals": "sae_refusal.llm.extraction",
    "last_token_indices": "sae_refusal.llm.extraction",
    "last_token_residuals": "sae_refusal.llm.extraction",
    "position_ids_from_mask": "sae_refusal.llm.extraction",
    "file_sha256": "sae_refusal.llm.hashing",
    "d_model": "sae_refusal.llm.layers",
    "decoder_layers": "sae_refusal.llm.layers",
    "num_layers": "sae_refusal.llm.layers",
    "validate_layers": "sae_refusal.llm.layers",
    "LLMConfig": "sae_refusal.llm.config",
    "SMOLLM2_ALIAS": "sae_refusal.llm.config",
    "load_model": "sae_refusal.llm.loading",
    "load_model_and_tokenizer": "sae_refusal.llm.loading",
    "load_model_config": "sae_refusal.llm.loading",
    "load_tokenizer": "sae_refusal.llm.loading",
    "model_fingerprint": "sae_refusal.llm.loading",
    "RefusalPrediction": "sae_refusal.llm.refusal_tokens",
    "RefusalTokenError": "sae_refusal.llm.refusal_tokens",
    "RefusalVocabulary": "sae_refusal.llm.refusal_tokens",
    "ResolvedRefusalTokens": "sae_refusal.llm.refusal_tokens",
    "EncodedPrompts": "sae_refusal.llm.tokenize",
    "OVERFLOW_POLICIES": "sae_refusal.llm.config",
    "context_length": "sae_refusal.llm.tokenize",
    "default_max_length": "sae_refusal.llm.tokenize",
    "encode_prompts": "sae_refusal.llm.tokenize",
    "pad_left": "sae_refusal.llm.tokenize",
    "tokenizer_fingerprint": "sae_refusal.llm.tokenize",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

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
