"""What is wrong with a store's WAL, found before SQLite opens the store: a damaged header (read as bytes by
`files`) or committed transactions past a damaged frame (counted against the valid frames SQLite accepts)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from . import files


def wal_damage(path: Path) -> str | None:
    """What is wrong with the store's WAL, in one line, or None. Checked before SQLite opens the store: a damaged
    header makes SQLite ignore the whole WAL (and reset it on the next write), a damaged frame every commit after
    it; either way the WAL is first kept as `<store>-wal.damaged`, so nothing is thrown away."""
    wal = Path(f"{path}-wal")
    try:
        data = wal.read_bytes() if wal.is_file() else b""
    except OSError:
        return None
    problem = files.header_problem(data)
    if problem is None:
        lost = wal_commits_beyond_valid(path, data)
        if not lost:
            return None
        problem, missing = "held committed transactions past a damaged frame, which SQLite ignores", str(lost)
    else:
        files.keep_damaged(wal, data)
        count = files.commits_behind_damaged_header(data, files.db_page_size(path))
        missing = "its" if count is None else f"up to {count}"
    return (
        f"{wal.name} {problem}: {missing} committed transaction(s) not yet in {path.name} are missing and a resumed "
        f"run recomputes them (the WAL is kept as {wal.name}.damaged)"
    )


def wal_commits_beyond_valid(path: Path, data: bytes | None = None) -> int:
    """Commit frames of the current WAL generation that follow its first damaged frame: transactions SQLite
    will silently drop on recovery (0 for a WAL whose header is damaged: `wal_damage` handles that first).
    Frame checksums are left to SQLite, whose valid frame count comes from opening the file."""
    if data is None:
        try:
            data = Path(f"{path}-wal").read_bytes()
        except OSError:
            return 0
    if len(data) < files.HEADER or files.header_problem(data) is not None:
        return 0
    frames = files.commit_frames(data, int.from_bytes(data[8:12], "big"))
    valid = _valid_wal_frames(path)  # SQLite recovers the valid prefix (and removes the WAL when it closes)
    lost = 0 if valid is None else sum(1 for commit in frames[valid:] if commit)
    if lost:  # keep the damaged WAL beside the store: nothing is thrown away
        files.keep_damaged(Path(f"{path}-wal"), data)
    return lost


def _valid_wal_frames(path: Path) -> int | None:
    """How many WAL frames SQLite accepts (it verifies the checksums), read through a passive checkpoint on a
    private connection; None when that cannot be asked (read-only media, a busy writer)."""
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=rw", uri=True, timeout=1, isolation_level=None)
    except sqlite3.Error:
        return None
    try:
        busy, log, _done = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return None if busy or log < 0 else int(log)
    except sqlite3.Error:
        return None
    finally:
        db.close()
