"""One index version in Milvus, as the retriever, the answerer and the chat use it: the same nearest / lexical /
lexical_scores / vectors / spans as rag/index.py's Index (FAISS). rag/milvus.py publishes versions and opens them
with this; every call to the server goes through MilvusStore.call (pymilvus is imported there only).

Chunks (without vectors) and span offsets are read once when a version opens; vectors, article texts and
searches go to Milvus per question.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import numpy as np

from .chunking import Chunk
from .lexical import ChineseTokenizer, Scored


def literal(value: str) -> str:
    """A string literal for a Milvus filter expression."""
    return json.dumps(value, ensure_ascii=False)


def filter_expr(filters) -> str:
    """The Milvus expression of retrieval Filters (same meaning as Filters.allows).

    filter_expr(Filters(("王任",), "2017-01-01")) -> 'speaker in ["王任"] and day != "" and day >= "2017-01-01"'
    """
    if not filters:
        return ""
    parts = []
    if filters.speakers:
        parts.append(f"speaker in [{', '.join(literal(s) for s in filters.speakers)}]")
    if filters.date_from or filters.date_to:
        parts.append('day != ""')
    if filters.date_from:
        parts.append(f"day >= {literal(filters.date_from)}")
    if filters.date_to:
        parts.append(f"day <= {literal(filters.date_to)}")
    return " and ".join(parts)


def doc_key(doc_id: str) -> str:
    return "doc:" + hashlib.sha256(doc_id.encode("utf-8")).hexdigest()[:24]


class _Documents(Mapping):
    """doc_id -> Article.to_json(), read from the meta collection when first asked for, then kept."""

    def __init__(self, store, meta: str, doc_ids: list[str]):
        self._store, self._meta, self._ids = store, meta, doc_ids
        self._known = set(doc_ids)
        self._cache: dict[str, dict] = {}

    def __getitem__(self, doc_id: str) -> dict:
        if doc_id not in self._known:
            raise KeyError(doc_id)
        doc = self._cache.get(doc_id)
        if doc is None:
            doc = self._cache[doc_id] = json.loads(self._store._get(self._meta, doc_key(doc_id)))
        return doc

    def __iter__(self):
        return iter(self._ids)

    def __len__(self) -> int:
        return len(self._ids)


class MilvusIndex:
    """One version in Milvus, with what rag/index.py's Index offers the retriever, the answerer and the chat."""

    def __init__(self, store, collection: str, manifest: dict):
        self.store, self.collection, self.manifest = store, collection, manifest
        self.path = collection  # what identifies the version: LiveQA compares it with what stores.choose returns
        meta = f"{collection}_meta"
        for name in (collection, f"{collection}_spans", meta):
            store._loaded(name)
        self.vocab: dict[str, int] = json.loads(store._get(meta, "vocab"))
        self.tokenizer = ChineseTokenizer(json.loads(store._get(meta, "lexicon")))
        self.documents = _Documents(store, meta, [d["doc_id"] for d in manifest["documents"]])
        counts = manifest["counts"]
        self.chunks = [Chunk(**r["chunk"]) for r in self._all(collection, "row", counts["chunks"], ["row", "chunk"])]
        spans = self._all(f"{collection}_spans", "span", counts["spans"], ["span", "chunk_row", "start", "end"])
        self.spans = np.array([(r["chunk_row"], r["start"], r["end"]) for r in spans], dtype=np.int64).reshape(-1, 3)
        self._span_rows = np.searchsorted(self.spans[:, 0], np.arange(len(self.chunks) + 1))
        self.speakers: dict[str, str | None] = {}
        for c in self.chunks:
            if c.speaker and not self.speakers.get(c.speaker):
                self.speakers[c.speaker] = c.role
        self._rows: dict[int, dict] = {}  # chunk row -> {"dense", "sparse"}, for the question being answered

    @property
    def version(self) -> str:
        return self.manifest["version"]

    def _all(self, collection: str, key: str, count: int, fields: list[str]) -> list[dict]:
        """Every row of `collection` (primary keys 0..count-1), in pages under Milvus's query window."""
        out: list[dict] = []
        for lo in range(0, count, 10_000):
            out += self.store.call("query", collection, filter=f"{key} >= {lo} and {key} < {lo + 10_000}",
                                   output_fields=fields, limit=10_000)
        return sorted(out, key=lambda r: r[key])

    def spans_of(self, row: int) -> range:
        return range(int(self._span_rows[row]), int(self._span_rows[row + 1]))

    def span_vectors(self, ids: list[int]) -> np.ndarray:
        if not ids:
            return np.zeros((0, self.manifest["model"]["dim"]), dtype=np.float32)
        rows = self.store.call("query", f"{self.collection}_spans", filter=f"span in {list(map(int, ids))}",
                               output_fields=["span", "dense"])
        by_id = {r["span"]: r["dense"] for r in rows}
        return np.array([by_id[int(i)] for i in ids], dtype=np.float32)

    def _fetch(self, ids: list[int]) -> dict[int, dict]:
        """Chunk rows `ids` with their dense and sparse vectors; kept for the rest of the question (the fusion and
        the hits ask for the same candidates), a bounded cache shared by the chat's threads."""
        cache, got = self._rows, {}
        missing = sorted(i for i in {int(i) for i in ids} if i not in cache)  # no iteration over a shared dict
        if missing:
            got = {r["row"]: r for r in self.store.call("query", self.collection, filter=f"row in {missing}",
                                                        output_fields=["row", "dense", "sparse"])}
            if len(cache) > 5_000:
                self._rows = {}  # one assignment: other threads keep the dict they hold
            self._rows.update(got)
        return {int(i): got.get(int(i)) or cache[int(i)] for i in ids}

    def vectors(self, ids: list[int]) -> np.ndarray:
        rows = self._fetch(ids)
        return np.array([rows[int(i)]["dense"] for i in ids], dtype=np.float32)

    def nearest(self, query_vector: np.ndarray, k: int, filters=None) -> Scored:
        """The k nearest chunks allowed by `filters` to one query vector (1, dim), best first."""
        found = self.store.call("search", self.collection, data=[np.asarray(query_vector[0], dtype=np.float32).tolist()],
                                anns_field="dense", limit=k, filter=filter_expr(filters), output_fields=["row"],
                                search_params=self._dense_params(k))[0]
        return Scored(np.array([h["entity"]["row"] for h in found], dtype=np.int64),
                      np.array([h["distance"] for h in found], dtype=np.float32))

    def _dense_params(self, k: int) -> dict:
        if self.manifest.get("milvus", {}).get("dense_index") == "HNSW":
            return {"metric_type": "IP", "params": {"ef": max(k, int(self.manifest["config"].get("hnsw_ef_search", 256)))}}
        return {"metric_type": "IP"}

    def _query_terms(self, tokens: list[str]) -> dict[int, float]:
        counts: dict[int, float] = {}
        for tok in tokens:
            j = self.vocab.get(tok)
            if j is not None:
                counts[j] = counts.get(j, 0.0) + 1.0
        return counts

    def lexical(self, tokens: list[str], k: int, filters=None) -> Scored:
        """The k best chunks by BM25 allowed by `filters` (score > 0), best first."""
        terms = self._query_terms(tokens)
        if not terms:
            return Scored(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32))
        found = self.store.call("search", self.collection, data=[terms], anns_field="sparse", limit=k,
                                filter=filter_expr(filters), output_fields=["row"],
                                search_params={"metric_type": "IP"})[0]
        found = [h for h in found if h["distance"] > 0]
        return Scored(np.array([h["entity"]["row"] for h in found], dtype=np.int64),
                      np.array([h["distance"] for h in found], dtype=np.float32))

    def lexical_scores(self, tokens: list[str], ids: list[int]) -> np.ndarray:
        """BM25 scores of chunks `ids` for the question's tokens (0 where they share none)."""
        terms, rows = self._query_terms(tokens), self._fetch(ids)
        out = np.zeros(len(ids), dtype=np.float32)
        for n, i in enumerate(ids):
            sparse = rows[int(i)]["sparse"]
            out[n] = sum(w * sparse.get(j, 0.0) for j, w in terms.items())
        return out
