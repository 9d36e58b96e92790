"""The store's tables (`SCHEMA`, version `SCHEMA_VERSION`) and the typed rows read from or written to them:
`GenerationRow` (one row of `generations`) and `RunInfo` (one run, as `Store.runs` lists it)."""

from __future__ import annotations

from dataclasses import dataclass, fields

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, name TEXT NOT NULL, spec_yaml TEXT NOT NULL, spec_hash TEXT NOT NULL,
    created REAL NOT NULL, finished REAL, status TEXT NOT NULL, environment TEXT NOT NULL, error TEXT
);
CREATE TABLE IF NOT EXISTS artifacts (
    run_id TEXT NOT NULL, model TEXT NOT NULL, kind TEXT NOT NULL, json TEXT, blob BLOB,
    PRIMARY KEY (run_id, model, kind)
);
CREATE TABLE IF NOT EXISTS chunks (
    run_id TEXT NOT NULL, chunk_key TEXT NOT NULL, model TEXT NOT NULL, study TEXT NOT NULL,
    condition_key TEXT NOT NULL, rows INTEGER NOT NULL, seconds REAL NOT NULL, created REAL NOT NULL,
    worker TEXT, PRIMARY KEY (run_id, chunk_key)
);
CREATE TABLE IF NOT EXISTS generations (
    run_id TEXT NOT NULL, model TEXT NOT NULL, study TEXT NOT NULL, condition_key TEXT NOT NULL,
    condition TEXT NOT NULL, prompt_set TEXT NOT NULL, prompt_index INTEGER NOT NULL, prompt TEXT NOT NULL,
    response TEXT NOT NULL, n_tokens INTEGER NOT NULL, finished INTEGER NOT NULL,
    refusal INTEGER, judge TEXT NOT NULL, judge_reason TEXT, score REAL,
    coherent INTEGER, perplexity REAL, distinct_n REAL, token_ids TEXT NOT NULL, relevance REAL,
    PRIMARY KEY (run_id, model, condition_key, prompt_set, prompt_index)
);
CREATE TABLE IF NOT EXISTS row_sums (
    run_id TEXT NOT NULL, chunk_key TEXT NOT NULL, model TEXT NOT NULL, condition_key TEXT NOT NULL,
    prompt_set TEXT NOT NULL, first INTEGER NOT NULL, last INTEGER NOT NULL, digest TEXT NOT NULL,
    PRIMARY KEY (run_id, chunk_key)
);
CREATE TABLE IF NOT EXISTS analyses (
    run_id TEXT NOT NULL, model TEXT NOT NULL, study TEXT NOT NULL, kind TEXT NOT NULL, result TEXT NOT NULL,
    seconds REAL, PRIMARY KEY (run_id, model, study)
);
CREATE TABLE IF NOT EXISTS verdicts (
    run_id TEXT NOT NULL, model TEXT NOT NULL, verdict TEXT NOT NULL, rule TEXT NOT NULL, evidence TEXT NOT NULL,
    PRIMARY KEY (run_id, model)
);
"""


@dataclass(frozen=True)
class GenerationRow:
    """One stored generation: exactly the columns of the `generations` table (after `run_id`)."""

    model: str
    study: str
    condition_key: str
    condition: str  # the condition as JSON
    prompt_set: str
    prompt_index: int
    prompt: str
    response: str
    n_tokens: int
    finished: int
    refusal: int | None
    judge: str
    judge_reason: str | None
    score: float | None
    coherent: int | None
    perplexity: float | None
    distinct_n: float | None
    token_ids: str  # JSON list
    relevance: float | None = None  # coherence gate v2: prompt-answer PMI, nats/token (None: not measured)


GEN_COLUMNS = tuple(f.name for f in fields(GenerationRow))


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    name: str
    spec_hash: str
    created: float
    finished: float | None
    status: str
    error: str | None = None
