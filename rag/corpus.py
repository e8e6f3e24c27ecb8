"""A corpus folder to Article records: walk it, read each file (rag.readers) and name every file or JSONL
line that was skipped, with why. Article, Span and CorpusError are re-exported: callers import them here."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .config import Config
from .decoding import CorpusError
from .readers import SUFFIXES, Article, Span, read_file

__all__ = ["Article", "CorpusError", "Skipped", "Span", "load_corpus"]


@dataclass(frozen=True)
class Skipped:
    path: str  # relative to the corpus dir, posix
    reason: str


def _corpus_files(root: Path, skipped: list[Skipped]) -> list[Path]:
    def unreadable(error: OSError) -> None:
        where = Path(os.path.relpath(error.filename, root)).as_posix() if error.filename else "."
        skipped.append(Skipped(where, f"cannot read folder ({error.strerror or error})"))

    files = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # .git, .ipynb_checkpoints, ...
        for name in filenames:
            if os.path.splitext(name)[1].lower() in SUFFIXES:  # hidden ones too: load_corpus names them as skipped
                files.append(Path(dirpath, name))
    return sorted(files, key=lambda p: p.relative_to(root).parts)


def _read(file: Path, rel: str, config: Config) -> tuple[list[Article], list[Skipped]]:
    """The articles of one corpus file, or why it (or some of its JSONL lines) was skipped."""
    if file.name.startswith("."):  # editor drafts, macOS "._" files: said, so a user can tell why one is missing
        return [], [Skipped(rel, "hidden file (its name starts with a dot); rename it to index it")]
    try:
        size = file.stat().st_size
        if size > config.max_file_bytes:
            return [], [Skipped(rel, f"too large: {size} bytes (max_file_bytes is {config.max_file_bytes})")]
        data = file.read_bytes()
    except OSError as e:
        return [], [Skipped(rel, f"cannot read ({e.strerror or e})")]
    try:
        found, problems = read_file(data, rel)
    except CorpusError as e:
        return [], [Skipped(rel, str(e))]
    return found, [Skipped(rel, problem) for problem in problems]


def load_corpus(corpus_dir: Path, config: Config) -> tuple[list[Article], list[Skipped]]:
    """Every article under corpus_dir (recursive, sorted by path) and what was skipped, with why.

    One bad file (or JSONL line) is skipped, never raised; a missing folder raises CorpusError.
    Articles with the same text are kept once, the first in path order."""
    root = Path(corpus_dir)
    if not root.exists():
        raise CorpusError(
            f"corpus folder {root} does not exist: create it and put .txt, .md, .jsonl, .html or .docx"
            " articles in it, or point corpus_dir at the folder that has them"
        )
    if not root.is_dir():
        raise CorpusError(f"corpus folder {root} is a file, not a folder: point corpus_dir at a folder")
    articles: list[Article] = []
    skipped: list[Skipped] = []
    by_hash: dict[str, str] = {}
    by_id: dict[str, str] = {}
    for file in _corpus_files(root, skipped):
        rel = file.relative_to(root).as_posix()
        found, bad = _read(file, rel, config)
        skipped += bad
        for article in found:
            # Name a JSONL record in the reason so that its line can be found.
            record = f" (record {article.doc_id})" if rel.lower().endswith(".jsonl") else ""
            if article.content_hash in by_hash:
                skipped.append(Skipped(rel, f"duplicate of {by_hash[article.content_hash]}{record}"))
            elif article.doc_id in by_id:
                skipped.append(Skipped(rel, f"doc_id {article.doc_id} is already used by {by_id[article.doc_id]}"))
            else:
                by_hash[article.content_hash] = article.doc_id
                by_id[article.doc_id] = article.path
                articles.append(article)
    return articles, skipped
