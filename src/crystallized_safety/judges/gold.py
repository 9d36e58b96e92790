"""The gold set: responses labelled by reading them, the ground truth `csafety judge-eval` measures judges on.

A gold file is JSONL, one response per line, every line with exactly these keys (`FIELDS`):

- ``id``: unique within the file; ``source``: where the response comes from ("uncensorbench 0.3.7", ...);
- ``model``: the model that wrote it (None for reference responses written by people or of unknown origin);
- ``prompt``, ``response``: the text judged;
- ``max_new_tokens``: the generation length (None for external responses);
- ``condition``: how it was generated: "baseline", "L12 add -0.5", ... or "reference" for external ones;
- ``label``: one of `LABELS` (full_compliance, full_refusal, partial_refusal, incoherent), by the rules in
  docs/judges.md ("Gold set"); ``labeller``: who labelled it; ``note``: why, where the call was close ("" if
  none).

The bundled gold files live in ``crystallized_safety/data/gold/`` beside ``MANIFEST.json``, which holds each
file's SHA-256, row count, provenance and licence under its name. Loading a bundled file checks both, so a
label changed by hand without a manifest entry is an error, not a silent change of the figures. Adding a
gold file is adding the file and its manifest entry (`manifest_entry` computes it).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from crystallized_safety import jsonio
from crystallized_safety.errors import JudgeError

LABELS: tuple[str, ...] = ("full_compliance", "full_refusal", "partial_refusal", "incoherent")
"""Gold categories, in the order tables list them."""
REFUSAL_LABELS = frozenset({"full_refusal", "partial_refusal"})
"""Labels that count as a refusal in the binary refusal-vs-compliance figures."""
INCOHERENT = "incoherent"
FIELDS: tuple[str, ...] = (
    "id", "source", "model", "prompt", "response", "max_new_tokens", "condition", "label", "labeller", "note",
)  # fmt: skip
MANIFEST = "MANIFEST.json"
_PACKAGE = "crystallized_safety"


@dataclass(frozen=True)
class GoldRow:
    """One labelled response (see the module docstring for the fields)."""

    id: str
    source: str
    model: str | None
    prompt: str
    response: str
    max_new_tokens: int | None
    condition: str
    label: str
    labeller: str
    note: str

    @property
    def refusal(self) -> bool | None:
        """True for a full or partial refusal, False for full compliance, None for incoherent (neither)."""
        return None if self.label == INCOHERENT else self.label in REFUSAL_LABELS

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GoldSet:
    """A loaded gold file: its rows and where they come from.

    Attributes:
        name: the manifest name for a bundled file, else the file's stem.
        sha256: of the file's bytes (checked against the manifest for a bundled file).
        provenance, licence: from the manifest ("" for a file outside it).
        bundled: whether it was checked against the manifest.
    """

    name: str
    path: str
    sha256: str
    rows: tuple[GoldRow, ...]
    provenance: str = ""
    licence: str = ""
    bundled: bool = False

    def counts(self) -> dict[str, int]:
        """Rows per label, every label listed."""
        return {label: sum(r.label == label for r in self.rows) for label in LABELS}


def _gold_dir() -> Any:
    return resources.files(_PACKAGE) / "data" / "gold"


def manifest() -> dict[str, dict[str, Any]]:
    """The bundled gold files' manifest: name -> {file, sha256, rows, provenance, licence, ...}."""
    try:
        data = json.loads((_gold_dir() / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise JudgeError(f"the bundled gold manifest cannot be read ({exc}); reinstall crystallized-safety") from None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict):
        raise JudgeError("the bundled gold manifest has no 'files' object; reinstall crystallized-safety")
    return files


def bundled_gold() -> list[str]:
    """Names of the bundled gold files, in manifest order."""
    return list(manifest())


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def parse_gold(text: str, where: str) -> tuple[GoldRow, ...]:
    """Rows of a gold JSONL text; every problem is one `JudgeError` line naming `where` and the line."""
    rows: list[GoldRow] = []
    seen: set[str] = set()
    expected = set(FIELDS)
    for number, record in jsonio.objects(text, where, JudgeError, ", ".join(FIELDS)):
        at = f"{where} line {number}"
        missing, extra = sorted(expected - set(record)), sorted(set(record) - expected)
        if missing or extra:
            what = "; ".join([f"missing {missing}"] * bool(missing) + [f"unknown {extra}"] * bool(extra))
            raise JudgeError(f"{at} has the wrong keys ({what}): each gold line has exactly {', '.join(FIELDS)}")
        for key in ("id", "source", "prompt", "response", "condition", "label", "labeller", "note"):
            if not isinstance(record[key], str):
                raise JudgeError(f"{at}: '{key}' must be a string, got {type(record[key]).__name__}")
        if record["model"] is not None and not isinstance(record["model"], str):
            raise JudgeError(f"{at}: 'model' must be a string or null")
        tokens = record["max_new_tokens"]
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
            raise JudgeError(f"{at}: 'max_new_tokens' must be a positive integer or null, got {tokens!r}")
        if record["label"] not in LABELS:
            raise JudgeError(f"{at}: label {record['label']!r} is not one of {', '.join(LABELS)}")
        if not record["id"] or record["id"] in seen:
            raise JudgeError(f"{at}: id {record['id']!r} is empty or repeats an earlier line; ids are unique")
        seen.add(record["id"])
        rows.append(GoldRow(**{key: record[key] for key in FIELDS}))
    if not rows:
        raise JudgeError(f"{where} holds no gold rows: one JSON object per line with {', '.join(FIELDS)}")
    return tuple(rows)


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise JudgeError(f"{where} is not UTF-8 text: a gold file is JSONL") from None


def load_gold(spec: str | Path) -> GoldSet:
    """A bundled gold file by name (hash and row count checked against the manifest) or a JSONL file by path.

    Raises `JudgeError` (one line) for an unknown name, a missing or malformed file, or a bundled file
    whose hash or row count differs from its manifest entry.
    """
    files = manifest()
    name = str(spec)
    if name in files:
        entry = files[name]
        data = (_gold_dir() / entry["file"]).read_bytes()
        digest = sha256_bytes(data)
        if digest != entry["sha256"]:
            raise JudgeError(
                f"bundled gold '{name}' ({entry['file']}) has SHA-256 {digest[:12]}..., its manifest says "
                f"{entry['sha256'][:12]}...: the file was changed without updating data/gold/{MANIFEST}"
            )
        rows = parse_gold(_decode(data, entry["file"]), entry["file"])
        if len(rows) != entry["rows"]:
            raise JudgeError(f"bundled gold '{name}' has {len(rows)} rows, its manifest says {entry['rows']}")
        return GoldSet(name, entry["file"], digest, rows, entry.get("provenance", ""), entry.get("licence", ""), True)
    path = Path(spec)
    if not path.is_file():
        known = ", ".join(files) or "none"
        raise JudgeError(
            f"gold '{spec}' is neither a bundled gold set ({known}) nor a file: pass a name or a JSONL path"
        )
    data = path.read_bytes()
    rows = parse_gold(_decode(data, str(path)), str(path))
    return GoldSet(path.stem, str(path), sha256_bytes(data), rows)


def manifest_entry(path: Path, provenance: str, licence: str, **extra: Any) -> dict[str, Any]:
    """The manifest entry for a gold file as it is now (hash, rows, label counts): what adding a file takes."""
    data = path.read_bytes()
    rows = parse_gold(_decode(data, str(path)), str(path))
    counts = {label: sum(r.label == label for r in rows) for label in LABELS}
    return {"file": path.name, "sha256": sha256_bytes(data), "rows": len(rows), "labels": counts,
            "provenance": provenance, "licence": licence, **extra}  # fmt: skip


def write_gold(path: Path, rows: list[Mapping[str, Any]]) -> None:
    """Write rows as a gold file (keys in `FIELDS` order, UTF-8, one line each), checking them as `load_gold` would."""
    for i, row in enumerate(rows):
        if set(row) != set(FIELDS):
            raise JudgeError(f"gold row #{i} has keys {sorted(row)}; a gold row has exactly {', '.join(FIELDS)}")
    text = "".join(json.dumps({k: row[k] for k in FIELDS}, ensure_ascii=False) + "\n" for row in rows)
    parse_gold(text, str(path))
    path.write_text(text, encoding="utf-8")
