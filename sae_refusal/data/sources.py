"""Prompt sources: the HF hub or local files -> :class:`~sae_refusal.data.prompt_set.PromptSet`.

A :class:`PromptSourceConfig` names *one* source: either a hub dataset (``hub_id`` + ``hub_config`` +
``hub_split``, loaded with :func:`datasets.load_dataset`, what a user with network gets) or a local file or
folder (``path``: ``.json``, ``.jsonl``, ``.csv`` or ``.parquet``). Columns are named by config keys
(``text_column``, ``id_column``, ...); a column may be a dotted path into nested rows
(``messages.1.content``: key ``messages``, list index 1, key ``content``).

Rows become prompts with id ``"<name>:<row id>"`` (the ``id_column`` value, else the row index in its
file; rows of a folder use ``"<file stem>:<row index>"``), so prompt ids stay unique when several sources
are concatenated and stay stable when filters or ``limit`` change. Row filters run in this order:
``where`` -> ``categories`` -> ``limit``.

Categories: a category value (from ``category_column``, through ``category_map`` when given, or the fixed
``category``) is resolved to its canonical CoCoNot name with
:func:`~sae_refusal.categories.resolve_category`; an unknown value is an error. Benign sources get
category ``None`` unless a category is configured; ambiguous sources keep the category they resemble. A
harmful row without a category (empty cell, or no ``category`` / ``category_column`` at all) is an error
naming the source, file or hub dataset, row and id: downstream it would count as benign.

Columns are checked before any row is read: an unknown column, or a dotted path that resolves in no row
(a typo such as ``messages.1.contnet``), is an error naming the config key and the available columns. A
CSV file cut inside a quoted field is an error naming the file and line, never a partial last row.

Presets (:data:`PRESETS`, :func:`preset`) cover the datasets of the project. Each preset has a hub
variant (:data:`PRESETS`, the default) and a local variant (:data:`LOCAL_PRESETS`, ``path`` relative to
a data root such as ``../shared/data``): ``preset(name)`` gives the hub variant, ``preset(name,
local=True)`` or ``preset(name, path=...)`` the local one. In a :class:`PromptSetConfig`, presets listed
under ``presets`` use their local variant when ``data_root`` is set and their hub variant otherwise.
"""

from __future__ import annotations

import copy
import csv
import json
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

from sae_refusal.categories import SAFETY, resolve_category
from sae_refusal.data.prompt_set import Label, Prompt, PromptSet
from sae_refusal.errors import UserError

#: File suffixes :func:`load_source` reads.
SUPPORTED_SUFFIXES: tuple[str, ...] = (".json", ".jsonl", ".csv", ".parquet")

#: Pseudo-column holding the file stem of each local row (e.g. the MMLU subject file).
FILE_COLUMN = "_file"

#: Tag value of a row whose tag column is empty.
MISSING_TAG = "(missing)"


@dataclass
class PromptSourceConfig:
    """One prompt source: a hub dataset or a local file / folder, plus how to read its rows.

    Args:
        name: Source name; prefix of every prompt id (``"<name>:<row id>"``) and ``Prompt.source``.
        label: ``"harmful"``, ``"benign"`` or ``"ambiguous"`` (looks refusable, should be answered).
        path: Local ``.json`` / ``.jsonl`` / ``.csv`` / ``.parquet`` file, or a folder (all such files in
            it, sorted by name). A relative path is resolved against the ``data_root`` argument.
            Exactly one of ``path`` and ``hub_id`` must be set.
        hub_id: HF hub dataset id, loaded with ``datasets.load_dataset(hub_id, hub_config, split=hub_split)``.
        hub_config: Hub dataset configuration (subset) name.
        hub_split: Hub split; slices such as ``"train[:60%]"`` work.
        text_column: Column with the user message.
        id_column: Column with a row id; the row index is used when unset.
        category_column: Column with a category (CoCoNot name or short name, or a key of ``category_map``).
        subcategory_column: Column with a finer category, kept as is.
        subcategory_regex: Optional regex applied to subcategory values with ``re.fullmatch``; group 1 is
            kept (e.g. ``"(.+)_test"`` turns the MMLU file stem ``anatomy_test`` into ``anatomy``).
        response_column: Column with a reference answer; dotted paths (``messages.1.content``) work.
        category: Fixed CoCoNot category for every row (e.g. ``"Requests with safety concerns"``).
        category_map: Source category value -> CoCoNot category (canonical or short name).
        categories: Keep only rows of these CoCoNot categories (canonical or short names); each must
            have at least one row.
        where: Keep only rows whose column (key) equals the value (compared as strings).
        limit: Keep at most this many rows (the first ones, in file order, after the filters).
        csv_header: Whether CSV files start with a header row.
        csv_columns: Column names for CSV files; required when ``csv_header`` is false, and replace the
            header row when it is true.
        tag_columns: Columns kept as tags on each prompt (``adversarial``, ``language``, ...; dotted paths
            work): the slices an eval report breaks refusal down by. An empty cell gets the tag value
            ``"(missing)"``.
        strip_quotes: Remove one pair of double quotes wrapping a whole message. CoCoNot wraps every
            "Humanizing requests" prompt, and almost nothing else, in quotes: a surface cue a classifier or
            fine-tune learns instead of the category (on by default in the CoCoNot presets).
    """

    name: str
    label: str
    path: str | None = None
    hub_id: str | None = None
    hub_config: str | None = None
    hub_split: str = "train"
    text_column: str = "prompt"
    id_column: str | None = None
    category_column: str | None = None
    subcategory_column: str | None = None
    subcategory_regex: str | None = None
    response_column: str | None = None
    category: str | None = None
    category_map: dict[str, str] | None = None
    categories: list[str] | None = None
    where: dict[str, str] | None = None
    limit: int | None = None
    csv_header: bool = True
    csv_columns: list[str] | None = None
    tag_columns: list[str] | None = None
    strip_quotes: bool = False

    def __post_init__(self) -> None:
        if not self.name or ":" in self.name:
            raise ValueError(f"name: source name must be non-empty and contain no ':' (got {self.name!r})")
        _parse_label(self.label, self.name)
        if (self.path is None) == (self.hub_id is None):
            which = "both are set" if self.path is not None else "neither is set"
            raise ValueError(f"source {self.name!r}: set exactly one of `path` and `hub_id` ({which})")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"source {self.name!r}: `limit` must be >= 1 (got {self.limit})")
        if self.category is not None and self.category_column is not None:
            raise ValueError(f"source {self.name!r}: set `category` or `category_column`, not both")
        if self.category_map is not None and self.category_column is None:
            raise ValueError(f"source {self.name!r}: `category_map` needs `category_column`")
        if not self.csv_header and not self.csv_columns:
            raise ValueError(f"source {self.name!r}: `csv_header: false` needs `csv_columns`")
        if self.subcategory_regex is not None:
            try:
                re.compile(self.subcategory_regex)
            except re.error as err:
                raise ValueError(f"source {self.name!r}: `subcategory_regex` is not a regex: {err}") from err

    @property
    def parsed_label(self) -> Label:
        """The label as a :class:`Label`."""
        return _parse_label(self.label, self.name)


@dataclass
class PromptSetConfig:
    """Several prompt sources, concatenated in order into one prompt set.

    Args:
        sources: Explicit source configs.
        presets: Names of presets (see ``sae_refusal.data.sources.PRESETS``) added after ``sources``;
            each uses its local file when ``data_root`` is set, its hub dataset otherwise.
        data_root: Folder that relative source paths (and local preset paths) are resolved against.
    """

    sources: list[PromptSourceConfig] = field(default_factory=list)
    presets: list[str] = field(default_factory=list)
    data_root: str | None = None

    def resolved_sources(self) -> list[PromptSourceConfig]:
        """The explicit sources followed by the presets' configs.

        Raises:
            ValueError: If no source is configured, a preset is unknown or two sources share a name.
        """
        out = list(self.sources)
        for name in self.presets:
            out.append(preset(name, local=self.data_root is not None))
        if not out:
            raise ValueError("prompt set: configure at least one entry in `sources` or `presets`")
        dupes = [n for n, k in Counter(s.name for s in out).items() if k > 1]
        if dupes:
            raise ValueError(
                f"prompt set: source names must be unique (they prefix prompt ids); repeated: {dupes}"
            )
        return out


def _parse_label(label: str, name: str) -> Label:
    try:
        return Label(label)
    except ValueError:
        valid = ", ".join(str(v) for v in Label)
        message = f"source {name!r}: label: unknown label {label!r}; expected one of {valid}"
        raise ValueError(message) from None


# --------------------------------------------------------------------------------------------- reading


@dataclass
class _Table:
    """Rows of one file (or hub split) with a human-readable origin for error messages."""

    origin: str
    columns: list[str]
    rows: list[dict[str, Any]]
    id_prefix: str = ""  # "<file stem>:" for rows of a folder


def _resolve_path(path: str, data_root: str | Path | None) -> Path:
    p = Path(path).expanduser()
    if not p.is_absolute() and data_root is not None:
        p = Path(data_root).expanduser() / p
    return p


def _read_local(raw_path: str, cfg: PromptSourceConfig, data_root: str | Path | None) -> list[_Table]:
    path = _resolve_path(raw_path, data_root)
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in SUPPORTED_SUFFIXES)
        if not files:
            raise FileNotFoundError(
                f"source {cfg.name!r}: `path` folder {path} has no {'/'.join(SUPPORTED_SUFFIXES)} files"
            )
        return [replace(_read_file(f, cfg), id_prefix=f"{f.stem}:") for f in files]
    if not path.is_file():
        hint = "" if data_root is not None or path.is_absolute() else " (relative paths need `data_root`)"
        raise FileNotFoundError(f"source {cfg.name!r}: `path` not found: {path}{hint}")
    return [_read_file(path, cfg)]


def _read_file(path: Path, cfg: PromptSourceConfig) -> _Table:
    suffix = path.suffix.lower()
    if suffix == ".json":
        rows = _read_json(path)
    elif suffix == ".jsonl":
        rows = _read_jsonl(path)
    elif suffix == ".csv":
        return _read_csv(path, cfg)
    elif suffix == ".parquet":
        rows = _read_parquet(path)
    else:
        raise ValueError(
            f"source {cfg.name!r}: `path` {path} has unsupported suffix {suffix!r}; "
            f"expected one of {', '.join(SUPPORTED_SUFFIXES)}"
        )
    columns = list(dict.fromkeys(k for row in rows for k in row))
    for row in rows:
        row[FILE_COLUMN] = path.stem
    return _Table(str(path), [*columns, FILE_COLUMN], rows)


def _check_objects(rows: Sequence[Any], path: Path, what: str) -> list[dict[str, Any]]:
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: {what} {i} is not a JSON object (got {type(row).__name__})")
    return list(rows)


def _read_json(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of row objects, got {type(data).__name__}")
    return _check_objects(data, path, "row")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows: list[Any] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err})") from err
    return _check_objects(rows, path, "row")


def _csv_records(path: Path, cfg: PromptSourceConfig) -> list[tuple[int, list[str]]]:
    """``(first line, fields)`` of every CSV record; a quoted field still open at the end is an error.

    Python's lenient CSV reader returns the partial field of a file cut inside quotes as if it were
    complete; ``strict=True`` makes that (and other malformed quoting) an error, reported with the
    line the broken record starts on.
    """
    records: list[tuple[int, list[str]]] = []
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, strict=True)
        while True:
            start = reader.line_num + 1
            try:
                record = next(reader)
            except StopIteration:
                break
            except csv.Error as err:
                if "unexpected end of data" in str(err):
                    raise ValueError(
                        f"source {cfg.name!r}: {path}:{start}: a quoted field opened in the record on line "
                        f"{start} is not closed before the end of the file (truncated or unbalanced "
                        f"quotes?); the partial row is not loaded"
                    ) from err
                raise ValueError(f"source {cfg.name!r}: {path}:{start}: malformed CSV ({err})") from err
            records.append((start, record))
    return records


def _read_csv(path: Path, cfg: PromptSourceConfig) -> _Table:
    records = _csv_records(path, cfg)
    if cfg.csv_header:
        if not records:
            raise ValueError(f"source {cfg.name!r}: CSV file {path} is empty (no header row)")
        header, body = records[0][1], records[1:]
        columns = list(cfg.csv_columns) if cfg.csv_columns else header
        if cfg.csv_columns and len(header) != len(columns):
            raise ValueError(
                f"source {cfg.name!r}: `csv_columns` has {len(columns)} names but {path} has "
                f"{len(header)} header columns {header}"
            )
    else:
        columns, body = list(cfg.csv_columns or []), records
    rows = []
    for i, (line, record) in enumerate(body):
        if len(record) != len(columns):
            raise ValueError(
                f"source {cfg.name!r}: {path} row {i} (line {line}) has {len(record)} fields, "
                f"expected {len(columns)} ({columns}); check `csv_header` / `csv_columns`"
            )
        row: dict[str, Any] = dict(zip(columns, record, strict=True))
        row[FILE_COLUMN] = path.stem
        rows.append(row)
    return _Table(str(path), [*columns, FILE_COLUMN], rows)


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:  # pragma: no cover - pyarrow comes with `datasets`
        raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow)") from err
    rows: list[dict[str, Any]] = pq.read_table(path).to_pylist()
    return rows


def _read_hub(cfg: PromptSourceConfig) -> _Table:
    import datasets

    origin = f"hub dataset {cfg.hub_id!r} (config {cfg.hub_config!r}, split {cfg.hub_split!r})"
    try:
        ds = datasets.load_dataset(cfg.hub_id, cfg.hub_config, split=cfg.hub_split)
    except Exception as err:  # network, auth, offline mode, a missing config: one line naming the source
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        cause = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
        raise UserError(
            f"source {cfg.name!r}: could not load {origin} ({cause}). Offline? Use a local file "
            f"(`path`, or a preset with `data_root`)."
        ) from None
    rows = [dict(r) for r in ds]
    columns = list(getattr(ds, "column_names", None) or dict.fromkeys(k for r in rows for k in r))
    return _Table(origin, columns, rows)


# --------------------------------------------------------------------------------------------- rows

_MISSING = object()


def _lookup(row: Mapping[str, Any], column: str) -> Any:
    """Value of ``column`` in ``row``; dotted paths index into dicts and lists. ``_MISSING`` if absent."""
    if column in row:
        return row[column]
    value: Any = row
    for part in column.split("."):
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        elif isinstance(value, Sequence) and not isinstance(value, str) and part.lstrip("-").isdigit():
            index = int(part)
            if not -len(value) <= index < len(value):
                return _MISSING
            value = value[index]
        else:
            return _MISSING
    return value


def _describe_miss(row: Mapping[str, Any], column: str) -> str:
    """Where the dotted path ``column`` stops resolving in ``row``, and what is there instead."""
    value: Any = row
    done: list[str] = []
    for part in column.split("."):
        if isinstance(value, Mapping):
            if part not in value:
                return f"{'.'.join(done)!r} has keys {sorted(map(str, value))}, no {part!r}"
            value = value[part]
        elif isinstance(value, Sequence) and not isinstance(value, str):
            if not part.lstrip("-").isdigit() or not -len(value) <= int(part) < len(value):
                return f"{'.'.join(done)!r} is a list of {len(value)} items, no index {part!r}"
            value = value[int(part)]
        else:
            return f"{'.'.join(done)!r} is a {type(value).__name__}, not indexable by {part!r}"
        done.append(part)
    return "it resolves"  # pragma: no cover - only called for paths that did not resolve


def _check_column(table: _Table, column: str, key: str, cfg: PromptSourceConfig) -> None:
    """Raise unless ``column`` is a column of ``table`` or a dotted path that resolves in some row.

    A dotted path may be absent from some rows (a conversation without a second turn gives ``None``), but a
    path that resolves in no row at all is a typo, not missing data.
    """
    root = column if column in table.columns else column.split(".")[0]
    if root not in table.columns:
        raise ValueError(
            f"source {cfg.name!r}: `{key}` column {column!r} not found in {table.origin}; "
            f"available columns: {table.columns}"
        )
    if root == column or not table.rows:
        return
    if any(_lookup(row, column) is not _MISSING for row in table.rows):
        return
    first = next((row for row in table.rows if root in row), table.rows[0])
    raise ValueError(
        f"source {cfg.name!r}: `{key}` path {column!r} resolves in no row of {table.origin} "
        f"(e.g. row {table.rows.index(first)}: {_describe_miss(first, column)}); "
        f"available columns: {table.columns}"
    )


def _as_text(value: Any) -> str | None:
    """A cell as a string; ``None`` for missing / empty cells."""
    if value is _MISSING or value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    return text if text.strip() else None


def _resolve_config_categories(
    cfg: PromptSourceConfig,
) -> tuple[str | None, dict[str, str], list[str] | None]:
    where = f"source {cfg.name!r}"
    fixed = resolve_category(cfg.category, key=f"{where}: category") if cfg.category else None
    mapping = {
        raw: resolve_category(value, key=f"{where}: category_map[{raw!r}]")
        for raw, value in (cfg.category_map or {}).items()
    }
    wanted = None
    if cfg.categories is not None:
        wanted = [resolve_category(c, key=f"{where}: categories[{i}]") for i, c in enumerate(cfg.categories)]
    return fixed, mapping, wanted


def load_source(cfg: PromptSourceConfig, data_root: str | Path | None = None) -> PromptSet:
    """Load one source as a prompt set.

    Args:
        cfg: The source config.
        data_root: Folder that a relative ``cfg.path`` is resolved against (ignored for hub sources).

    Returns:
        The prompts, in file order (files of a folder sorted by name).

    Raises:
        FileNotFoundError: If ``path`` does not exist (or a folder has no readable files).
        ValueError: On an unknown column or a dotted path that resolves in no row, a malformed or
            truncated CSV file, an empty text, an unknown category, a harmful row without a category, a
            requested category without rows, or duplicate row ids; messages name the config key, the file
            (or hub dataset) and the row.
        UserError: If a hub dataset cannot be loaded (naming the source and the cause in one line).
    """
    label = cfg.parsed_label
    fixed, mapping, wanted = _resolve_config_categories(cfg)
    regex = re.compile(cfg.subcategory_regex) if cfg.subcategory_regex else None
    tables = _read_local(cfg.path, cfg, data_root) if cfg.path is not None else [_read_hub(cfg)]

    prompts: list[Prompt] = []
    seen: dict[str, str] = {}
    for table in tables:
        if not table.rows:  # before the column checks: an empty file has no columns to name
            raise ValueError(f"source {cfg.name!r}: {table.origin} has no rows (an empty file?)")
        column_keys = [
            ("text_column", cfg.text_column),
            ("id_column", cfg.id_column),
            ("category_column", cfg.category_column),
            ("subcategory_column", cfg.subcategory_column),
            ("response_column", cfg.response_column),
            *((f"where[{col!r}]", col) for col in (cfg.where or {})),
            *((f"tag_columns[{i}]", col) for i, col in enumerate(cfg.tag_columns or [])),
        ]
        for key, column in column_keys:
            if column is not None:
                _check_column(table, column, key, cfg)
        prompts.extend(_table_prompts(table, cfg, label, fixed, mapping, regex, seen))

    if wanted is not None:
        have = Counter(p.category for p in prompts)
        empty = [c for c in wanted if have[c] == 0]
        if empty:
            raise ValueError(
                f"source {cfg.name!r}: `categories` asks for {empty} but {_origin(tables)} has no rows of it "
                f"(empty category); categories present: {dict(have)}"
            )
        keep = set(wanted)
        prompts = [p for p in prompts if p.category in keep]
    if cfg.limit is not None:
        prompts = prompts[: cfg.limit]
    return PromptSet(prompts)


def _origin(tables: list[_Table]) -> str:
    if len(tables) == 1:
        return tables[0].origin
    return f"{Path(tables[0].origin).parent} ({len(tables)} files)"


def _strip_wrapping_quotes(text: str) -> str | None:
    """``text`` without one pair of double quotes around all of it (``None`` if nothing is left)."""
    stripped = text.strip()
    if len(stripped) >= 2 and stripped[0] == '"' and stripped[-1] == '"':
        return _as_text(stripped[1:-1].strip())
    return text


def _uncategorised_harmful(cfg: PromptSourceConfig, origin: str, index: int, prompt_id: str) -> str:
    where = f"source {cfg.name!r}: harmful row {index} (id {prompt_id!r}) of {origin} has no category"
    if cfg.category_column is None:
        fix = "set `category` (one category for every row) or `category_column`"
    else:
        fix = f"its `category_column` {cfg.category_column!r} is empty; fill it in or remove the row"
    return f"{where}: {fix} (a harmful prompt without a category would count as benign, class 0)"


def _table_prompts(
    table: _Table,
    cfg: PromptSourceConfig,
    label: Label,
    fixed: str | None,
    mapping: dict[str, str],
    regex: re.Pattern[str] | None,
    seen: dict[str, str],
) -> Iterator[Prompt]:
    where = {col: str(value) for col, value in (cfg.where or {}).items()}
    for index, row in enumerate(table.rows):
        if any(str(_lookup(row, col)) != value for col, value in where.items()):
            continue
        text = _as_text(_lookup(row, cfg.text_column))
        if text is not None and cfg.strip_quotes:
            text = _strip_wrapping_quotes(text)
        if text is None:
            raise ValueError(
                f"source {cfg.name!r}: empty text in {table.origin} row {index} "
                f"(`text_column` {cfg.text_column!r})"
            )
        row_id = str(index)
        if cfg.id_column is not None:
            raw_id = _as_text(_lookup(row, cfg.id_column))
            if raw_id is None:
                raise ValueError(
                    f"source {cfg.name!r}: empty id in {table.origin} row {index} "
                    f"(`id_column` {cfg.id_column!r})"
                )
            row_id = raw_id
        prompt_id = f"{cfg.name}:{table.id_prefix}{row_id}"
        if prompt_id in seen:
            raise ValueError(
                f"source {cfg.name!r}: duplicate id {prompt_id!r} in {table.origin} row {index} "
                f"(also in {seen[prompt_id]}); check `id_column`"
            )
        seen[prompt_id] = f"{table.origin} row {index}"

        category = fixed
        if cfg.category_column is not None:
            raw = _as_text(_lookup(row, cfg.category_column))
            if raw is not None:
                key = f"source {cfg.name!r}: {table.origin} row {index} (id {prompt_id!r}) "
                key += f"`category_column` {cfg.category_column!r}"
                if mapping:
                    key += " (value not in `category_map`)"
                category = mapping.get(raw) or resolve_category(raw, key=key)
        if category is None and label is Label.HARMFUL:
            raise ValueError(_uncategorised_harmful(cfg, table.origin, index, prompt_id))
        subcategory = None
        if cfg.subcategory_column is not None:
            subcategory = _as_text(_lookup(row, cfg.subcategory_column))
            if subcategory is not None and regex is not None:
                match = regex.fullmatch(subcategory)
                if match:
                    subcategory = match.group(1) if regex.groups else match.group(0)
        response = _as_text(_lookup(row, cfg.response_column)) if cfg.response_column else None
        tags = tuple((col, _as_text(_lookup(row, col)) or MISSING_TAG) for col in (cfg.tag_columns or []))
        yield Prompt(
            id=prompt_id,
            text=text,
            label=label,
            category=category,
            subcategory=subcategory,
            source=cfg.name,
            response=response,
            tags=tags,
        )


def load_prompt_set(cfg: PromptSetConfig) -> PromptSet:
    """Load and concatenate every source of ``cfg`` (ids stay unique through the source-name prefix).

    Args:
        cfg: The prompt-set config.

    Raises:
        ValueError: See :meth:`PromptSetConfig.resolved_sources` and :func:`load_source`.
    """
    out = PromptSet([])
    for source in cfg.resolved_sources():
        out = out + load_source(source, cfg.data_root)
    return out


def load_builtin() -> PromptSet:
    """The small prompt set shipped with the package (``data/builtin/default_prompts.jsonl``).

    Raises:
        FileNotFoundError: If the package was installed without its data file.
    """
    resource = resources.files("sae_refusal.data").joinpath("builtin", "default_prompts.jsonl")
    with resources.as_file(resource) as path:
        return PromptSet.from_jsonl(path)


# --------------------------------------------------------------------------------------------- presets


def _both(
    name: str, label: str, *, hub: dict[str, Any], local: dict[str, Any], **common: Any
) -> tuple[PromptSourceConfig, PromptSourceConfig]:
    return (
        PromptSourceConfig(name=name, label=label, **common, **hub),
        PromptSourceConfig(name=name, label=label, **common, **local),
    )


_COCONOT_COLUMNS: dict[str, Any] = {
    "id_column": "id",
    "category_column": "category",
    "subcategory_column": "subcategory",
}
_ALPACA_HUB: dict[str, Any] = {
    "hub_id": "tatsu-lab/alpaca",
    "where": {"input": ""},  # the local harmless splits hold instructions without an input field
    "response_column": "output",
}
_WILDGUARD_HUB: dict[str, Any] = {
    "hub_id": "allenai/wildguardmix",
    "hub_config": "wildguardtest",
    "hub_split": "test",
}

_PRESET_PAIRS: dict[str, tuple[PromptSourceConfig, PromptSourceConfig]] = {
    "coconot": _both(
        "coconot",
        "harmful",
        hub={"hub_id": "allenai/coconot", "hub_config": "original", "hub_split": "test"},
        local={"path": "coconot/coconot_eval.jsonl"},
        strip_quotes=True,
        **_COCONOT_COLUMNS,
    ),
    "coconot_contrast": _both(
        "coconot_contrast",
        "ambiguous",
        hub={"hub_id": "allenai/coconot", "hub_config": "contrast", "hub_split": "test"},
        local={"path": "coconot/coconot_contrast_eval.jsonl"},
        **_COCONOT_COLUMNS,
    ),
    "coconot_pref": _both(
        "coconot_pref",
        "ambiguous",
        hub={"hub_id": "allenai/coconot", "hub_config": "pref", "hub_split": "train"},
        local={"path": "coconot/coconot_pref.jsonl"},
        response_column="chosen",
        **_COCONOT_COLUMNS,
    ),
    "alpaca_train": _both(
        "alpaca_train",
        "benign",
        hub={**_ALPACA_HUB, "hub_split": "train[:60%]"},
        local={"path": "benign/alpaca_harmless_train.json"},
        text_column="instruction",
    ),
    "alpaca_val": _both(
        "alpaca_val",
        "benign",
        hub={**_ALPACA_HUB, "hub_split": "train[60%:80%]"},
        local={"path": "benign/alpaca_harmless_val.json"},
        text_column="instruction",
    ),
    "alpaca_test": _both(
        "alpaca_test",
        "benign",
        hub={**_ALPACA_HUB, "hub_split": "train[80%:]"},
        local={"path": "benign/alpaca_harmless_test.json"},
        text_column="instruction",
    ),
    "ultrachat": _both(
        "ultrachat",
        "benign",
        hub={"hub_id": "HuggingFaceH4/ultrachat_200k", "hub_split": "train_sft"},
        local={"path": "benign/ultrachat_sample20.json"},
        id_column="prompt_id",
        response_column="messages.1.content",
    ),
    "mmlu": _both(
        "mmlu",
        "benign",
        hub={
            "hub_id": "cais/mmlu",
            "hub_config": "all",
            "hub_split": "test",
            "subcategory_column": "subject",
        },
        local={
            "path": "mmlu/data/test",
            "csv_header": False,
            "csv_columns": ["question", "A", "B", "C", "D", "answer"],
            "subcategory_column": FILE_COLUMN,
            "subcategory_regex": r"(.+)_(?:dev|val|test)",
        },
        text_column="question",
    ),
    "gsm8k": _both(
        "gsm8k",
        "benign",
        hub={"hub_id": "openai/gsm8k", "hub_config": "main", "hub_split": "test"},
        local={"path": "gsm8k/test.jsonl"},
        text_column="question",
        response_column="answer",
    ),
    "truthfulqa": _both(
        "truthfulqa",
        "benign",
        hub={
            "hub_id": "truthfulqa/truthful_qa",
            "hub_config": "generation",
            "hub_split": "validation",
            "text_column": "question",
            "subcategory_column": "category",
            "response_column": "best_answer",
        },
        local={
            "path": "truthfulqa/TruthfulQA.csv",
            "text_column": "Question",
            "subcategory_column": "Category",
            "response_column": "Best Answer",
        },
    ),
    "or_bench_hard": _both(
        "or_bench_hard",
        "ambiguous",
        hub={"hub_id": "bench-llm/or-bench", "hub_config": "or-bench-hard-1k"},
        local={"path": "or_bench/or-bench-hard-1k.csv"},
        category=SAFETY,
        subcategory_column="category",
    ),
    "or_bench_toxic": _both(
        "or_bench_toxic",
        "harmful",
        hub={"hub_id": "bench-llm/or-bench", "hub_config": "or-bench-toxic"},
        local={"path": "or_bench/or-bench-toxic.csv"},
        category=SAFETY,
        subcategory_column="category",
    ),
    "wildguardtest_harmful": _both(
        "wildguardtest_harmful",
        "harmful",
        hub={
            **_WILDGUARD_HUB,
            "where": {"prompt_harm_label": "harmful"},
            "subcategory_column": "subcategory",
        },
        local={"path": "wildguardtest/wildguardtest_harmful.csv", "subcategory_column": "category"},
        category=SAFETY,
    ),
    "wildguardtest_unharmful": _both(
        "wildguardtest_unharmful",
        "benign",
        hub={**_WILDGUARD_HUB, "where": {"prompt_harm_label": "unharmful"}},
        local={"path": "wildguardtest/wildguardtest_unharmful.csv"},
    ),
}

#: Hub variant of every preset (what a user with network gets by default).
PRESETS: dict[str, PromptSourceConfig] = {name: pair[0] for name, pair in _PRESET_PAIRS.items()}

#: Local variant of every preset; ``path`` is relative to a data root such as ``../shared/data``.
LOCAL_PRESETS: dict[str, PromptSourceConfig] = {name: pair[1] for name, pair in _PRESET_PAIRS.items()}

_FIELD_NAMES = tuple(f.name for f in fields(PromptSourceConfig))


def preset(name: str, *, local: bool | None = None, **overrides: Any) -> PromptSourceConfig:
    """A fresh copy of a preset source config, with overrides.

    Args:
        name: Preset name, a key of :data:`PRESETS`.
        local: ``True`` for the local-file variant (:data:`LOCAL_PRESETS`, ``path`` relative to a data
            root), ``False`` for the hub variant; ``None`` (default) picks local when ``path`` is among
            the overrides and hub otherwise. Overriding ``hub_id`` on the local variant clears its
            ``path`` (and ``path`` on the hub variant clears ``hub_id``), so the result stays valid.
        **overrides: Any :class:`PromptSourceConfig` field, e.g. ``limit=100`` or ``categories=["safety"]``.

    Raises:
        ValueError: If ``name`` or an override key is unknown, or the result is not a valid config.
    """
    if name not in _PRESET_PAIRS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(_PRESET_PAIRS)}")
    unknown = sorted(set(overrides) - set(_FIELD_NAMES))
    if unknown:
        raise ValueError(f"preset {name!r}: unknown config keys {unknown}; valid keys: {list(_FIELD_NAMES)}")
    if local is None:
        local = "path" in overrides
    base = LOCAL_PRESETS[name] if local else PRESETS[name]
    if local and "hub_id" in overrides and "path" not in overrides:
        overrides["path"] = None
    if not local and "path" in overrides and "hub_id" not in overrides:
        overrides["hub_id"] = None
    return replace(copy.deepcopy(base), **copy.deepcopy(overrides))


__all__ = [
    "FILE_COLUMN",
    "LOCAL_PRESETS",
    "MISSING_TAG",
    "PRESETS",
    "SUPPORTED_SUFFIXES",
    "PromptSetConfig",
    "PromptSourceConfig",
    "load_builtin",
    "load_prompt_set",
    "load_source",
    "preset",
]
