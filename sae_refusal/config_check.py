"""Config files checked before anything heavy is imported, and parser errors said in one line.

``sae-refusal`` reads every YAML file a command line names (``--config F``, ``-c F``, ``--config=F``, and
a section given as a file, ``--data F.yaml``) before it imports Lightning, torch or transformers, so a
missing, empty or garbled file is reported at once, naming the file and the line: :func:`check_config_files`.

The parsers (jsonargparse, under LightningCLI and the job commands) report a bad value as a block: a
"Does not validate against any of the Union subtypes" preamble, one bullet per candidate type, the whole
namespace repeated. :func:`tidy_parse_error` keeps the reason (the config key and what is wrong) and drops
the rest, so the first line of the error is the one a user needs.

Imports only the standard library and PyYAML.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sae_refusal.errors import UserError

__all__ = [
    "check_config_files",
    "config_file_args",
    "merged_config",
    "preflight_finetune",
    "preflight_fit",
    "tidy_parse_error",
]

#: Flags whose value is a config file (jsonargparse's ``ActionConfigFile``).
_CONFIG_FLAGS = ("--config", "-c")
_YAML_SUFFIXES = (".yaml", ".yml")


def config_file_args(args: Sequence[str]) -> list[tuple[str, str]]:
    """``(flag, path)`` of every config file ``args`` name: ``--config F``, ``-c F``, ``--config=F``, and
    ``--SECTION F.yaml`` (a section given as a file, e.g. ``--data lightning_configs/data/x.yaml``)."""
    found: list[tuple[str, str]] = []
    items = list(args)
    for i, item in enumerate(items):
        flag, sep, value = item.partition("=")
        if not flag.startswith("-"):
            continue
        if not sep:
            value = items[i + 1] if i + 1 < len(items) else ""
            if value.startswith("-") and value != "-":
                continue
        if flag in _CONFIG_FLAGS:
            if value and value != "-":  # "-" reads stdin, which the parser takes
                found.append((flag, value))
        elif flag.startswith("--") and "." not in flag and value.endswith(_YAML_SUFFIXES):
            found.append((flag, value))
    return found


def _yaml_problem(err: Exception) -> str:
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}"


def check_config_files(args: Sequence[str], sections: str = "trainer, model, data") -> None:
    """Refuse a config file that is missing, unreadable, not YAML, empty, or not a mapping.

    Args:
        args: The command's arguments (after the subcommand).
        sections: Examples of top-level keys, for the message about an empty file.

    Raises:
        UserError: Naming the flag and the file (and the line of a YAML error).
    """
    import yaml

    for flag, name in config_file_args(args):
        path = Path(name)
        if not path.exists():
            raise UserError(f"{flag} {name}: no such file")
        if path.is_dir():
            raise UserError(f"{flag} {name}: is a folder, not a YAML file")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"{flag} {name}: cannot be read ({err})") from None
        try:
            value: Any = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise UserError(f"{flag} {name}: not valid YAML ({_yaml_problem(err)})") from None
        if value is None:
            raise UserError(
                f"{flag} {name}: the file is empty (or only comments); a config is a mapping of "
                f"settings, e.g. {sections}"
            )
        if not isinstance(value, dict):
            raise UserError(
                f"{flag} {name}: expected a mapping of settings (key: value lines), got a YAML "
                f"{type(value).__name__}"
            )


_PARSER_KEY = re.compile(r'^Parser key "(?P<key>[^"]+)":$')
_EXPECTED = re.compile(r"^Expected a <class '(?P<type>[^']+)'>\.?(?: Got value: (?P<value>.*))?$")
_GIVEN = re.compile(r"^Given value: (?P<value>.*)$")
_CLASS_PATH = re.compile(r"^Problem with given class_path '(?P<path>[^']+)':$")
_NOT_ACCEPTED = re.compile(r"^(?:Option|Key) '(?P<key>[^']+)' is not accepted")
#: Lines of a jsonargparse error that carry no reason of their own.
_NOISE = re.compile(
    r"^(Does not validate against any of the Union subtypes|Subtypes: |Errors:$|Given value type: )"
)


def tidy_parse_error(message: str) -> str:
    """The reason inside a jsonargparse error, on one line.

    ``Parser key "model": Does not validate against any of the Union subtypes ... - model.lr must be > 0,
    got -1.0 ...`` becomes ``model.lr must be > 0, got -1.0``; ``Parser key "lr": Expected a <class
    'float'>. Got value: abc`` becomes ``lr: expected float, got 'abc'``; an unknown option inside a class
    becomes ``model: unknown option 'x' of sae_refusal.sae.SAEModule``. Messages in any other shape are
    returned unchanged.
    """
    lines = [line.strip().removeprefix("- ").strip() for line in message.strip().splitlines()]
    lines = [line for line in lines if line]
    if not lines or not (_PARSER_KEY.match(lines[0]) or _NOISE.match(lines[0])):
        return message.strip()
    keys: list[str] = []
    types: list[str] = []
    given: str | None = None
    class_path: str | None = None
    reasons: list[str] = []
    for line in lines:
        if _NOISE.match(line):
            continue
        if match := _PARSER_KEY.match(line):
            keys.append(match["key"])
        elif match := _CLASS_PATH.match(line):
            class_path = match["path"]
        elif match := _EXPECTED.match(line):
            types.append(match["type"])
            given = match["value"] if match["value"] is not None else given
        elif match := _GIVEN.match(line):
            given = match["value"] if given is None else given
        elif match := _NOT_ACCEPTED.match(line):
            owner = f" of {class_path}" if class_path else ""
            reasons.append(f"unknown option {match['key']!r}{owner}")
        else:
            reasons.append(line)
    key = ".".join(keys)
    if class_path is not None:  # "or null" there is the alternative to the whole class, not to this key
        types = [t for t in types if t != "NoneType"]
    if reasons:
        text = "; ".join(dict.fromkeys(reasons))
        return text if not key or text.startswith(keys[0] + ".") else f"{key}: {text}"
    wanted = [t for t in types if t != "NoneType"]
    if wanted:
        expected = " or ".join(dict.fromkeys(wanted)) + (" (or null)" if "NoneType" in types else "")
        got = f", got {given!r}" if given is not None else ""
        return f"{key + ': ' if key else ''}expected {expected}{got}"
    return message.strip()


# ------------------------------------------------------------------------------------ the fit preflight


def _set_dotted(config: dict[str, Any], dotted: str, value: Any) -> None:
    node = config
    *parents, leaf = dotted.split(".")
    for key in parents:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[leaf] = value


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    for key, value in update.items():
        old = base.get(key)
        other_class = (
            isinstance(value, dict)
            and isinstance(old, dict)
            and value.get("class_path", old.get("class_path")) != old.get("class_path")
        )
        if other_class:  # another class: the old one's arguments do not carry over
            base[key] = value
        elif isinstance(value, dict) and isinstance(old, dict):
            _merge(old, value)
        else:
            base[key] = value
    return base


def merged_config(args: Sequence[str]) -> dict[str, Any]:
    """What a fit command line sets, merged in order: config files, section files and ``--a.b.c VALUE``.

    A best-effort reading for :func:`preflight_fit` (values read as YAML, as jsonargparse reads them);
    anything it does not understand (``+=`` appends, options without a value) is left out.
    """
    import yaml

    config: dict[str, Any] = {}
    items = list(args)
    i = 0
    while i < len(items):
        flag, sep, value = items[i].partition("=")
        i += 1
        if not flag.startswith("--") and flag != "-c":
            continue
        if not sep:
            if i >= len(items) or items[i].startswith("--"):
                continue
            value, i = items[i], i + 1
        key = flag.lstrip("-")
        if flag in _CONFIG_FLAGS or "+" in key:
            if flag in _CONFIG_FLAGS and value != "-":
                loaded = yaml.safe_load(Path(value).read_text(encoding="utf-8"))
                if isinstance(loaded, dict):
                    _merge(config, loaded)
            continue
        if "." not in key and value.endswith(_YAML_SUFFIXES):
            loaded = yaml.safe_load(Path(value).read_text(encoding="utf-8"))
            if isinstance(loaded, dict):
                _merge(config.setdefault(key, {}), loaded)
            continue
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        _set_dotted(config, key, parsed)
    return config


def _settings(node: Any) -> dict[str, Any]:
    """A ``class_path`` node's arguments (``init_args`` merged with keys given beside it, as flags do)."""
    if not isinstance(node, dict):
        return {}
    flat = dict(node.get("init_args") or {})
    flat.update({k: v for k, v in node.items() if k not in ("class_path", "init_args")})
    return flat


_SAE_MODULE = {"sae_refusal.sae.SAEModule", "sae_refusal.sae.module.SAEModule", "SAEModule"}


#: The module defining each architecture outside :mod:`sae_refusal.sae.architectures` (a config may name
#: the class by its full path, as ``--print_config`` writes it).
_ARCHITECTURE_HOMES = {
    "BatchTopK": "sae_refusal.sae.batchtopk",
    "MatryoshkaBatchTopK": "sae_refusal.sae.batchtopk",
    "JumpReLU": "sae_refusal.sae.jumprelu_train",
}


def _architecture_name(class_path: Any) -> str | None:
    """The architecture (a key of ``ARCHITECTURE_ARGS``: ``TopK``, ``BatchTopK``, ...) a ``class_path``
    names, else ``None``."""
    from sae_refusal.sae.settings import ARCHITECTURE_ARGS

    for name in ARCHITECTURE_ARGS:
        home = _ARCHITECTURE_HOMES.get(name, "sae_refusal.sae.architectures")
        if class_path in (f"sae_refusal.sae.{name}", f"{home}.{name}", name):
            return name
    return None


def _typed(args: dict[str, Any], key: str, default: Any) -> Any:
    """``args[key]`` when it has the default's type (a wrong type is the parser's to report), else the
    default."""
    value = args.get(key, default)
    if isinstance(default, tuple):  # a list setting (a tuple default, a YAML list): its check reads it
        return value if isinstance(value, list | tuple) else default
    number = (int, float) if isinstance(default, float) else type(default)
    if isinstance(value, bool) != isinstance(default, bool) or not isinstance(value, number):
        return default
    return value


def _check_keys(args: dict[str, Any], accepted: Sequence[str], where: str, owner: str) -> None:
    """Refuse a key ``owner`` does not take, as the parser would (``where: unknown option 'x' of owner``)."""
    for key in args:
        if key not in accepted and not key.startswith("__") and key != "dict_kwargs":
            raise UserError(f"{where}: unknown option {key!r} of {owner}")


def _check_architecture(node: Any) -> None:
    from sae_refusal.sae import settings as sae_settings

    if not isinstance(node, dict):
        return
    name = _architecture_name(node.get("class_path"))
    if name is None:
        return
    args, defaults = _settings(node), sae_settings.ARCHITECTURE_ARGS[name]
    _check_keys(args, list(defaults), "model.architecture", f"sae_refusal.sae.{name}")
    checks: dict[str, tuple[Callable[..., None], tuple[str, ...]]] = {
        "TopK": (
            sae_settings.check_topk_settings,
            ("k", "aux_k", "aux_coef", "dead_after_steps", "encoder_dtype"),
        ),
        "L1": (sae_settings.check_l1_settings, ("l1_coef", "init_decoder_norm")),
        "JumpReLU": (
            sae_settings.check_jumprelu_settings,
            (
                "l0_coef",
                "bandwidth",
                "init_threshold",
                "init_decoder_norm",
                "init_l0",
                "sparsity_loss",
                "tanh_scale",
            ),
        ),
        "BatchTopK": (
            sae_settings.check_batchtopk_settings,
            ("k", "aux_k", "aux_coef", "dead_after_steps", "threshold_momentum"),
        ),
        "MatryoshkaBatchTopK": (
            sae_settings.check_batchtopk_settings,
            ("k", "aux_k", "aux_coef", "dead_after_steps", "threshold_momentum"),
        ),
        "Contrastive": (
            sae_settings.check_contrastive_settings,
            ("supcon_weight", "separation_weight", "temperature"),
        ),
    }
    check, checked = checks[name]
    check(*(_typed(args, key, defaults[key]) for key in checked))
    if name == "MatryoshkaBatchTopK":
        sae_settings.check_prefix_fractions(_typed(args, "prefix_fractions", defaults["prefix_fractions"]))
    if name == "Contrastive":
        _check_architecture(args.get("base"))


def _build(cls: type, raw: Any, key: str) -> Any:
    """``cls(**raw)`` (a settings dataclass), an unknown field named like the parser names it."""
    if not isinstance(raw, dict):
        return cls()
    try:
        return cls(**raw)
    except TypeError as err:
        unknown = re.search(r"unexpected keyword argument '([^']+)'", str(err))
        if unknown:
            raise UserError(f"{key}: unknown option {unknown.group(1)!r}") from None
        raise
    except ValueError as err:  # the settings' own check: put the section in front of the field it names
        message, (parent, _, tail) = str(err), key.rpartition(".")
        if message.startswith(f"{tail}."):  # "lora.r must be ..." under model.lora
            message = f"{parent}.{message}" if parent else message
        elif not message.startswith(key):  # "dtype: unknown value ..." under data.llm
            message = f"{key}.{message}"
        raise ValueError(message) from None


def preflight_fit(args: Sequence[str]) -> None:
    """Check the SAE and data settings a fit command line gives, before Lightning is imported.

    Only what the full parse would refuse too, with the same message: the SAE module's and architecture's
    ranges (:mod:`sae_refusal.sae.settings`; ``k <= latents`` needs the model width and waits for the full
    parse), ``model.stack_seeds`` with a project architecture other than ``TopK``, and the ``data``
    section's ``llm``, ``cache`` and ``split`` settings and ``layer``. Classes other than the project's are
    left to the parser.

    Raises:
        ValueError: Naming the config key (the settings' own checks).
        UserError: An unknown option of the SAE module, an architecture, the data module or one of its
            settings sections (``data.llm``, ``data.cache``, ``data.split``).
    """
    from sae_refusal.activations.config import DATA_MODULE_ARGS, CacheConfig
    from sae_refusal.data.splits import SplitConfig
    from sae_refusal.llm.config import LLMConfig
    from sae_refusal.sae.settings import MODULE_ARGS, check_module_settings, check_stack_seeds

    config = merged_config(args)
    model = config.get("model")
    if isinstance(model, dict) and model.get("class_path") in _SAE_MODULE:
        module = _settings(model)
        _check_keys(module, list(MODULE_ARGS), "model", "sae_refusal.sae.SAEModule")
        seeds = module.get("seeds")
        check_module_settings(
            _typed(module, "expansion_factor", MODULE_ARGS["expansion_factor"]),
            seeds if isinstance(seeds, list) else None,
            _typed(module, "lr", MODULE_ARGS["lr"]),
        )
        _check_architecture(module.get("architecture"))
        node = module.get("architecture")
        # left out: the module's default TopK; a class of the user's own (name None): the module's own check
        name = (
            "TopK"
            if node is None
            else _architecture_name(node.get("class_path") if isinstance(node, dict) else node)
        )
        if name is not None:
            check_stack_seeds(_typed(module, "stack_seeds", MODULE_ARGS["stack_seeds"]), name)
    data = config.get("data")
    if not isinstance(data, dict) or "class_path" in data:
        return
    _check_keys(data, DATA_MODULE_ARGS, "data", "sae_refusal.activations.ActivationDataModule")
    _build(LLMConfig, data.get("llm"), "data.llm")
    _build(SplitConfig, data.get("split"), "data.split")
    cache = _build(CacheConfig, data.get("cache"), "data.cache")
    layer = data.get("layer")
    if isinstance(layer, int) and not isinstance(layer, bool) and layer not in cache.layers:
        raise ValueError(f"data.layer={layer} is not among cache.layers={list(cache.layers)}")
    batch_size = data.get("batch_size")
    if isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size < 1:
        raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")


def preflight_finetune(args: Sequence[str]) -> None:
    """Check the fine-tuning recipe's model settings (``model.llm``, ``model.lora``, ``model.lr``,
    ``model.warmup_steps``, ``model.decision_weight``) before Lightning is imported, with the rules the
    module applies (:mod:`sae_refusal.finetune.config`).

    Raises:
        ValueError: Naming the config key (the settings' own checks).
        UserError: An unknown option of ``model``, ``model.llm`` or ``model.lora``.
    """
    from sae_refusal.finetune.config import FINETUNE_MODULE_ARGS, LoraSettings, check_finetune_settings
    from sae_refusal.llm.config import LLMConfig

    model = merged_config(args).get("model")
    if not isinstance(model, dict):
        return
    _check_keys(model, list(FINETUNE_MODULE_ARGS), "model", "sae_refusal.finetune.module.RefusalSFTModule")
    _build(LLMConfig, model.get("llm"), "model.llm")
    if isinstance(model.get("lora"), dict):
        _build(LoraSettings, model["lora"], "model.lora")
    check_finetune_settings(
        *(_typed(model, key, FINETUNE_MODULE_ARGS[key]) for key in ("lr", "warmup_steps", "decision_weight"))
    )
