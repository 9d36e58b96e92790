"""The files beside the results store, handled without SQL: its WAL read as bytes (header checked, commit frames
counted), its run locks, and the checksum of a chunk's rows.

Why outside SQLite: SQLite treats a WAL whose header is damaged (magic, version, page size, salt or checksum) as
empty, silently dropping every transaction not yet copied into the main file, and resets it on the next write;
it reports nothing. Reading the documented layout (https://sqlite.org/fileformat2.html#walformat: a 32-byte
header, then frames of a 24-byte header and one page; big-endian fields) lets the store say what is wrong and
keep a copy before anything resets the file. No SQL here: frame checksums past the header are left to SQLite.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..errors import StoreError

SUM_COLUMNS = ("prompt_index", "prompt", "response", "n_tokens", "finished", "token_ids")
"""What a chunk's checksum covers: what generation wrote. Judge labels are left out (a re-judge rewrites them)."""
MAGICS = {0x377F0682: "<", 0x377F0683: ">"}  # the magic's last bit: byte order of the checksums' words
WAL_VERSION = 3007000
HEADER = 32
FRAME_HEADER = 24


def checksum(data: bytes, byte_order: str, s0: int = 0, s1: int = 0) -> tuple[int, int]:
    """SQLite's WAL checksum (Fletcher-like, over pairs of 32-bit words in the magic's byte order)."""
    words = struct.unpack(f"{byte_order}{len(data) // 4}I", data[: len(data) // 4 * 4])
    for i in range(0, len(words) - 1, 2):
        s0 = (s0 + words[i] + s1) & 0xFFFFFFFF
        s1 = (s1 + words[i + 1] + s0) & 0xFFFFFFFF
    return s0, s1


def header_problem(data: bytes) -> str | None:
    """What is wrong with a non-empty WAL's header, in a few words; None when SQLite will read it."""
    if not data:
        return None
    if len(data) < HEADER:
        return f"is {len(data)} bytes, shorter than its {HEADER}-byte header (truncated)"
    magic, version, page_size, _seq, _salt1, _salt2, sum1, sum2 = struct.unpack(">8I", data[:HEADER])
    if magic not in MAGICS:
        return f"has magic 0x{magic:08x}, not a SQLite WAL's (overwritten or random bytes)"
    if version != WAL_VERSION:
        return f"has format version {version}, not {WAL_VERSION}"
    if page_size < 512 or page_size > 65536 or page_size & (page_size - 1):
        return f"header gives page size {page_size}, not a power of two in 512..65536"
    if checksum(data[:24], MAGICS[magic]) != (sum1, sum2):
        return "header checksum does not match (its page size, salt or sequence number was changed)"
    return None


def rows_digest(rows: Iterable[Sequence[object]]) -> str:
    """SHA-256 of a chunk's rows (SUM_COLUMNS, in prompt order) as canonical JSON: SQLite keeps no checksum of
    its own, so a flipped bit inside a stored response would otherwise go unnoticed."""
    text = json.dumps([list(row) for row in rows], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def keep_damaged(wal: Path, data: bytes) -> None:
    """Keep a damaged WAL's bytes as `<wal>.damaged` before SQLite resets it (best effort: read-only media)."""
    try:
        Path(f"{wal}.damaged").write_bytes(data)
    except OSError:
        pass


def db_page_size(path: Path) -> int | None:
    """The main database file's page size (header offset 16; 1 means 65536), None when unreadable."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(100)
    except OSError:
        return None
    if len(head) < 18 or not head.startswith(b"SQLite format 3\x00"):
        return None
    size = int.from_bytes(head[16:18], "big")
    return 65536 if size == 1 else size


def commit_frames(data: bytes, page_size: int, salts: tuple[int, int] | None = None) -> list[int]:
    """The commit field of each frame of the WAL's current generation (non-zero: the last frame of a
    transaction). `salts`: the generation's, by default the header's; a frame with other salts ends it."""
    if salts is None:
        salts = struct.unpack(">2I", data[16:24])
    frames = []
    for offset in range(HEADER, len(data) - FRAME_HEADER - page_size + 1, page_size + FRAME_HEADER):
        _page, commit, s1, s2 = struct.unpack(">4I", data[offset : offset + 16])
        if (s1, s2) != salts:
            break
        frames.append(commit)
    return frames


def commits_behind_damaged_header(data: bytes, page_size: int | None) -> int | None:
    """Transactions in a WAL whose header is damaged, counted with the main file's page size and the first
    frame's salts (the header's cannot be trusted); None when that cannot be told."""
    if page_size is None or len(data) < HEADER + FRAME_HEADER + page_size:
        return None
    first = struct.unpack(">2I", data[HEADER + 8 : HEADER + 16])
    return sum(1 for commit in commit_frames(data, page_size, first) if commit)


class RunLock:
    """An exclusive, non-blocking lock on a file (fcntl): held for a run's duration, released by the OS when its
    process ends however it ends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(f"cannot create the run lock '{self.path}': {exc.strerror}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            raise StoreError(
                f"this run is already being computed by another process on this store ({self.path.name} is locked): "
                "wait for it to end, or follow it with `csafety status`"
            ) from None
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
