"""The blind copy of one run: a store file in which no real model name survives anywhere.

A blind re-analysis is only blind if the analysis cannot learn which model is which, so renaming the `model`
column is not enough: names also sit in the spec text, in artifact metadata (a direction file's `model_id` and
`model_hash`, a coherence calibration's `model_id`), in artifact kinds (`transfer:<source>`), in stored
conditions (`transfer:<source>`) and, after deletions, in the free pages of the file. So the copy is scrubbed
*generically*: every cell of every table the file holds (read from the file, not from this version's schema)
has every real name replaced by its anonymous one, case-insensitively, longest name first; safetensors blobs
get their JSON header rewritten (tensor bytes untouched); the file is then rebuilt (VACUUM) so no deleted byte
remains, and checked cell by cell and byte by byte: a name still found anywhere is a `BlindError`, never a
silently leaky copy (the copy is then deleted).

Which strings count as a model's names: the name the spec gives, its registry alias's source (hub id,
package, GGUF file), the last component of any path-like name (the directory or repository name) and its stem
for model files, and every identity value the run's own artifacts record for the model (`model_id`,
`model_hash`, `source`, transfer `source_model` / `target_model` and their hashes). A component shorter than
4 characters or contained in an anonymous name ("model" in "model-a") is not scrubbed on its own, since it
would rewrite unrelated text; a full name that short is refused. Rows the caller leaves out of the blind
analysis (transfer studies: their conditions name the source model) are deleted, not renamed.
Limitation: `token_ids` of a response are not rewritten; a response that spelled a model's name keeps its
tokens (the text itself is scrubbed).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CrystallizedSafetyError
from .store import Store

MIN_NAME = 4  # shorter strings are too common to replace inside arbitrary text
MODEL_KEYS = ("model_id", "model_hash", "source", "target_model", "target_hash")  # metadata naming the model
SOURCE_KEYS = ("source_model", "source_hash")  # metadata naming a transfer's source model
MODEL_FILES = (".gguf", ".safetensors", ".bin", ".pt")
CONFLICT = "anonymous"  # a component shared by two models' names maps to neither
SCAN_BLOCK = 1 << 24


class BlindError(CrystallizedSafetyError):
    """A blind copy that cannot be made without leaving a real model name in it."""


@dataclass(frozen=True)
class BlindPlan:
    """What the caller knows: the real -> anonymous names, the blind spec's text, and the rows to leave out.

    `models`: every model of the run -> its anonymous name; `sources`: transfer source models that are not
    models of the run -> an anonymous label; `drop_conditions`: condition keys whose generations and chunks
    are deleted; `drop_kinds`: (real model, artifact kind) pairs deleted; `aliases`: real name -> the further
    names it resolves to (a registry alias's hub id, packages, GGUF file), scrubbed like the name itself."""

    models: dict[str, str]
    sources: dict[str, str]
    spec_yaml: str
    aliases: dict[str, list[str]]
    drop_conditions: frozenset[str] = frozenset()
    drop_kinds: frozenset[tuple[str, str]] = frozenset()


def blind_copy(store: Store, run_id: str, path: str | Path, plan: BlindPlan) -> Store:
    """A scrubbed copy of run `run_id` at `path` (see the module docstring), open for the blind analysis."""
    copy = store.copy_run(run_id, path)
    try:
        drop_rows(copy, plan)
        names = real_names(copy, plan)
        scrub(copy, names, plan.spec_yaml)
        copy.compact()
        check_blind(copy, names)
    except BaseException:
        copy.close()
        for leftover in (copy.path, Path(f"{copy.path}-wal"), Path(f"{copy.path}-shm")):
            leftover.unlink(missing_ok=True)
        raise
    return copy


def drop_rows(copy: Store, plan: BlindPlan) -> None:
    """Delete the generations and chunks of left-out conditions and the left-out artifacts."""
    for table in ("generations", "chunks"):
        gone = [rowid for rowid, row in copy.rows(table) if row["condition_key"] in plan.drop_conditions]
        copy.rewrite(table, {}, gone)
    gone = [rowid for rowid, row in copy.rows("artifacts") if (row["model"], row["kind"]) in plan.drop_kinds]
    copy.rewrite("artifacts", {}, gone)


# -- which strings are names
def variants(name: str) -> list[str]:
    """`name`, its last path component and, for a model file, that component's stem."""
    tail = re.split(r"[/\\]", name.rstrip("/\\"))[-1]
    out = [name, tail]
    out += [tail[: -len(suffix)] for suffix in MODEL_FILES if tail.lower().endswith(suffix)]
    return list(dict.fromkeys(x for x in out if x))


def real_names(copy: Store, plan: BlindPlan) -> dict[str, str]:
    """Lower-cased real name -> its replacement, for every name of every model and transfer source."""
    full: dict[str, str] = {}
    for owners in (plan.models, plan.sources):
        for real, anon in owners.items():
            for name in [real, *plan.aliases.get(real, [])]:
                if len(name) < MIN_NAME:
                    raise BlindError(
                        f"a model is named '{name}', too short to scrub from text reliably: name it by an alias or "
                        f"path of at least {MIN_NAME} characters"
                    )
                full[name] = anon
    for _rowid, row in copy.rows("artifacts"):
        owner = plan.models.get(row["model"])
        if owner is None:
            raise BlindError("the run holds artifacts of a model its spec does not list: pass the run's own spec")
        for meta in (_json_dict(row["json"]), _safetensors_metadata(row["blob"])):
            for key, value in identities(meta):
                full.setdefault(value, plan.sources.get(value, CONFLICT) if key in SOURCE_KEYS else owner)
    return _expand(full, [*plan.models.values(), *plan.sources.values(), CONFLICT])


def identities(meta: dict) -> list[tuple[str, str]]:
    """(key, value) of the metadata entries that name a model: ids and paths, and hashes that look like hashes
    (a model without one records "unknown", which is no name)."""
    out = []
    for key in MODEL_KEYS + SOURCE_KEYS:
        value = meta.get(key)
        if not isinstance(value, str) or len(value) < MIN_NAME:
            continue
        if key.endswith("_hash") and not re.fullmatch(r"(\w+:)?[0-9a-fA-F]{16,}", value):
            continue
        out.append((key, value))
    return out


def _expand(full: dict[str, str], labels: list[str]) -> dict[str, str]:
    """Full names plus their components; a component is skipped when short or inside an anonymous label, and
    maps to CONFLICT when it is a component of two models' names."""
    whole = {name.lower(): anon for name, anon in full.items()}
    parts: dict[str, set[str]] = {}
    for name, anon in full.items():
        for part in variants(name)[1:]:
            key = part.lower()
            if key in whole or len(key) < MIN_NAME or any(key in label.lower() for label in labels):
                continue
            parts.setdefault(key, set()).add(anon)
    return {**{k: next(iter(v)) if len(v) == 1 else CONFLICT for k, v in parts.items()}, **whole}


# -- scrubbing
def substituter(names: dict[str, str]) -> Callable[[str], str]:
    """A function replacing every name (case-insensitive, longest first) by its replacement."""
    pattern = re.compile("|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)), re.IGNORECASE)
    return lambda text: pattern.sub(lambda m: names[m.group(0).lower()], text)


def scrub(copy: Store, names: dict[str, str], spec_yaml: str) -> None:
    """Replace every name in every text and blob cell of every table; the run's spec text becomes `spec_yaml`."""
    sub = substituter(names)
    for table in copy.tables():
        updates: dict[int, dict[str, Any]] = {}
        for rowid, row in copy.rows(table):
            for column, value in row.items():
                given = spec_yaml if (table, column) == ("runs", "spec_yaml") else value
                new = scrub_value(given, sub)
                if new != value:
                    updates.setdefault(rowid, {})[column] = new
        if updates:
            copy.rewrite(table, updates)


def scrub_value(value: Any, sub: Callable[[str], str]) -> Any:
    """A cell with every name replaced: text directly, blobs by `scrub_blob`, numbers as they are."""
    if isinstance(value, str):
        return sub(value)
    return scrub_blob(value, sub) if isinstance(value, bytes) else value


def scrub_blob(data: bytes, sub: Callable[[str], str]) -> bytes:
    """A safetensors file with its header rewritten, UTF-8 text (JSON) rewritten; other bytes as they are (the
    check then finds any name they hold)."""
    header = _safetensors_header(data)
    if header is not None:
        size = int.from_bytes(data[:8], "little")
        rewritten = {sub(k): v for k, v in header.items() if k != "__metadata__"}
        if "__metadata__" in header:
            rewritten["__metadata__"] = {sub(k): sub(v) for k, v in header["__metadata__"].items()}
        text = json.dumps(rewritten, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the format pads the header to 8 bytes with spaces
        return len(text).to_bytes(8, "little") + text + data[8 + size :]
    try:
        return sub(data.decode("utf-8")).encode("utf-8")
    except UnicodeDecodeError:
        return data


def _safetensors_header(data: Any) -> dict | None:
    """The JSON header of a safetensors file, None for anything else."""
    if not isinstance(data, bytes) or len(data) < 10:
        return None
    size = int.from_bytes(data[:8], "little")
    if not 2 <= size <= len(data) - 8 or data[8:9] != b"{":
        return None
    try:
        header = json.loads(data[8 : 8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    tensors = [v for k, v in header.items() if k != "__metadata__"] if isinstance(header, dict) else [None]
    if not all(isinstance(t, dict) and "data_offsets" in t for t in tensors):
        return None
    meta = header.get("__metadata__", {})
    return header if isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values()) else None


def _safetensors_metadata(data: Any) -> dict:
    header = _safetensors_header(data)
    return dict(header.get("__metadata__", {})) if header is not None else {}


def _json_dict(text: Any) -> dict:
    try:
        found = json.loads(text) if isinstance(text, str) else None
    except json.JSONDecodeError:
        return {}
    return found if isinstance(found, dict) else {}


# -- the proof
def check_blind(copy: Store, names: Iterable[str]) -> None:
    """Raise `BlindError` if any name (case-insensitive) is in any cell of any table, or anywhere in the file's
    bytes (free pages, the WAL)."""
    wanted = sorted({n.lower() for n in names}, key=len, reverse=True)
    for table in copy.tables():
        for rowid, row in copy.rows(table):
            for column, value in row.items():
                if isinstance(value, str):
                    hit = next((n for n in wanted if n in value.lower()), None)
                elif isinstance(value, bytes):
                    hit = next((n for n in wanted if n.encode() in value.lower()), None)
                else:
                    continue
                if hit is not None:
                    raise BlindError(
                        f"the blind copy still names a model ('{hit}' in {table}.{column}, row {rowid}): it cannot be "
                        "scrubbed there; report it with the store's schema"
                    )
    for path in (copy.path, Path(f"{copy.path}-wal")):
        hit = _scan_file(path, [n.encode() for n in wanted])
        if hit is not None:
            raise BlindError(f"the blind copy's file {path.name} still holds the bytes of '{hit}': report it")


def _scan_file(path: Path, wanted: list[bytes]) -> str | None:
    """The first name whose bytes (ASCII case-insensitive) appear in the file, read in blocks."""
    if not path.is_file() or not wanted:
        return None
    overlap = max(len(n) for n in wanted)
    tail = b""
    with path.open("rb") as fh:
        while block := fh.read(SCAN_BLOCK):
            text = (tail + block).lower()
            hit = next((n for n in wanted if n in text), None)
            if hit is not None:
                return hit.decode(errors="replace")
            tail = text[-overlap:]
    return None
