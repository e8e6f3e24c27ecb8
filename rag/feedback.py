"""👍/👎 on answers, kept in a local SQLite file (stdlib sqlite3) and exported as JSON lines."""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import sqlite3
from pathlib import Path
from typing import Iterator

from .errors import RagError
from .files import write_atomic

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


def default_path(data_home: str | Path | None = None) -> Path:
    """Outside the repository and the index folder, so neither a clean checkout nor a rebuild loses it.

    `data_home`: $XDG_DATA_HOME, passed in by rag.settings (default ~/.local/share).
    default_path("/data") -> Path("/data/rag-news/feedback.sqlite3")
    """
    return Path(data_home or Path.home() / ".local" / "share") / "rag-news" / "feedback.sqlite3"


_COLUMNS = {"id", "created_at", "rating", "question", "understood", "answer", "found", "citations", "index_version"}


class FeedbackError(RagError, ValueError):
    """The feedback file cannot be used (not SQLite, another schema, not writable); the message says what to do."""


class FeedbackStore:
    """One SQLite file; a connection per call, so web workers on any thread can write."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise FeedbackError(f"cannot create the folder of the feedback database {self.path} "
                                f"({e.strerror or e}); point RAG_FEEDBACK_DB at a writable place") from None
        if self.path.is_dir():
            raise FeedbackError(f"feedback database {self.path} is a folder; point RAG_FEEDBACK_DB at a file")
        with self._connect() as conn:
            found = conn.execute("PRAGMA user_version").fetchone()[0]
            if found not in (0, SCHEMA_VERSION):
                raise FeedbackError(
                    f"{self.path} has feedback schema version {found}, this program writes {SCHEMA_VERSION}; "
                    "export it with an older version or point RAG_FEEDBACK_DB at a new file"
                )
            conn.execute(_SCHEMA)
            columns = {row[1] for row in conn.execute("PRAGMA table_info(feedback)")}
            if not _COLUMNS <= columns:
                raise FeedbackError(f"{self.path} has a `feedback` table this program did not write (no "
                                    f"{', '.join(sorted(_COLUMNS - columns))}); point RAG_FEEDBACK_DB at a new file")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A connection that commits on success; SQLite's own errors become one FeedbackError line."""
        try:
            # timeout: several workers may write at once; SQLite serialises them, we just wait our turn.
            conn = sqlite3.connect(self.path, timeout=10)
        except sqlite3.Error as e:
            raise FeedbackError(f"cannot open the feedback database {self.path} ({e}); "
                                "point RAG_FEEDBACK_DB at a writable file") from None
        try:
            with conn:  # commits, or rolls back on an exception
                yield conn
        except sqlite3.OperationalError as e:  # "attempt to write a readonly database", "database is locked", ...
            raise FeedbackError(f"cannot use the feedback database {self.path} ({e}); check that it is writable "
                                "and no other program holds it") from None
        except sqlite3.DatabaseError as e:  # "file is not a database", "database disk image is malformed", ...
            raise FeedbackError(f"{self.path} is not a usable feedback database ({e}); move it away or point "
                                "RAG_FEEDBACK_DB at a new file") from None
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
        dest = Path(dest)
        if dest.is_dir():
            raise FeedbackError(f"{dest} is a folder; give the export a file name, e.g. {dest / 'feedback.jsonl'}")
        if not dest.parent.is_dir():
            raise FeedbackError(f"cannot write {dest}: folder {dest.parent} does not exist")
        rows = self.rows()
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        try:
            write_atomic(dest, text)  # a half-written export never replaces a good one
        except OSError as e:
            raise FeedbackError(f"cannot write {dest} ({e.strerror or e})") from None
        return len(rows)


class DisabledFeedback:
    """Stands in for a FeedbackStore that could not be opened, so the chat serves on without ratings.

    `add` raises FeedbackError with `problem`; the web page turns it into a notice for the user.
    """

    def __init__(self, path: Path, problem: str):
        self.path, self.problem = Path(path), problem

    def add(self, **_rating) -> int:
        raise FeedbackError(f"feedback is off: {self.problem}")

    def rows(self) -> list[dict]:
        return []
