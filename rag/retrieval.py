"""Question -> ranked Hits: dense and BM25 fused (convex min-max or weighted reciprocal rank), with filters; the
index searched is FAISS and our BM25 (rag/index.py) or Milvus (rag/milvus_index.py), through the same methods."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .chunking import Chunk, normalize
from .config import Config
from .index import Index
from .questions import by_pinyin, pinyin_names, simplified


@dataclass(frozen=True)
class Hit:
    chunk: Chunk
    score: float  # fused score, higher is better
    dense_score: float | None  # cosine similarity to the question
    bm25_score: float | None  # BM25 score (None: the chunk shares no token with the question)
    row: int = -1  # the chunk's row in the index (its spans and vectors)

    def to_json(self) -> dict:
        c = self.chunk
        return {"doc_id": c.doc_id, "chunk_id": c.chunk_id, "title": c.title, "date": c.date,
                "speaker": c.speaker, "role": c.role, "report_title": c.report_title, "kind": c.kind,
                "start": c.start, "end": c.end, "text": c.text, "score": round(self.score, 6),
                "dense_score": None if self.dense_score is None else round(self.dense_score, 6),
                "bm25_score": None if self.bm25_score is None else round(self.bm25_score, 6)}


@dataclass(frozen=True)
class Filters:
    speakers: tuple[str, ...] = ()  # keep only these speakers' segments (empty: all)
    date_from: str | None = None  # "YYYY-MM-DD", inclusive
    date_to: str | None = None

    def allows(self, chunk: Chunk) -> bool:
        if self.speakers and chunk.speaker not in self.speakers:
            return False
        day = (chunk.date or "")[:10]
        if self.date_from and (not day or day < self.date_from):
            return False
        if self.date_to and (not day or day > self.date_to):
            return False
        return True

    def __bool__(self) -> bool:
        return bool(self.speakers or self.date_from or self.date_to)


def rrf(rankings: list[list[int]], weights: list[float], k: int = 60) -> dict[int, float]:
    """Weighted reciprocal rank fusion (Cormack, Clarke & Buettcher 2009): sum of w / (k + rank).

    rrf([[7, 3], [3]], [1.0, 1.0], k=60) -> {7: 1/61, 3: 1/62 + 1/61}
    """
    fused: dict[int, float] = {}
    for ranking, w in zip(rankings, weights):
        for rank, item in enumerate(ranking, start=1):
            fused[item] = fused.get(item, 0.0) + w / (k + rank)
    return fused


def convex(dense: dict[int, float], lexical: dict[int, float], weights: list[float]) -> dict[int, float]:
    """Weighted mean of min-max normalised scores over the candidates (Bruch, Gai & Ingber 2023).

    Both dicts hold a score for every candidate: cosine and BM25.
    convex({1: 0.9, 2: 0.8}, {1: 0.0, 2: 4.0}, [0.8, 0.2]) -> {1: 0.8, 2: 0.2}
    """
    ids = list(dense)
    total = sum(weights) or 1.0
    out = np.zeros(len(ids))
    for scores, w in zip((dense, lexical), weights):
        x = np.array([scores[i] for i in ids], dtype=np.float64)
        span = x.max() - x.min() if len(x) else 0.0
        if span > 0:
            out += (w / total) * (x - x.min()) / span
    return dict(zip(ids, out.tolist()))


def named_speakers(question: str, speakers: list[str]) -> list[str]:
    """Speakers whose name the question contains: named_speakers("王任说了什么", ["王任", "李俊峰"]) -> ["王任"]."""
    q = normalize(question)
    return [s for s in speakers if s and normalize(s) in q]


class Retriever:
    def __init__(self, index: Index, embedder, config: Config):
        self.index, self.embedder, self.config = index, embedder, config
        self._speakers = sorted(index.speakers, key=len, reverse=True)
        self._last_query: tuple[str | None, np.ndarray | None] = (None, None)
        self._spelled: dict[str, tuple[str, ...]] | None = None  # pinyin -> the corpus's words (understood)

    def search(self, question: str, k: int | None = None, filters: Filters | None = None) -> list[Hit]:
        """The k best chunks for `question`, best first."""
        cfg, index = self.config, self.index
        k = k or cfg.retrieve_k
        depth = min(len(index.chunks), cfg.candidate_k)  # both searches look only among the chunks filters allow
        qvec = self.query_vector(question)
        tokens = index.tokenizer.tokenize(simplified(question), search=True)
        nearest, best = index.nearest(qvec, depth, filters), index.lexical(tokens, depth, filters)
        dense = dict(zip(nearest.ids.tolist(), nearest.scores.tolist()))
        lexical = dict(zip(best.ids.tolist(), best.scores.tolist()))
        weights = [cfg.dense_weight, cfg.bm25_weight]
        if cfg.fusion == "rrf":
            fused = rrf([list(dense), list(lexical)], weights, cfg.rrf_k)
        else:  # convex: both scores of every candidate, found by one retriever or both
            union = list(dict.fromkeys([*dense, *lexical]))
            self._add_cosines(dense, union, qvec)
            fused = convex(dense, dict(zip(union, index.lexical_scores(tokens, union).tolist())), weights)
        named = set(named_speakers(simplified(question), self._speakers))
        if named and fused:
            # A question that names a speaker is about that speaker's segments first.
            bonus = cfg.speaker_boost * max(fused.values())
            for i in fused:
                chunk = index.chunks[i]
                # Their own segments, and passages that name them (the overview gives their role).
                if chunk.speaker in named or any(name in chunk.text for name in named):
                    fused[i] += bonus
        order = sorted(fused, key=lambda i: -fused[i])[:k]
        # Every hit gets its cosine, found by BM25 alone or not: the answerer weighs meaning too.
        self._add_cosines(dense, order, qvec)
        bm25 = index.lexical_scores(tokens, order).tolist()
        return [Hit(index.chunks[i], fused[i], dense[i], b if b > 0 else None, i) for i, b in zip(order, bm25)]

    def understood(self, question: str) -> str:
        """The question as searched and answered: an English one gets the corpus's Chinese words for the names it
        spells in pinyin ("...the Shangrao meeting?" -> "...the Shangrao meeting? 上饶"). On training/qa.jsonl's 40
        English questions 21 answered right instead of 20; news_qa's 5: 2 instead of 1 (nothing fitted)."""
        if self._spelled is None:
            self._spelled = by_pinyin(self.index.vocab)  # once per index version, at its first English question
        names = pinyin_names(question, self._spelled)
        return f"{question} {' '.join(names)}" if names else question

    def query_vector(self, question: str) -> np.ndarray:
        """The question's embedding (1, dim), kept for the answerer's span cosines."""
        cached = self._last_query
        if cached[0] == question:
            return cached[1]
        qvec = self.embedder.encode_queries([question])
        self._last_query = (question, qvec)  # one assignment: a concurrent reader sees old or new
        return qvec

    def _add_cosines(self, dense: dict[int, float], ids: list[int], qvec: np.ndarray) -> None:
        missing = [i for i in ids if i not in dense]
        if missing:
            dense.update(zip(missing, (self.index.vectors(missing) @ qvec[0]).tolist()))
