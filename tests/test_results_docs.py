"""Every results table in the README and docs is rendered from a committed report file (results/*.json): the
page's block equals what the file renders, so a number edited by hand, or a file re-measured without the page
being refreshed, fails here. Refresh with `python -m crystallized_safety.report.docs_tables README.md docs/*.md`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crystallized_safety.errors import CrystallizedSafetyError
from crystallized_safety.report import docs_tables

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def all_blocks() -> list[tuple[Path, str, str, str | None]]:
    return [(page, *b) for page in PAGES for b in docs_tables.blocks(page.read_text(encoding="utf-8"))]


def test_results_pages_have_blocks_from_committed_files():
    found = all_blocks()
    assert {f for _p, f, _t, _m in found} >= {"results/organisms.json"}
    for _page, file, _table, _model in found:
        assert (ROOT / file).is_file(), file
        assert file.startswith("results/"), file


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_results_block_equals_its_file(page):
    text = page.read_text(encoding="utf-8")
    assert docs_tables.refresh(text, ROOT) == text, (
        f"{page.name}: a results table differs from its file; run "
        "`python -m crystallized_safety.report.docs_tables README.md docs/*.md`"
    )


def test_a_number_edited_by_hand_is_caught(tmp_path, monkeypatch):
    source = tmp_path / "results" / "r.json"
    source.parent.mkdir()
    source.write_text(
        json.dumps(
            {
                "summary": [],
                "models": [
                    {
                        "model": "m",
                        "tables": [{"id": "t", "title": "T", "headers": ["a", "b"], "rows": [["L1", "48.6%"]]}],
                    }
                ],
            }
        )
    )
    page = "x\n<!-- results: results/r.json t m -->\nold\n<!-- /results -->\ny\n"
    fresh = docs_tables.refresh(page, tmp_path)
    assert "| L1 | 48.6% |" in fresh and fresh.startswith("x\n") and fresh.endswith("y\n")
    assert docs_tables.refresh(fresh, tmp_path) == fresh
    tampered = fresh.replace("48.6%", "58.6%")
    assert docs_tables.refresh(tampered, tmp_path) != tampered
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.md").write_text(tampered)
    assert docs_tables.main(["--check", "p.md"]) == 1
    assert (tmp_path / "p.md").read_text() == tampered  # --check writes nothing
    assert docs_tables.main(["p.md"]) == 0
    assert (tmp_path / "p.md").read_text() == fresh
    assert docs_tables.main(["--check", "p.md"]) == 0


def test_unknown_table_is_one_line_error(tmp_path):
    source = tmp_path / "r.json"
    source.write_text(json.dumps({"models": []}))
    with pytest.raises(CrystallizedSafetyError, match="has no table 'nope' for model 'm'"):
        docs_tables.render(source, "nope", "m")
    with pytest.raises(CrystallizedSafetyError, match="cannot read results file"):
        docs_tables.render(tmp_path / "missing.json", "summary")
