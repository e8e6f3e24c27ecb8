"""What the web chat needs besides its page: a fresh index at start-up, its status, rebuilds in the background."""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Callable

from .building import BuildReport, changes_since
from .chunking import CHUNKER_VERSION
from .config import Config
from .corpus import CorpusError, load_corpus
from .index import FORMAT_VERSION, IndexFault, check_version
from .stores import build, choose, milvus_store
from .versions import current_path


def stale_reasons(config: Config, embedder) -> list[str]:
    """Why the index at config.index_dir does not match the corpus, model and chunker; [] when current.

    Reads the corpus (decoding and hashing every file, no embedding), as a build would.
    """
    link = Path(config.index_dir) / "current"
    path = current_path(Path(config.index_dir))
    if path is None and link.is_symlink():
        return [f"the current index version {Path(os.readlink(link)).name} is missing"]
    if path is None or not (path / "manifest.json").exists():
        return [f"no index at {config.index_dir}"]
    problem = check_version(path)
    if problem is not None and not problem.startswith("outdated"):
        return [f"the current index version {path.name} is {problem}"]
    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return [f"the manifest at {path} cannot be read ({e})"]
    return _differences(manifest, config, embedder)


def milvus_stale_reasons(config: Config, embedder) -> list[str]:
    """Why the version Milvus serves does not match this machine's corpus, model and chunker; [] when it does, and
    when this machine has no articles (a chat-only server serves whatever the ingest job published)."""
    store = milvus_store(config)
    target = store.current()
    if target is None:
        return [f"no index named {store.name} in Milvus at {store.uri}"]
    corpus = Path(config.corpus_dir)
    if not corpus.is_dir() or not any(corpus.iterdir()):
        return []
    manifest = store.manifest(target)
    if manifest is None:
        return [f"the current index version {target} in Milvus is incomplete"]
    return _differences(manifest, config, embedder)


def _differences(manifest: dict, config: Config, embedder) -> list[str]:
    """What differs between a version's manifest and what a build now would write."""
    reasons = []
    if manifest.get("format_version") != FORMAT_VERSION:
        reasons.append(f"index format {manifest.get('format_version')} (this program writes {FORMAT_VERSION})")
    model = manifest.get("model", {})
    if model.get("name") != embedder.name or model.get("fingerprint") != embedder.fingerprint:
        reasons.append(f"built with the model {model.get('name')!r}, serving {embedder.name!r}")
    if manifest.get("chunker_version") != CHUNKER_VERSION:
        reasons.append(f"chunker {manifest.get('chunker_version')} (now {CHUNKER_VERSION})")
    built = manifest.get("config", {})
    for key in ("chunk_size", "chunk_overlap"):
        if built.get(key) != getattr(config, key):
            reasons.append(f"{key} {built.get(key)} (now {getattr(config, key)})")
    try:
        articles, _ = load_corpus(Path(config.corpus_dir), config)
    except CorpusError as e:
        return reasons + [str(e)]
    changes = changes_since(manifest.get("documents") or [], articles)
    added, changed, removed = (len(changes[k]) for k in ("added", "changed", "removed"))
    if added or removed or changed:
        reasons.append(f"corpus changed: {added} added, {changed} changed, {removed} removed")
    return reasons


def ensure_index(config: Config, embedder, say: Callable[[str], None] = lambda msg: None) -> BuildReport | None:
    """Build the index when it is missing, stale or damaged; None when it was already current, or when it cannot
    be rebuilt (a read-only folder, another build running, a corpus that fails) but a version can serve: then
    `say` gets one line saying so. Raises IndexFault or CorpusError only when there is nothing to serve."""
    reasons = (milvus_stale_reasons if config.backend == "milvus" else stale_reasons)(config, embedder)
    if not reasons:
        return None
    say(f"building the index: {'; '.join(reasons)}")
    try:
        return build(config, PacedEmbedder(embedder), progress=say)
    except (IndexFault, CorpusError) as e:
        try:
            path, _ = choose(config)
        except IndexFault:
            raise e from None
        say(f"the index was not rebuilt ({e}); serving version {getattr(path, 'name', path)} as it is")
        return None


def index_status(index) -> dict:
    """What an operator needs to know about the served index."""
    m = index.manifest
    return {
        "version": m["version"], "documents": m["counts"]["documents"], "chunks": m["counts"]["chunks"],
        "model": m["model"]["name"], "built_at": m.get("built_at"), "path": str(index.path),
    }


def describe(status: dict) -> str:
    """describe(index_status(index)) -> "index 2023…: 1 documents, 25 chunks, model …, built at …" """
    return (f"index {status['version']}: {status['documents']} documents, {status['chunks']} chunks, "
            f"model {status['model']}, built at {status['built_at']} ({status['path']})")


class PacedEmbedder:
    """The shared embedder, encoding passages a few at a time so that chats' queries get in between.

    Embedder.encode_passages holds the model's lock for a whole call; during a rebuild that would
    stall every chat until all new passages are embedded.
    """

    def __init__(self, embedder, batch: int = 16):
        self._embedder, self._batch = embedder, batch
        self.name, self.dim, self.fingerprint = embedder.name, embedder.dim, embedder.fingerprint

    def encode_queries(self, texts):
        return self._embedder.encode_queries(texts)

    def encode_passages(self, texts, batch_size: int = 16, progress: Callable[[str], None] | None = None):
        import numpy as np

        texts = list(texts)
        parts = []
        for lo in range(0, len(texts), self._batch):
            parts.append(self._embedder.encode_passages(texts[lo : lo + self._batch], batch_size=batch_size))
            if progress:
                progress(f"embedded {min(lo + self._batch, len(texts))}/{len(texts)} passages")
            time.sleep(0.01)  # threading.Lock is not fair: give a waiting query the lock
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)


class Rebuilder:
    """At most one background rebuild at a time; its progress lines are kept for the page to show.

    The build writes a new version and switches the `current` link only when it is complete, so
    chats keep answering from the old version until then.
    """

    def __init__(self, config: Config, embedder, on_done: Callable[[], object] | None = None):
        self.config, self._embedder, self._on_done = config, PacedEmbedder(embedder), on_done
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._lines: list[str] = []
        self.report: BuildReport | None = None
        self.error: str | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def lines(self) -> list[str]:
        with self._lock:
            return list(self._lines)

    def _say(self, line: str) -> None:
        with self._lock:
            self._lines.append(line)

    def start(self) -> bool:
        """Start a rebuild; False when one is already running."""
        with self._lock:
            if self.running:
                return False
            self._lines, self.report, self.error = ["rebuild started"], None, None
            self._thread = threading.Thread(target=self._run, name="rag-rebuild", daemon=True)
            self._thread.start()
            return True

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the running rebuild; True when none is running afterwards."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return not self.running

    def _run(self) -> None:
        try:
            self.report = build(self.config, self._embedder, progress=self._say)
            if self._on_done:
                self._on_done()  # e.g. load the new version now, not on the next question
        except (IndexFault, CorpusError, OSError, ValueError, RuntimeError) as e:
            # A failed build leaves the served version as it was; the operator sees why.
            self.error = str(e)
            self._say(f"rebuild failed: {e}")
