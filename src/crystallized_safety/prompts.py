"""PromptSet: the prompts every experiment starts from, loaded once, validated once, hashed once.

Why this module is strict: a refusal direction is a difference of means between two prompt sets, so a
duplicated prompt silently re-weights it, an identical harmful/harmless pair makes it zero, and a prompt
shared between the extraction and the evaluation set inflates every result. All of these are caught
here with one-line `PromptError`s, and every set carries a content hash so results can name exactly
which prompts produced them.

Loaders: ``.txt`` (one per line, blank lines and ``#`` comments skipped), ``.csv``/``.tsv``, ``.json``
(a list of strings or of objects), ``.jsonl`` and a Hugging Face ``datasets`` dataset saved to disk
(optional dependency, imported only when needed). Bundled sets live in ``data/`` and are split into
train / extract / eval (40 / 20 / 40) by a salted SHA-256 of the harmful prompt, so the split is fixed
across runs and Python versions, and a near-miss twin always lands with its harmful partner.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, overload

from .errors import PromptError
from .validation import is_positive_int

__all__ = [
    "BUNDLED_KINDS",
    "COLUMN_CANDIDATES",
    "SPLITS",
    "SPLIT_FRACTIONS",
    "PromptSet",
    "as_prompt_set",
    "bundled",
    "check_contrast",
    "check_disjoint",
    "load_prompts",
    "near_miss_pairs",
    "over_refusal_rows",
    "normalise",
    "split_of",
]

#: Kinds of bundled sets. "near_miss" is the harmless twins of harmful prompts; "over_refusal" is safe requests
#: that only sound unsafe (evaluation only: no splits).
BUNDLED_KINDS: tuple[str, ...] = ("harmful", "harmless", "near_miss", "over_refusal")
#: Categories of the over-refusal set, in file order.
OVER_REFUSAL_CATEGORIES: tuple[str, ...] = ("homonym", "figurative", "safe_context")
#: Split names, in the order of their hash intervals.
SPLITS: tuple[str, ...] = ("train", "extract", "eval")
#: Fraction of prompts in each split (train 40%, extract 20%, eval 40%).
SPLIT_FRACTIONS: dict[str, float] = {"train": 0.4, "extract": 0.2, "eval": 0.4}
#: Salt of the split hash. Changing it reshuffles every split: bump the version only on purpose.
_SPLIT_SALT = "crystallized-safety:split:v1\n"

#: Columns tried, in order, when no column is given (case-insensitive). Order matters:
#: JailbreakBench has both `Goal` (the request) and `Behavior` (a short label), so goal wins.
COLUMN_CANDIDATES: tuple[str, ...] = (
    "goal",  # AdvBench `goal`, JailbreakBench `Goal`
    "behavior",  # HarmBench `Behavior`
    "instruction",  # Alpaca (instruction only; `input` is ignored)
    "prompt",
    "text",
    "question",
)

_DATA_PACKAGE = __name__.rpartition(".")[0] or "crystallized_safety"
_HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_SUPPORTED = ".txt, .csv, .tsv, .json, .jsonl or a saved Hugging Face dataset directory"


def normalise(prompt: str) -> str:
    """The form used for every comparison: whitespace collapsed and stripped, then case-folded.

    Two prompts that differ only in spacing or case are the same request to a model, so they count as
    duplicates and as overlaps.
    """
    return " ".join(prompt.split()).casefold()


def _short(prompt: str, width: int = 80) -> str:
    """A prompt shortened for a one-line error message."""
    flat = " ".join(prompt.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


@dataclass(frozen=True)
class PromptSet:
    """An ordered, immutable set of prompts with a name, a source and a content hash.

    ``source`` is the file path, or ``bundled:<kind>[:<split>]`` for bundled sets.
    """

    name: str
    prompts: tuple[str, ...]
    source: str
    dropped_duplicates: int = 0  # removed by load_prompts(dedupe=True); not part of the hash

    def __post_init__(self) -> None:
        # Accept any sequence but store a tuple, so the set stays hashable and immutable.
        if not isinstance(self.prompts, tuple):
            object.__setattr__(self, "prompts", tuple(self.prompts))
        for i, p in enumerate(self.prompts):
            if not isinstance(p, str):
                raise PromptError(f"prompt set {self.name!r}: item {i} is {type(p).__name__}, not text; pass strings")

    @property
    def sha256(self) -> str:
        """SHA-256 of the stripped prompts joined by newlines: order-sensitive, name/source-blind."""
        joined = "\n".join(p.strip() for p in self.prompts)
        return hashlib.sha256(joined.encode("utf-8")).hexdigest()

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self) -> Iterator[str]:
        return iter(self.prompts)

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> PromptSet: ...

    def __getitem__(self, index: int | slice) -> str | PromptSet:
        if isinstance(index, slice):
            return PromptSet(self.name, self.prompts[index], self.source)
        return self.prompts[index]

    def head(self, n: int) -> PromptSet:
        """The first ``n`` prompts (all of them if fewer), keeping name and source."""
        if not is_positive_int(n):
            raise PromptError(f"prompt set {self.name!r}: head({n!r}) needs a positive integer")
        return PromptSet(self.name, self.prompts[:n], self.source)


# --------------------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True)
class Selection:
    """Which column holds the prompt, and which rows to keep (`where`: column -> allowed values).

    Rows are kept when every `where` column holds one of its allowed values (compared as text; JSON
    true/false/numbers as JSON writes them), e.g. HarmBench `FunctionalCategory=standard` or XSTest
    `label=safe`."""

    column: str | None = None
    where: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def keeps(self, row: dict[str, Any]) -> bool:
        return all(_as_text(row.get(key)) in allowed for key, allowed in self.where)


def _as_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value)


def parse_where(conditions: Sequence[str] | None) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """`["FunctionalCategory=standard", "label=safe", "label=contrast"]` -> AND over columns, OR within one."""
    allowed: dict[str, list[str]] = {}
    for cond in conditions or ():
        key, sep, value = cond.partition("=")
        if not sep or not key.strip():
            raise PromptError(f"--where {cond!r} is not COLUMN=VALUE; e.g. --where FunctionalCategory=standard")
        allowed.setdefault(key.strip(), []).append(value.strip())
    return tuple((k, tuple(v)) for k, v in allowed.items())


def load_prompts(
    path: str | Path,
    column: str | None = None,
    name: str | None = None,
    limit: int | None = None,
    *,
    where: Sequence[str] | None = None,
    dedupe: bool = False,
) -> PromptSet:
    """Load a prompt file or saved HF dataset into a validated `PromptSet`.

    ``column`` picks the text column of tabular data; without it the usual benchmark layouts are
    recognised (see `COLUMN_CANDIDATES`). ``where`` keeps only rows whose columns hold the given values
    (`parse_where`). A repeated prompt is an error unless ``dedupe``, which keeps the first and counts the
    rest in `PromptSet.dropped_duplicates` (HarmBench's contextual behaviours repeat their text).
    ``limit`` keeps the first ``limit`` prompts, after the whole file has been checked. ``name``
    defaults to the file's stem.
    """
    sel = Selection(column, parse_where(where))
    if isinstance(path, str) and path.startswith("bundled:"):
        parts = path.split(":")
        if len(parts) not in (2, 3):
            raise PromptError(f"bad bundled spec {path!r}; use bundled:KIND or bundled:KIND:SPLIT")
        if sel.where or column is not None:
            raise PromptError(f"{path}: --column and --where apply to files, not bundled sets; drop them")
        found = bundled(parts[1], parts[2] if len(parts) == 3 else None)
        return found.head(limit) if limit is not None else found
    p = Path(path)
    if limit is not None and not is_positive_int(limit):
        raise PromptError(f"{p}: limit must be a positive integer, got {limit!r}")
    if not p.exists():
        raise PromptError(f"prompt file not found: {p}; check the path")
    if p.is_dir():
        if not any((p / m).exists() for m in _HF_MARKERS):
            raise PromptError(
                f"{p}: is a directory but not a saved Hugging Face dataset (no dataset_info.json or "
                f"state.json); pass a prompt file ({_SUPPORTED})"
            )
        items = _read_hf_dataset(p, sel)
    else:
        suffix = p.suffix.lower()
        reader = _READERS.get(suffix)
        if reader is None:
            raise PromptError(f"{p}: unsupported prompt file type {suffix or '(none)'!r}; use {_SUPPORTED}")
        items = reader(p, sel)
    if sel.where and not items:
        shown = " ".join(f"{k}={v}" for k, vs in sel.where for v in vs)
        raise PromptError(f"{p}: no rows match --where {shown}; check the column's values")
    prompts, dropped = _validate(p, items, dedupe)
    if limit is not None:
        prompts = prompts[:limit]
    return PromptSet(name=name or p.stem, prompts=tuple(prompts), source=str(p), dropped_duplicates=dropped)


def as_prompt_set(prompts: PromptSet | Sequence[str], name: str) -> PromptSet:
    """Accept a PromptSet or a plain list of strings (Python API); lists get the same checks as files."""
    if isinstance(prompts, PromptSet):
        if not prompts.prompts:
            raise PromptError(f"prompt set {prompts.name!r} is empty; pass at least one prompt")
        return prompts
    if isinstance(prompts, str):
        raise PromptError(f"{name} prompts must be a list of strings, not one string; wrap it in a list")
    items = list(prompts)
    for i, p in enumerate(items):
        if not isinstance(p, str):
            raise PromptError(f"{name} prompt {i} is {type(p).__name__}, not text; pass strings")
    checked, _ = _validate(name, [(f"item {i}", p) for i, p in enumerate(items)])
    return PromptSet(name=name, prompts=tuple(checked), source="python")


def _validate(path: Path | str, items: Sequence[tuple[str, str]], dedupe: bool = False) -> tuple[list[str], int]:
    """Strip, reject empty sets and duplicates (or drop them: `dedupe`). ``items`` are (location, prompt)
    pairs. Returns the prompts and how many duplicates were dropped."""
    if not items:
        raise PromptError(f"{path}: no prompts found; add at least one non-empty prompt")
    seen: dict[str, str] = {}
    prompts: list[str] = []
    dropped = 0
    for where, prompt in items:
        key = normalise(prompt)
        if key in seen:
            if dedupe:
                dropped += 1
                continue
            raise PromptError(
                f"{path}: duplicate prompt {_short(prompt)!r} at {where} (first at {seen[key]}); remove one of "
                "them, or pass --dedupe to keep the first of each"
            )
        seen[key] = where
        prompts.append(prompt.strip())
    return prompts, dropped


def _read_text(path: Path) -> str:
    """Read UTF-8 (a BOM, as Excel writes, is tolerated)."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise PromptError(f"{path}: not valid UTF-8 (byte {e.start}); re-save the file as UTF-8") from None
    except OSError as e:
        raise PromptError(f"{path}: cannot read file ({e.strerror}); check permissions") from None


def _txt_items(text: str) -> list[tuple[str, str]]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    items = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        if s and not s.startswith("#"):
            items.append((f"line {lineno}", s))
    return items


def _read_txt(path: Path, sel: Selection) -> list[tuple[str, str]]:
    if sel.column is not None or sel.where:
        given = "--column" if sel.column is not None else "--where"
        raise PromptError(f"{path}: {given} only applies to tabular files (.csv, .json, ...); drop it")
    return _txt_items(_read_text(path))


def _read_delimited(path: Path, sel: Selection, delimiter: str) -> list[tuple[str, str]]:
    text = _read_text(path)
    try:
        reader = csv.DictReader(text.splitlines(keepends=True), delimiter=delimiter)
        fields = [f for f in (reader.fieldnames or []) if f is not None]
        rows = list(reader)
    except csv.Error as e:
        raise PromptError(f"{path}: malformed CSV ({e}); fix the file") from None
    col = _pick_column(path, fields, sel)
    return _column_items(path, ((f"row {i}", r) for i, r in enumerate(rows, start=1)), col, sel)


def _read_csv(path: Path, sel: Selection) -> list[tuple[str, str]]:
    return _read_delimited(path, sel, ",")


def _read_tsv(path: Path, sel: Selection) -> list[tuple[str, str]]:
    return _read_delimited(path, sel, "\t")


def _read_json(path: Path, sel: Selection) -> list[tuple[str, str]]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise PromptError(
            f"{path}: invalid JSON at line {e.lineno}, column {e.colno} ({e.msg}); fix the file"
        ) from None
    if isinstance(data, dict):
        # Accept a wrapper object with exactly one list inside, e.g. {"data": [...]}.
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise PromptError(f"{path}: expected a JSON list of strings or objects; got an object")
        data = lists[0]
    if not isinstance(data, list):
        raise PromptError(f"{path}: expected a JSON list of strings or objects; got {type(data).__name__}")
    return _records_items(path, [(f"index {i}", x) for i, x in enumerate(data)], sel)


def _read_jsonl(path: Path, sel: Selection) -> list[tuple[str, str]]:
    records = []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"line {lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise PromptError(f"{path}: invalid JSON on line {lineno} ({e.msg}); fix that line") from None
    return _records_items(path, records, sel)


def _records_items(path: Path, records: list[tuple[str, Any]], sel: Selection) -> list[tuple[str, str]]:
    """JSON(L) records: all strings, or all objects with a text column."""
    if not records:
        return []
    if all(isinstance(x, str) for _, x in records):
        if sel.column is not None or sel.where:
            given = f"--column {sel.column!r}" if sel.column is not None else "--where"
            raise PromptError(f"{path}: holds plain strings, so {given} does not apply; drop it")
        return [(where, x) for where, x in records if x.strip()]
    kind = str if isinstance(records[0][1], str) else dict
    bad = next(((w, x) for w, x in records if not isinstance(x, kind)), None)
    if bad is not None:
        raise PromptError(
            f"{path}: {bad[0]} is {type(bad[1]).__name__}; use only strings or only objects with a text field"
        )
    fields: dict[str, None] = {}
    for _, rec in records:
        fields.update(dict.fromkeys(rec))
    col = _pick_column(path, list(fields), sel)
    return _column_items(path, iter(records), col, sel)


def _read_hf_dataset(path: Path, sel: Selection) -> list[tuple[str, str]]:
    """A dataset saved with ``save_to_disk``; ``datasets`` is optional and imported only here."""
    try:
        import datasets
    except ImportError:
        raise PromptError(
            f"{path}: is a saved Hugging Face dataset but the optional 'datasets' package is not "
            "installed; run `pip install datasets` or export the prompts to .jsonl"
        ) from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001  (any load failure is a problem with that directory)
        raise PromptError(f"{path}: cannot load Hugging Face dataset ({_short(str(e))}); check it") from None
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if len(splits) != 1:
            raise PromptError(
                f"{path}: dataset has splits {', '.join(splits)}; pass one split's directory, e.g. {path / splits[0]}"
            )
        ds = ds[splits[0]]
    col = _pick_column(path, list(ds.column_names), sel)
    keys = list(dict.fromkeys([col, *(k for k, _ in sel.where)]))
    columns = {k: ds[k] for k in keys}
    return _column_items(path, ((f"row {i}", {k: columns[k][i] for k in keys}) for i in range(len(ds))), col, sel)


def _pick_column(path: Path, fields: Sequence[str], sel: Selection) -> str:
    """The requested column, or the first known benchmark column present (case-insensitive); checks that
    every `where` column exists."""
    available = ", ".join(repr(f) for f in fields) or "(none)"
    for key, _values in sel.where:
        if key not in fields:
            raise PromptError(f"{path}: no column {key!r} for --where; available columns: {available}")
    column = sel.column
    if column is not None:
        if column in fields:
            return column
        raise PromptError(f"{path}: no column {column!r}; available columns: {available}")
    by_fold = {f.casefold(): f for f in reversed(list(fields))}
    for candidate in COLUMN_CANDIDATES:
        if candidate in by_fold:
            return by_fold[candidate]
    raise PromptError(
        f"{path}: no known prompt column (tried {', '.join(COLUMN_CANDIDATES)}); available columns: "
        f"{available}; pass --column NAME"
    )


def _column_items(
    path: Path, rows: Iterable[tuple[str, dict[str, Any]]], column: str, sel: Selection
) -> list[tuple[str, str]]:
    """The text of ``column`` in each row `sel` keeps; missing or empty cells are skipped, non-text is an
    error."""
    items = []
    for where, row in rows:
        if not sel.keeps(row):
            continue
        value = row.get(column)
        if value is None:
            continue
        if not isinstance(value, str):
            raise PromptError(
                f"{path}: {where} has {type(value).__name__} in column {column!r}, not text; fix the data"
            )
        if value.strip():
            items.append((where, value))
    return items


_READERS = {
    ".txt": _read_txt,
    ".csv": _read_csv,
    ".tsv": _read_tsv,
    ".json": _read_json,
    ".jsonl": _read_jsonl,
}


# --------------------------------------------------------------------------------------------------
# Bundled sets and splits


def split_of(harmful_prompt: str) -> str:
    """The split ("train", "extract" or "eval") of a prompt, keyed on its harmful side.

    A salted SHA-256 of the normalised text, read as a number in [0, 1), picks the split: stable across
    runs, machines and Python versions (unlike ``hash()``), and a prompt never moves when others are
    added or removed. Near-miss twins are keyed on their harmful partner, so pairs never straddle splits.
    """
    digest = hashlib.sha256((_SPLIT_SALT + normalise(harmful_prompt)).encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    edge = 0.0
    for split in SPLITS:
        edge += SPLIT_FRACTIONS[split]
        if u < edge:
            return split
    return SPLITS[-1]


def _bundled_text(filename: str) -> str:
    """A bundled data file, via importlib.resources so it works from wheels and zips too."""
    return (resources.files(_DATA_PACKAGE) / "data" / filename).read_text(encoding="utf-8")


def near_miss_pairs(split: str | None = None) -> tuple[tuple[str, str], ...]:
    """Bundled (harmful, harmless twin) pairs, optionally restricted to one split."""
    _check_split(split)
    source = "bundled:near_miss.tsv"
    pairs = []
    for lineno, line in enumerate(_bundled_text("near_miss.tsv").splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not all(x.strip() for x in parts):
            raise PromptError(f"{source}: line {lineno} needs 'harmful<TAB>harmless_twin'; fix the file")
        pairs.append((parts[0].strip(), parts[1].strip()))
    _validate(source, [(f"line {i}", h) for i, (h, _) in enumerate(pairs, start=1)])
    _validate(source, [(f"line {i}", t) for i, (_, t) in enumerate(pairs, start=1)])
    if split is not None:
        pairs = [pair for pair in pairs if split_of(pair[0]) == split]
    return tuple(pairs)


def over_refusal_rows() -> tuple[tuple[str, str], ...]:
    """The bundled over-refusal set as (category, prompt) rows, in file order."""
    source = "bundled:over_refusal.tsv"
    lines = _bundled_text("over_refusal.tsv").splitlines()
    if not lines or lines[0] != "category\tprompt":
        raise PromptError(f"{source}: the first line must be the header 'category<TAB>prompt'")
    rows = []
    for lineno, line in enumerate(lines[1:], start=2):
        category, _, prompt = line.partition("\t")
        if category not in OVER_REFUSAL_CATEGORIES or not prompt.strip():
            raise PromptError(f"{source} line {lineno}: want one of {', '.join(OVER_REFUSAL_CATEGORIES)}<TAB>prompt")
        rows.append((category, prompt))
    _validate(source, [(f"line {i}", p) for i, (_c, p) in enumerate(rows, start=2)])
    return tuple(rows)


def bundled(kind: str, split: str | None = None) -> PromptSet:
    """A bundled prompt set: ``kind`` in {harmful, harmless, near_miss, over_refusal}, ``split`` in {None, train,
    extract, eval}. "near_miss" is the harmless twins; a twin's split is its harmful partner's. "over_refusal"
    is for evaluation only and has no splits; its split argument may name a category instead (homonym,
    figurative, safe_context)."""
    if kind not in BUNDLED_KINDS:
        raise PromptError(f"unknown bundled set {kind!r}; use one of {', '.join(BUNDLED_KINDS)}")
    if kind == "over_refusal":
        if split is not None and split not in OVER_REFUSAL_CATEGORIES:
            raise PromptError(
                f"bundled over_refusal has no split {split!r}: it is for evaluation only; give none or a category "
                f"({', '.join(OVER_REFUSAL_CATEGORIES)})"
            )
        chosen = tuple(p for c, p in over_refusal_rows() if split in (None, c))
        label = kind if split is None else f"{kind}:{split}"
        return PromptSet(name=label, prompts=chosen, source=f"bundled:{label}")
    _check_split(split)
    pairs = near_miss_pairs()
    if kind == "near_miss":
        prompts = [twin for _, twin in pairs]
        partner = {normalise(twin): harm for harm, twin in pairs}
    else:
        source = f"bundled:{kind}.txt"
        prompts, _ = _validate(source, _txt_items(_bundled_text(f"{kind}.txt")))
        # Harmless prompts that are twins follow their harmful partner into its split.
        partner = {normalise(twin): harm for harm, twin in pairs} if kind == "harmless" else {}
    if split is not None:
        prompts = [p for p in prompts if split_of(partner.get(normalise(p), p)) == split]
    label = kind if split is None else f"{kind}:{split}"
    return PromptSet(name=label, prompts=tuple(prompts), source=f"bundled:{label}")


def _check_split(split: str | None) -> None:
    if split is not None and split not in SPLITS:
        raise PromptError(f"unknown split {split!r}; use one of {', '.join(SPLITS)} (or none for all)")


# --------------------------------------------------------------------------------------------------
# Cross-set checks


def check_disjoint(a: PromptSet, b: PromptSet, what: str) -> None:
    """Raise if any prompt (normalised) is in both sets, e.g. extraction vs evaluation prompts."""
    in_b = {normalise(p) for p in b}
    shared = [p for p in a if normalise(p) in in_b]
    if shared:
        raise PromptError(
            f"{what}: {len(shared)} prompt(s) of {a.name!r} also in {b.name!r}, e.g. {_short(shared[0])!r}; "
            "remove the overlap or use disjoint splits"
        )


def check_contrast(harmful: PromptSet, harmless: PromptSet) -> None:
    """Raise if the harmful and harmless sets hold the same prompts: their difference would be zero."""
    if {normalise(p) for p in harmful} == {normalise(p) for p in harmless}:
        raise PromptError("harmful and harmless sets are identical; pass two different files")
