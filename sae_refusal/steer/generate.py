"""Interactive steering: a chat model's greedy answers without and with an intervention, side by side.

``sae-refusal generate --config RUN.yaml --vectors DIR --category NAME --alpha A --prompt "..."`` loads the
LLM of the config's ``data.llm`` section (the file ``sae-refusal fit`` takes, or a run's saved
``config.yaml``), takes one category's vector from a :class:`~sae_refusal.features.vectors.SteeringVectors`
artifact (``caa`` or ``sas_decoded``, both residual-space) and prints, for each prompt, the first generated
token (a refusal-token model's decision) and the answer, unsteered and with ``a <- a + alpha * v`` added at
the artifact's layer (:class:`~sae_refusal.steer.interventions.ResidualSteering`).

:func:`steered_answers` is the Python face of the same comparison, for any ``{layer: fn}`` edits.

Design notes:

* **One generation loop.** Both runs go through :func:`sae_refusal.llm.engine.generate` (``--engine``:
  Hugging Face ``generate``, the static-cache / CUDA-graph generator, or ``auto``, fast on CUDA; token ids
  are kept so the first token can be shown, special tokens included) with ``around(indices)`` entering an
  :class:`~sae_refusal.steer.interventions.Intervention` per batch: the edit acts on the prefill and on
  every cached decode step. Greedy decoding, so alpha 0 gives the unsteered answer bit for bit (an idle
  hook leaves the hidden states untouched).
* **Checks before weights.** The vector (folder, category, space), the layer (``--layer`` against the
  artifact's), the width and the model (the artifact's recorded weights fingerprint, adapter included,
  against ``data.llm``'s; ``--allow_other_model`` to steer another model on purpose; an artifact written
  before fingerprints were recorded gets a warning) are checked before any weight is loaded, and an all-zero
  vector (a category without training rows) is an error unless ``--allow_zero_vector``; every error names the
  flag (``ValueError`` / ``OSError``: one line and exit 2 from the CLI).
* **Light until needed.** Only the standard library is imported at module level, so
  ``sae-refusal generate --help`` answers at once; torch and transformers are imported by the functions
  that run the model.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sae_refusal.errors import ArtifactError
from sae_refusal.llm.config import GENERATION_ENGINES

if TYPE_CHECKING:
    from torch import Tensor, nn

    from sae_refusal.features.vectors import SteeringVectors
    from sae_refusal.llm.hooks import ResidualFn
    from sae_refusal.llm.loading import LLMConfig
    from sae_refusal.llm.refusal_tokens import ResolvedRefusalTokens
    from sae_refusal.steer.interventions import Positions

__all__ = [
    "Answer",
    "GenerateRequest",
    "SteeredAnswer",
    "check_vectors_model",
    "generate_parser",
    "parse_positions",
    "parse_request",
    "run_generate",
    "steered_answers",
    "steering_vector",
]

log = logging.getLogger(__name__)

#: ``{layer: fn}`` or ``{layer: [fn, ...]}``, as :class:`~sae_refusal.steer.interventions.Intervention` takes.
LayerEdits = Mapping[int, "ResidualFn | Sequence[ResidualFn]"]

#: Residual-space vectors of a :class:`SteeringVectors` artifact that ``--space`` may name.
SPACES = ("caa", "sas_decoded")


@dataclass(frozen=True)
class Answer:
    """One greedy generation.

    Attributes:
        first_token: The first generated token decoded with its special tokens (a refusal token such as
            ``" [respond]"``; the stop token when it came first; ``""`` when nothing was generated).
        first_id: Its id (``None`` when nothing was generated).
        text: The answer up to its stop token, special tokens skipped (so without the refusal token).
        stopped: Whether a stop token ended it before ``max_new_tokens``.
        decision: Refusal-token class of the first token (``"respond"``, ``"safety"``, ...) when the refusal
            tokens were given and the first token is one of them, else ``None``.
    """

    first_token: str
    first_id: int | None
    text: str
    stopped: bool
    decision: str | None = None


@dataclass(frozen=True)
class SteeredAnswer:
    """One prompt's answer without and with the intervention.

    Attributes:
        prompt: The user message.
        unsteered: The model's own answer.
        steered: The answer with the intervention on the prefill and every decode step.
    """

    prompt: str
    unsteered: Answer
    steered: Answer

    @property
    def changed(self) -> bool:
        """Whether the intervention changed the generated tokens."""
        return (self.unsteered.first_id, self.unsteered.text) != (self.steered.first_id, self.steered.text)


def _answers(
    tokenizer: Any, generations: Sequence[Any], resolved: ResolvedRefusalTokens | None
) -> list[Answer]:
    decisions = dict(zip(resolved.token_ids, resolved.class_names, strict=True)) if resolved else {}
    answers = []
    for generation in generations:
        first_id = generation.first_id
        first = "" if first_id is None else tokenizer.decode([first_id], skip_special_tokens=False)
        answers.append(
            Answer(
                first_token=first,
                first_id=first_id,
                text=tokenizer.decode(generation.token_ids, skip_special_tokens=True),
                stopped=generation.stopped,
                decision=decisions.get(first_id) if first_id is not None else None,
            )
        )
    return answers


def steered_answers(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    edits_by_layer: LayerEdits | Callable[[list[int]], LayerEdits],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    chat_template: str | None = None,
    system_prompt: str | None = None,
    stop_ids: Sequence[int] | None = None,
    refusal_tokens: ResolvedRefusalTokens | None = None,
    max_length: int | None = None,
    engine: str = "auto",
) -> list[SteeredAnswer]:
    """Greedy answers to ``prompts`` without and with an intervention (prefill and every decode step).

    Args:
        model: A Hugging Face causal LM (a refusal-token model's calibrated respond bias, kept in its
            ``generation_config``, applies to both runs).
        tokenizer: Its tokenizer; its chat template (or ``chat_template``) wraps each prompt.
        prompts: User messages.
        edits_by_layer: ``{layer: fn}`` or ``{layer: [fn, ...]}`` for every prompt (e.g.
            ``{12: ResidualSteering(v, alpha=4.0)}``), or ``edits(indices) -> {layer: fn}`` for the prompts
            ``indices`` of one batch, in that row order (per-row interventions).
        max_new_tokens: Most tokens generated per prompt.
        batch_size: Prompts per ``generate`` call.
        chat_template: Template overriding the tokenizer's (e.g. the config's ``data.cache.chat_template``).
        system_prompt: Optional system message before each prompt.
        stop_ids: Tokens that end an answer; ``None``: the tokenizer's and the generation config's EOS ids.
        refusal_tokens: The refusal tokens bound to ``tokenizer``, to name each first token's decision.
        max_length: Most prompt tokens kept (longer prompts lose their beginning); ``None`` leaves room for
            the answer within the model's context.
        engine: Generation engine: ``hf``, ``fast`` or ``auto`` (:func:`sae_refusal.llm.engine.generate`).

    Returns:
        One :class:`SteeredAnswer` per prompt, in input order.

    Raises:
        ValueError: On a non-positive ``max_new_tokens`` / ``batch_size``, an empty prompt, an edit at a
            layer the model does not have, or an unknown engine.
    """
    from sae_refusal.data.chat import format_prompts
    from sae_refusal.llm.batched import check_positive, resolve_pad_id, stop_token_ids
    from sae_refusal.llm.engine import check_engine, generate
    from sae_refusal.llm.tokenize import default_max_length, encode_prompts
    from sae_refusal.steer.interventions import Intervention

    check_positive("max_new_tokens", max_new_tokens)
    check_positive("batch_size", batch_size)
    check_engine(engine)
    if not prompts:
        return []
    edits = edits_by_layer

    def around(indices: list[int]) -> Intervention:
        return Intervention(model, edits(indices) if callable(edits) else edits)

    if not callable(edits):
        Intervention(model, edits)  # a bad layer fails here, before any generation
    formatted = format_prompts(tokenizer, prompts, chat_template=chat_template, system_prompt=system_prompt)
    if max_length is None:
        max_length = max(default_max_length(model, tokenizer) - max_new_tokens, 1)
    encoded = encode_prompts(tokenizer, formatted, max_length=max_length, overflow="truncate_left")
    if encoded.n_truncated:
        log.warning("%d prompt(s) over %d tokens lost their beginning", encoded.n_truncated, max_length)
    options: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "pad_id": resolve_pad_id(tokenizer),
        "stop_ids": stop_token_ids(model, tokenizer) if stop_ids is None else list(stop_ids),
        "batch_size": batch_size,
        "engine": engine,
    }
    unsteered = generate(model, encoded.input_ids, **options)
    steered = generate(model, encoded.input_ids, around=around, **options)
    return [
        SteeredAnswer(prompt, before, after)
        for prompt, before, after in zip(
            prompts,
            _answers(tokenizer, unsteered, refusal_tokens),
            _answers(tokenizer, steered, refusal_tokens),
            strict=True,
        )
    ]


# ----------------------------------------------------------------------------------------- command line


def generate_parser(with_config: bool = True) -> argparse.ArgumentParser:
    """The ``generate`` options; ``with_config=False`` leaves ``--config`` to the fit parser (in order)."""
    parser = argparse.ArgumentParser(
        prog="sae-refusal generate",
        allow_abbrev=False,  # an abbreviation must not swallow a fit option
        description="Greedy answers to each --prompt without and with a steering vector added to the "
        "residual stream (a <- a + alpha * v at the vectors' layer, on the prefill and every decode step), "
        "with each answer's first token (a refusal-token model's decision). The model is the config's "
        "data.llm; other options are those of `sae-refusal fit` (e.g. --data.llm.device cuda, "
        "--data.llm.adapter_path DIR).",
    )
    if with_config:
        parser.add_argument(
            "-c",
            "--config",
            required=True,
            action="append",
            metavar="CONFIG.yaml",
            help="a fit config or a run's saved config.yaml (its data.llm and data.cache.chat_template / "
            "system_prompt are used); repeat it to layer configs as `sae-refusal fit` does",
        )
    parser.add_argument(
        "--vectors",
        required=True,
        metavar="DIR",
        help="a steering-vector artifact folder (vectors.safetensors + vectors.json): one seed's folder of a "
        "feature analysis, e.g. <run>/features/epoch29/seed0 (the main job's last epoch) or <out>/seed0 of "
        "`sae-refusal features`",
    )
    parser.add_argument(
        "--category", required=True, help="the category whose vector steers (e.g. safety, humanizing)"
    )
    parser.add_argument(
        "--alpha",
        required=True,
        type=float,
        help="steering strength: adds alpha * v (negative subtracts; 0 is the unsteered model)",
    )
    parser.add_argument(
        "--layer",
        type=int,
        default=None,
        help="layer to steer at; must agree with the layer recorded in the vectors (default: that layer)",
    )
    parser.add_argument(
        "--space",
        choices=SPACES,
        default="caa",
        help="caa (residual-space CAA vector, default) or sas_decoded (SAS vector mapped through the SAE "
        "decoder)",
    )
    parser.add_argument(
        "--positions",
        default="all",
        help="where to add the vector: all (default), prompt, generated, or K (tokens from index K on)",
    )
    parser.add_argument(
        "--allow_other_model",
        action="store_true",
        help="steer data.llm with vectors recorded for other weights or another adapter (by default refused)",
    )
    parser.add_argument(
        "--allow_zero_vector",
        action="store_true",
        help="run with an all-zero vector (a category without training rows; by default an error)",
    )
    parser.add_argument("--max_new_tokens", type=int, default=64, help="most tokens per answer (64)")
    parser.add_argument("--batch_size", type=int, default=8, help="prompts per generate call (8)")
    parser.add_argument(
        "--engine",
        choices=GENERATION_ENGINES,
        default="auto",
        help="generation engine: hf (Hugging Face generate), fast (static KV cache, the decode step replayed "
        "as a CUDA graph on CUDA) or auto (default: fast on CUDA, hf elsewhere); same greedy tokens up to "
        "floating-point rounding",
    )
    parser.add_argument(
        "--prompt",
        required=True,
        action="append",
        help="a user message (chat template applied); repeat for several",
    )
    return parser


def parse_positions(text: str) -> Positions:
    """``all``, ``prompt``, ``generated`` or a token index ``K >= 0`` (``--positions``).

    Raises:
        ValueError: Naming ``--positions``.
    """
    named: dict[str, Positions] = {"all": "all", "prompt": "prompt", "generated": "generated"}
    if text in named:
        return named[text]
    if text.isascii() and text.isdigit():
        return int(text)
    raise ValueError(f"--positions: expected all, prompt, generated or a token index >= 0, got {text!r}")


@dataclass(frozen=True)
class GenerateRequest:
    """What ``sae-refusal generate`` was asked to do (see :func:`generate_parser` for each option).

    Attributes:
        fit_args: ``--config`` and the other options for the fit parser, in their order.
    """

    vectors: Path
    category: str
    alpha: float
    layer: int | None
    space: str
    positions: Positions
    max_new_tokens: int
    batch_size: int
    prompts: list[str]
    fit_args: list[str]
    allow_other_model: bool = False
    allow_zero_vector: bool = False
    engine: str = "auto"


def parse_request(args: Sequence[str]) -> GenerateRequest:
    """Parse the ``generate`` command line (``--help`` and a missing required option exit here).

    Raises:
        ValueError: On a non-finite ``--alpha``, a bad ``--positions``, a non-positive ``--max_new_tokens`` /
            ``--batch_size`` or an empty ``--prompt``, naming the flag.
        FileNotFoundError: If the ``--vectors`` folder does not exist.
    """
    generate_parser().parse_known_args(list(args))
    # --config stays among the fit options, in its place: `--config a.yaml --data.llm.device cuda` keeps order
    known, rest = generate_parser(with_config=False).parse_known_args(list(args))
    if not math.isfinite(known.alpha):
        raise ValueError(f"--alpha: must be finite, got {known.alpha}")
    for flag in ("max_new_tokens", "batch_size"):
        if getattr(known, flag) < 1:
            raise ValueError(f"--{flag}: must be a positive integer, got {getattr(known, flag)}")
    if not Path(known.vectors).is_dir():
        raise FileNotFoundError(f"--vectors: folder {known.vectors} does not exist")
    empty = [i for i, prompt in enumerate(known.prompt) if not prompt.strip()]
    if empty:
        raise ValueError(f"--prompt: prompt {empty[0] + 1} is empty")
    return GenerateRequest(
        vectors=Path(known.vectors),
        category=known.category,
        alpha=float(known.alpha),
        layer=known.layer,
        space=known.space,
        positions=parse_positions(known.positions),
        max_new_tokens=known.max_new_tokens,
        batch_size=known.batch_size,
        prompts=list(known.prompt),
        fit_args=rest,
        allow_other_model=bool(known.allow_other_model),
        allow_zero_vector=bool(known.allow_zero_vector),
        engine=str(known.engine),
    )


def _artifact_category(vectors: SteeringVectors, category: str, folder: Path) -> str:
    """The artifact's class name for ``category`` (its own name, or a CoCoNot name / short name of it)."""
    from sae_refusal.categories import CATEGORY_SHORT_NAMES, resolve_category

    names = vectors.class_names[1:]
    if category in names:
        return category
    try:
        canonical = resolve_category(category, key="--category")
    except ValueError:
        canonical = None
    for candidate in (canonical, CATEGORY_SHORT_NAMES.get(canonical or "")):
        if candidate in names:
            return candidate
    raise ValueError(f"--category: unknown category {category!r}; the vectors in {folder} have {names}")


def _layer(request: GenerateRequest, vectors: SteeringVectors, n_layers: int) -> int:
    from sae_refusal.llm.layers import validate_layers

    recorded = vectors.metadata.get("layer")
    if request.layer is None and recorded is None:
        raise ValueError(f"--layer: the vectors in {request.vectors} record no layer; give --layer")
    asked = None if request.layer is None else validate_layers(request.layer, n_layers, key="--layer")[0]
    if recorded is None:
        assert asked is not None
        return asked
    (stored,) = validate_layers(int(recorded), n_layers, key=f"--vectors {request.vectors}: layer")
    if asked is not None and asked != stored:
        raise ValueError(
            f"--layer {request.layer} does not match the layer the vectors in {request.vectors} were "
            f"computed at ({recorded}); leave --layer out or give {recorded}"
        )
    return stored


def steering_vector(
    request: GenerateRequest, vectors: SteeringVectors, *, n_layers: int, width: int
) -> tuple[Tensor, str, int]:
    """The vector, the artifact's category name and the layer a request steers with, checked.

    Args:
        request: The parsed command line.
        vectors: The artifact at ``request.vectors``.
        n_layers: The model's number of decoder blocks.
        width: The model's residual width.

    Raises:
        ValueError: On an unknown ``--category``, a ``--space`` missing from the artifact, a ``--layer`` that
            disagrees with the artifact's or lies outside the model, or a vector width that is not the
            model's (naming the flag).
    """
    category = _artifact_category(vectors, request.category, request.vectors)
    try:
        vector = vectors.vector(category, request.space)
    except ValueError as err:
        raise ValueError(
            f"--space {request.space}: {request.vectors} holds no {request.space!r} vectors ({err})"
        ) from None
    if vector.shape[-1] != width:
        raise ValueError(
            f"--vectors {request.vectors}: vector width {vector.shape[-1]} != the model's width {width} "
            f"(vectors of model {vectors.metadata.get('model')!r}; check data.llm)"
        )
    return vector, category, _layer(request, vectors, n_layers)


def _load_vectors(folder: Path) -> SteeringVectors:
    from sae_refusal.features.vectors import SteeringVectors

    if not folder.is_dir():
        raise FileNotFoundError(f"--vectors: folder {folder} does not exist")
    try:
        return SteeringVectors.load(folder)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"--vectors: {err}") from None
    except ArtifactError as err:
        raise ArtifactError(f"--vectors: {err}") from None
    except (KeyError, ValueError) as err:
        raise ValueError(f"--vectors {folder}: not a readable steering-vector artifact ({err})") from None


def check_vectors_model(request: GenerateRequest, vectors: SteeringVectors, llm: LLMConfig) -> None:
    """Refuse vectors recorded for other weights than ``data.llm`` (unless ``--allow_other_model``).

    Compared by weights fingerprint (content hash or hub revision, adapter, quantization); an artifact
    written before fingerprints were recorded is compared by name and warned about.

    Raises:
        ArtifactError: Naming ``--vectors``, ``data.llm`` and what differs.
    """
    from sae_refusal.llm.loading import model_fingerprint
    from sae_refusal.provenance import provenance_mismatches

    recorded = vectors.recorded()
    if request.allow_other_model:
        return
    served = {"model": llm.name_or_path, "model_fingerprint": lambda: model_fingerprint(llm)}
    problems = provenance_mismatches(recorded, served, {"model": "data.llm"})
    if problems and recorded["model_fingerprint"] is not None:
        raise ArtifactError(
            f"--vectors {request.vectors}: the vectors were {problems[0]}; give the config of the model they "
            "were made on, or --allow_other_model to steer this one with them on purpose"
        )
    if recorded["model_fingerprint"] is None:
        made_on = f" (made on {recorded['model']!r}, data.llm is {llm.name_or_path!r})" if problems else ""
        log.warning(
            "--vectors %s records no model fingerprint%s: it cannot be checked to come from these weights "
            "and adapter; recompute it with sae-refusal features to have it checked",
            request.vectors,
            made_on,
        )


def _model_shape(llm: LLMConfig) -> tuple[int, int]:
    """``(n_layers, width)`` from the model's config (no weights)."""
    from sae_refusal.llm.loading import load_model_config

    config = load_model_config(llm)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text_config.num_hidden_layers), int(text_config.hidden_size)


def _refusal_tokens(tokenizer: Any) -> ResolvedRefusalTokens | None:
    """The refusal tokens of a refusal-token model's tokenizer (default spellings, else detected), or None."""
    from sae_refusal.llm.refusal_tokens import RefusalTokenError, RefusalVocabulary

    try:
        return RefusalVocabulary().resolve(tokenizer)
    except RefusalTokenError:
        pass
    try:
        return RefusalVocabulary.detect(tokenizer).resolve(tokenizer)
    except RefusalTokenError:
        return None


def _show(answer: Answer) -> str:
    decision = f" ({answer.decision})" if answer.decision else ""
    ended = "" if answer.stopped else " [max_new_tokens reached]"
    return f"first token {answer.first_token!r}{decision}\n    answer: {answer.text!r}{ended}"


def run_generate(
    request: GenerateRequest,
    llm: LLMConfig,
    *,
    chat_template: str | None = None,
    system_prompt: str | None = None,
    print_fn: Callable[[str], None] = print,
) -> list[SteeredAnswer]:
    """Check the request, load the model, generate unsteered and steered answers and print them.

    Args:
        request: The parsed command line (:func:`parse_request`).
        llm: The model (the config's ``data.llm``).
        chat_template: The config's ``data.cache.chat_template`` (the template the vectors were made with).
        system_prompt: The config's ``data.cache.system_prompt``.
        print_fn: Where the report goes.

    Returns:
        The answers, in ``--prompt`` order.

    Raises:
        ValueError, OSError: On a bad option, naming it (see :func:`steering_vector`).
    """
    import torch

    from sae_refusal.features.vectors import require_nonzero
    from sae_refusal.llm.loading import load_model_and_tokenizer
    from sae_refusal.steer.interventions import ResidualSteering

    vectors = _load_vectors(request.vectors)
    n_layers, width = _model_shape(llm)
    vector, category, layer = steering_vector(request, vectors, n_layers=n_layers, width=width)
    check_vectors_model(request, vectors, llm)
    if request.allow_zero_vector:
        if not bool(torch.any(vector != 0)):
            log.warning("the %s vector of %r is all zeros: steering changes nothing", request.space, category)
    else:
        require_nonzero(
            vector,
            f"--vectors {request.vectors}: the {request.space} vector of category {category!r}",
            "--allow_zero_vector",
        )
    log.info("loading %s", llm.name_or_path)
    model, tokenizer = load_model_and_tokenizer(llm)
    edit = ResidualSteering(vector, alpha=request.alpha, positions=request.positions)
    answers = steered_answers(
        model,
        tokenizer,
        request.prompts,
        {layer: edit},
        max_new_tokens=request.max_new_tokens,
        batch_size=request.batch_size,
        chat_template=chat_template,
        system_prompt=system_prompt,
        refusal_tokens=_refusal_tokens(tokenizer),
        engine=request.engine,
    )
    adapter = f" + {llm.adapter_path}" if llm.adapter_path else ""
    print_fn(
        f"steering: category {category!r} ({request.space} vector, norm {float(vector.norm()):.4g}) "
        f"x alpha {request.alpha:g} at layer {layer}, positions {request.positions}"
    )
    print_fn(
        f"model: {llm.name_or_path}{adapter}; vectors: {request.vectors}; greedy, "
        f"at most {request.max_new_tokens} new tokens"
    )
    for i, answer in enumerate(answers, start=1):
        print_fn(f"\n[{i}] prompt: {answer.prompt!r}")
        print_fn(f"  unsteered: {_show(answer.unsteered)}")
        print_fn(f"  steered:   {_show(answer.steered)}")
    n_first = sum(a.unsteered.first_id != a.steered.first_id for a in answers)
    n_changed = sum(a.changed for a in answers)
    print_fn(
        f"\nsteering changed the first token of {n_first} and the answer of {n_changed} of "
        f"{len(answers)} prompt(s) (alpha {request.alpha:g}, category {category!r}, layer {layer})"
    )
    return answers
