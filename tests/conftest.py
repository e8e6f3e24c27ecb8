"""Shared fixtures: the seed article, a deterministic fake embedder for plumbing tests, the real model."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

from rag.config import Config

ROOT = Path(__file__).resolve().parent.parent
SEED = ROOT / "corpus" / "000_3ab29ec542edc89a.txt"
SEED_ID = "000_3ab29ec542edc89a"
SHARED_QA = ROOT.parent / "shared" / "eval" / "seed_qa.jsonl"
QA_COPY = ROOT / "tests" / "data" / "seed_qa.jsonl"  # a copy, so the suite runs without ../shared


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
