"""Results tables in the README and docs, rendered from committed report files (`results/*.json`, the
`results.json` that `csafety report` writes), so that every number in a results table comes from a file in the
repository and a test can tell when the two disagree.

A block in a Markdown page names its source::

    <!-- results: results/organisms.json summary -->
    ...the table, rendered...
    <!-- /results -->

``summary`` is the report's executive summary; any other name is the id of one model's table (as in the report,
e.g. ``frontier-frontier``), followed by the model: ``<!-- results: results/organisms.json frontier-frontier
smollm2-135m-hardened -->``. ``python -m crystallized_safety.report.docs_tables PAGE...`` rewrites the blocks;
``--check`` only says which are stale (exit 1)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from ..errors import CrystallizedSafetyError
from .tables import Table, summary_table

BLOCK = re.compile(
    r"(?P<head><!-- results: (?P<file>\S+) (?P<table>\S+)(?: (?P<model>\S+))? -->\n)"
    r"(?P<body>.*?)(?P<tail><!-- /results -->)",
    re.S,
)


def render(source: Path, table: str, model: str | None = None) -> str:
    """One table of a committed report file, as Markdown."""
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CrystallizedSafetyError(f"cannot read results file '{source}': {exc}") from None
    if table == "summary":
        return summary_table(data.get("summary") or []).markdown()
    for entry in data.get("models") or []:
        if entry.get("model") != model:
            continue
        for t in entry.get("tables") or []:
            if t.get("id") == table:
                return Table(t["id"], t["title"], t["headers"], t["rows"], t.get("note", ""), model or "").markdown()
    raise CrystallizedSafetyError(f"'{source}' has no table '{table}' for model '{model}': name one the report wrote")


def refresh(text: str, root: Path) -> str:
    """`text` with every results block re-rendered from its file (paths relative to `root`)."""

    def one(m: re.Match) -> str:
        body = render(root / m["file"], m["table"], m["model"])
        return m["head"] + body + m["tail"]

    return BLOCK.sub(one, text)


def blocks(text: str) -> list[tuple[str, str, str | None]]:
    """(file, table, model) of every results block in `text`."""
    return [(m["file"], m["table"], m["model"]) for m in BLOCK.finditer(text)]


def main(argv: list[str]) -> int:
    check = "--check" in argv
    pages = [Path(a) for a in argv if a != "--check"]
    root = Path.cwd()
    stale = []
    for page in pages:
        text = page.read_text(encoding="utf-8")
        new = refresh(text, root)
        if new != text:
            stale.append(str(page))
            if not check:
                page.write_text(new, encoding="utf-8")
    if stale:
        print(("stale: " if check else "updated: ") + ", ".join(stale))
    return 1 if (check and stale) else 0


if __name__ == "__main__":  # pragma: no cover
    try:
        sys.exit(main(sys.argv[1:]))
    except CrystallizedSafetyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
