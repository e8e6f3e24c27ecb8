"""👍/👎 on answers, kept in a local SQLite file (stdlib sqlite3) and exported as JSON lines."""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import sqlite3
from pathlib import Path
from typing import Iterator

SCHEMA_VERSION = 1
RATINGS = ("up", "down", "none")  # "none": the user took back an earlier 👍/👎

_SCHEMA = """
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at TEXT NOT NULL,         -- ISO 8601 with the local offset
    rating TEXT NOT NULL CHECK (rating IN ('up', 'down', 'none')),
    question TEXT NOT NULL,           -- as the user typed it
    understood TEXT NOT NULL,         -- as it was answered (follow-ups rewritten)
    answer TEXT NOT NULL,
    found INTEGER NOT NULL,           -- 0 when the bot declined
    citations TEXT NOT NULL,          -- JSON list of {doc_id, title, speaker, start, end, text}
    index_version TEXT                -- manifest["version"] of the index that answered
)
"""


def default_path() -> Path:
    """Outside the repository and the index folder, so neither a clean checkout nor a rebuild loses it."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "rag-news" / "feedback.sqlite3"


class FeedbackStore:
    """One SQLite file; a connection per call, so web workers on any thread can write."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as conn:
            found = conn.execute("PRAGMA user_version").fetchone()[0]
            if found not in (0, SCHEMA_VERSION):
                raise ValueError(
                    f"{self.path} has feedback schema version {found}, this program writes {SCHEMA_VERSION}; "
                    "export it with an older version or point RAG_FEEDBACK_DB at a new file"
                )
            conn.execute(_SCHEMA)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # timeout: several workers may write at once; SQLite serialises them, we just wait our turn.
        conn = sqlite3.connect(self.path, timeout=10)
        try:
            with conn:  # commits, or rolls back on an exception
                yield conn
        finally:
            conn.close()

    def add(self, *, rating: str, question: str, understood: str, answer: str, found: bool,
            citations: list[dict], index_version: str | None) -> int:
        """Store one rating and return its id."""
        if rating not in RATINGS:
            raise ValueError(f"rating must be one of {RATINGS}, not {rating!r}")
        now = dt.datetime.now().astimezone().isoformat(timespec="seconds")
        with self._connect() as conn:
            cur = conn.execute(
                "INSERT INTO feedback (created_at, rating, question, understood, answer, found, citations,"
                " index_version) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (now, rating, question, understood, answer, int(found),
                 json.dumps(citations, ensure_ascii=False), index_version),
            )
            return int(cur.lastrowid)

    def rows(self) -> list[dict]:
        """Every rating, oldest first, citations decoded."""
        with self._connect() as conn:
            conn.row_factory = sqlite3.Row
            out = []
            for row in conn.execute("SELECT * FROM feedback ORDER BY id"):
                item = dict(row)
                item["found"] = bool(item["found"])
                item["citations"] = json.loads(item["citations"])
                out.append(item)
            return out

    def export_jsonl(self, dest: Path) -> int:
        """Write every rating to `dest` as one JSON object per line (readable Chinese); returns the count."""
        rows = self.rows()
        dest = Path(dest)
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        with tmp.open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, dest)  # a half-written export never replaces a good one
        return len(rows)
