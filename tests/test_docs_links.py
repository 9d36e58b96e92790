"""README and docs/ hold together: every markdown link to a local file resolves (and its #anchor names a heading
of the target), every docs/*.md page is linked from the README, the README stays a guide (<= 250 lines), the
marker lines other work writes between exist once each, and the README's two Python examples run (on a tiny
random model standing in for SmolLM2)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"(?<!!)\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _prose(text: str) -> str:
    """The text without fenced code blocks and inline code spans (where brackets are not links)."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def _links(page: Path) -> list[str]:
    return LINK.findall(_prose(page.read_text(encoding="utf-8")))


def _local(target: str) -> bool:
    return not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I)  # http:, https:, mailto: ...


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", page.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = _slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_pages_found():
    assert README.exists() and len(DOCS) >= 10, [p.name for p in DOCS]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_local_links_resolve(page):
    broken = []
    for target in _links(page):
        if not _local(target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading '#{anchor}' in {dest.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_every_docs_page_is_linked_from_readme():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in _links(README) if _local(t)}
    missing = [p.name for p in DOCS if p.resolve() not in linked]
    assert not missing, f"docs pages the README does not link: {missing}"


def test_readme_is_a_guide():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= 250, f"README has {n} lines; move detail into docs/"


@pytest.mark.parametrize(
    "page, name",
    [(README, "headline-results"), (ROOT / "docs" / "results.md", "organisms-results")],
    ids=["readme-headline", "results-organisms"],
)
def test_marker_pairs_once(page, name):
    text = page.read_text(encoding="utf-8")
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    assert text.count(start) == 1 and text.count(end) == 1, (page.name, name)
    assert text.index(start) < text.index(end)


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, re.M | re.S)


def test_readme_python_examples_run(tiny_model_dirs, tmp_path, monkeypatch):
    """Both examples, as written, with the model name and the layers swapped for a 4-layer tiny model."""
    _, paths = tiny_model_dirs
    blocks = _python_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) == 2, "the README should show the 10-line example and the seed API example"
    assert len(blocks[0].strip().splitlines()) <= 10
    swaps = [
        ('"smollm2-135m"', repr(paths["tiny"])),
        ("layer=14", "layer=2"),
        ("direction(14)", "direction(2)"),
        ("layer=15", "layer=2"),
        ("max_new_tokens=40", "max_new_tokens=4"),
    ]
    monkeypatch.chdir(tmp_path)  # the first example saves a direction file in the working directory
    for i, code in enumerate(blocks):
        for old, new in swaps:
            code = code.replace(old, new)
        assert "smollm2-135m" not in code and "=14" not in code and "=15" not in code, code
        exec(compile(code, f"README python block {i}", "exec"), {"print": lambda *a, **k: None})
    assert (tmp_path / "smollm2.safetensors").exists()
