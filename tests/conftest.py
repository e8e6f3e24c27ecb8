"""Shared fixtures and helpers: the seed article, a deterministic fake embedder for plumbing tests, the real
model, the web chat started as staff start it; and the test tiers (slow, browser, llm) assigned by fixture."""
from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from rag.config import Config

ROOT = Path(__file__).resolve().parent.parent
SEED = ROOT / "corpus" / "000_3ab29ec542edc89a.txt"
SEED_ID = "000_3ab29ec542edc89a"
SHARED_QA = ROOT.parent / "shared" / "eval" / "seed_qa.jsonl"
QA_COPY = ROOT / "tests" / "data" / "seed_qa.jsonl"  # a copy, so the suite runs without ../shared


# ---------------------------------------------------------------- tiers
#
# `pytest -m "not slow"` is the fast tier (under 2 minutes on 2 cores); `pytest` runs everything (CI).
# Markers follow from what a test uses, so a new test lands in the right tier without remembering a decorator.

# (module, fixture) -> markers; module "*" means any module. Fixtures are looked up by name from the test's own
# module outwards, so the test's module and the name say which fixture it gets.
MARKS_BY_FIXTURE = {
    ("*", "real_embedder"): {"slow"},  # the real embedding model: converted once per session, then real inference
    ("*", "model_cache"): {"slow"},  # a subprocess or the CLI loads the real model from it (converting it first)
    ("*", "browser"): {"browser", "slow"},  # Chromium through Playwright
    ("*", "page"): {"browser", "slow"},
    ("test_generation", "local_qa"): {"llm", "slow"},  # the local 0.5B Qwen
    ("test_generation", "injected"): {"llm", "slow"},  # its indexes are asked through the local 0.5B Qwen
    ("test_generation", "server"): {"llm", "slow"},  # bench/openai_server.py runs the same GGUF
}
# Whole modules: a browser, or 20 chats against a server, or the seed bars with 320 distractor articles.
MARKS_BY_MODULE = {
    "test_browser": {"browser", "slow"},
    "test_load": {"slow"},
    "test_end_to_end": {"slow"},
}
# Single tests, where no fixture shows it.
MARKS_BY_TEST = {
    # starts the local LLM inside the server process
    ("test_browser", "test_generated_answers_stream_token_by_token_then_show_checked_sources"): {"llm"},
    # builds HNSW and IVF indexes over 20,000 vectors (10 s of the fast tier's budget)
    ("test_index", "test_approximate_index_recall_at_10_against_exact"): {"slow"},
    # four builds each, or a build process killed or raced (10 s each against Milvus)
    ("test_milvus", "test_a_version_still_being_published_by_a_live_build_is_not_pruned"): {"slow"},
    ("test_milvus", "test_a_build_killed_while_publishing_leaves_the_alias_on_the_old_version_and_is_dropped_later"): {"slow"},
    ("test_milvus", "test_each_build_publishes_a_version_behind_the_alias_rollback_moves_it_back_and_old_ones_are_pruned"): {"slow"},
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        marks = set(MARKS_BY_MODULE.get(module, ()))
        marks |= MARKS_BY_TEST.get((module, item.originalname), set())
        for name in item.fixturenames:  # the fixtures the test asks for and all those they ask for
            marks |= MARKS_BY_FIXTURE.get(("*", name), set()) | MARKS_BY_FIXTURE.get((module, name), set())
        for mark in sorted(marks - {m.name for m in item.iter_markers()}):
            item.add_marker(mark)


# ---------------------------------------------------------------- data and embedders


class FakeEmbedder:
    """Hashed character bigrams: similar texts get similar vectors; for fast plumbing tests only."""

    name, dim, fingerprint = "fake-bigrams", 64, "fake-bigrams-v1"

    def _vec(self, text: str) -> np.ndarray:
        v = np.zeros(self.dim, dtype=np.float32)
        for a, b in zip(text, text[1:]):
            v[int(hashlib.md5((a + b).encode()).hexdigest(), 16) % self.dim] += 1.0
        return v / (np.linalg.norm(v) or 1.0)

    def encode_queries(self, texts):
        return np.stack([self._vec(t) for t in texts])

    def encode_passages(self, texts, batch_size=16, progress=None):
        return np.stack([self._vec(t) for t in texts])


@pytest.fixture
def fake_embedder():
    return FakeEmbedder()


def corpus_in(root: Path, *files: Path) -> Path:
    """root/corpus holding the seed article and `files`; returns the corpus folder."""
    corpus = root / "corpus"
    corpus.mkdir()
    for f in (SEED, *files):
        shutil.copy(f, corpus / f.name)
    return corpus


@pytest.fixture
def seed_corpus(tmp_path) -> Path:
    return corpus_in(tmp_path)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """Converted models are cached per test session, outside the repository."""
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def real_embedder(model_cache):
    from rag.embedding import load_embedder

    return load_embedder(Config(cache_dir=model_cache))


# ---------------------------------------------------------------- the web chat, as staff start it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path, model_cache: Path, admin_password: str | None = None, timeout: float = 240, **env_extra):
    """`python app.py` with everything pointed into `root`; returns (process, url) once it serves."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAG_")}
    env.update(RAG_CORPUS=str(root / "corpus"), RAG_INDEX=str(root / "index"), RAG_CACHE_DIR=str(model_cache),
               RAG_HOST="127.0.0.1", RAG_PORT=str(port), RAG_FEEDBACK_DB=str(root / "feedback.sqlite3"),
               GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1", **env_extra)
    if admin_password:
        env["RAG_ADMIN_PASSWORD"] = admin_password
    log = (root / "server.log").open("w", encoding="utf-8")
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py")], cwd=root, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = (root / "server.log").read_text(encoding="utf-8")
        if "serving http" in text:
            return proc, f"http://127.0.0.1:{port}/"
        if proc.poll() is not None:
            break
        time.sleep(0.5)  # polling the log for the server's own "serving" line, not timing a race
    stop_server(proc)
    pytest.fail(f"the server did not start:\n{(root / 'server.log').read_text(encoding='utf-8')[-3000:]}")


# ---------------------------------------------------------------- a real Milvus (milvus-lite's server)


class MilvusServer:
    """`milvus-lite server` on a free loopback port with its data in `data_dir`; stop() and start() again keep
    the data (a restart, as after a crash)."""

    def __init__(self, data_dir: Path):
        self.data_dir, self.port, self.proc = data_dir, free_port(), None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> "MilvusServer":
        exe = Path(sys.executable).parent / "milvus-lite"
        log = (self.data_dir.parent / f"milvus-{self.port}.log").open("a", encoding="utf-8")
        self.proc = subprocess.Popen([str(exe), "server", "--data-dir", str(self.data_dir), "--host", "127.0.0.1",
                                      "--port", str(self.port)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"milvus-lite server exited: {(self.data_dir.parent / f'milvus-{self.port}.log').read_text()}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.1)  # polling for the listening port, not timing a race
        pytest.fail("milvus-lite server did not listen within a minute")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def milvus_server(tmp_path):
    """A real Milvus server of our own for one test, stopped at its end."""
    server = MilvusServer(tmp_path / "milvus-data").start()
    yield server
    server.stop()


def stop_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
