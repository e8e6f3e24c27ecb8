"""Hits -> Answer with citations: the extractive answerer (no LLM) and the question checks."""
from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Literal

import numpy as np

from .config import Config
from .questions import QuestionError, asked_kinds, check_question, simplified
from .retrieval import Filters, Hit, Retriever
from .spans import Candidate, Featurizer, SpanModel

if TYPE_CHECKING:  # rag.support imports this module, so its record is named only for the type checker
    from .support import CheckedSentence

DECLINE = "文章中没有提到{topic}。"


@dataclass(frozen=True)
class Citation:
    doc_id: str
    title: str
    speaker: str | None
    start: int  # offsets into the document text: doc.text[start:end] == text
    end: int
    text: str


@dataclass(frozen=True)
class Answer:
    question: str
    answer: str
    found: bool
    citations: tuple[Citation, ...] = ()
    passages: tuple[Hit, ...] = ()
    support: float = 0.0  # the model's probability that the best span answers the question, the decline criterion
    timings_ms: dict = field(default_factory=dict)
    error: str | None = None  # set when the question itself was refused (empty, too long, ...)

    def to_json(self) -> dict:
        return {
            "question": self.question, "answer": self.answer, "found": self.found,
            "citations": [asdict(c) for c in self.citations],
            "passages": [h.to_json() for h in self.passages],
            "support": round(self.support, 4), "timings_ms": self.timings_ms, "error": self.error,
        }


@dataclass(frozen=True)
class StreamEvent:
    """One step of an answer stream; consumers switch on `kind`. The "answer" event always comes last.

    "text": the next piece of the answer as the model writes it (`text`);
    "sentence": a sentence of it checked against the passages (`sentence`, with its citations);
    "retry": nothing written had support and the model writes again: clear what was shown (`text`: why);
    "answer": the final Answer (`answer`).
    """

    kind: Literal["text", "sentence", "retry", "answer"]
    text: str = ""
    sentence: CheckedSentence | None = None
    answer: Answer | None = None


def candidates(index, hits: list[Hit]) -> list[Candidate]:
    """The candidate spans of `hits` (sentences, long ones cut), each span text once, best hit first; a span
    without a letter, digit or character (a stray "?" after a sentence end) says nothing and is left out."""
    out, seen = [], set()
    for rank, hit in enumerate(hits):
        doc_text = index.documents[hit.chunk.doc_id]["text"]
        for r in index.spans_of(hit.row):
            _, start, end = (int(v) for v in index.spans[r])
            key = (hit.chunk.doc_id, start, end)
            if key not in seen and any(ch.isalnum() for ch in doc_text[start:end]):
                seen.add(key)
                out.append(Candidate(rank, hit.chunk, start, end, doc_text[start:end], r))
    return out


class ExtractiveAnswerer:
    """Answers with the candidate span the fitted model (rag/spans.py) finds most likely to answer, or
    declines when even that one is below the model's threshold."""

    def __init__(self, retriever: Retriever, config: Config, model: SpanModel | None = None):
        self.retriever, self.config = retriever, config
        self.tokenizer = retriever.index.tokenizer
        self.model = model or SpanModel.load()
        self.featurizer = Featurizer(self.tokenizer)

    def features(self, question: str, hits: list[Hit]) -> tuple[list[Candidate], np.ndarray]:
        """The candidate spans of `hits` and their feature rows (rag/spans.py FEATURES)."""
        index = self.retriever.index
        cands = candidates(index, hits)
        if not cands:
            return [], np.zeros((0, len(self.featurizer.features)))
        cos = index.span_vectors([c.span_row for c in cands]) @ self.retriever.query_vector(question)[0]
        return cands, self.featurizer.rows(question, hits, cands, cos)

    def answer(self, question: str, hits: list[Hit], documents: dict[str, dict]) -> Answer:
        """Rerank `hits` by their best span's score, then answer with the best span or decline."""
        cfg = self.config
        cands, rows = self.features(question, hits)
        if not cands:
            return Answer(question, DECLINE.format(topic=self.topic(question)), False, (), tuple(hits[: cfg.retrieve_k]))
        best_i, support, scores = self.model.choose(rows)
        best_of_hit = np.full(len(hits), -np.inf)
        for c, z in zip(cands, scores):
            best_of_hit[c.hit_rank] = max(best_of_hit[c.hit_rank], z)
        order = sorted(range(len(hits)), key=lambda i: -best_of_hit[i])
        passages = tuple(hits[i] for i in order[: cfg.retrieve_k])
        if support < self.model.threshold:
            return Answer(question, DECLINE.format(topic=self.topic(question)), False, (), passages, support=support)
        best = cands[best_i]
        chunk, text = best.chunk, best.text.rstrip()
        prefix = ""
        if "who" in asked_kinds(simplified(question)) and chunk.speaker and chunk.speaker not in text:
            prefix = f"{chunk.speaker}（{chunk.role}）：" if chunk.role else f"{chunk.speaker}："
        end = best.start + min(len(text), cfg.max_answer_chars - len(prefix))
        cited = documents[chunk.doc_id]["text"][best.start : end]
        citation = Citation(chunk.doc_id, chunk.title, chunk.speaker, best.start, end, cited)
        return Answer(question, prefix + cited, True, (citation,), passages, support=support)

    def topic(self, question: str) -> str:
        """A short echo of what was asked, for the decline message: "学校今年的科研经费是多少？" -> "学校今年的科研经费"."""
        topic = re.sub(r"[？?！!。.\s]+$", "", question)
        topic = re.sub(r"(是多少|是什么|有哪些|是谁|是哪.*|有多少.*|讲了什么|说了什么|吗|呢)$", "", topic)
        return f"「{topic[:40]}」" if topic else "这个问题"


class QA:
    """Question in, Answer out: checks the question, retrieves, answers, and times each step."""

    def __init__(self, retriever: Retriever, answerer, config: Config):
        self.retriever, self.answerer, self.config = retriever, answerer, config

    @classmethod
    def open(cls, config: Config, embedder=None, say: Callable[[str], None] | None = None) -> "QA":
        """Load the index at config.index_dir and the embedding model it was built with.

        Pass an already loaded `embedder` to share one model between index versions. When the current version is
        damaged the newest intact one answers, and `say` gets one line about it (default: a logged warning).
        """
        import logging

        from .embedding import load_embedder
        from .index import IndexFault
        from .stores import open_serving

        index, problems = open_serving(config)
        for problem in problems:
            (say or logging.getLogger("rag").warning)(problem)
        embedder = embedder or load_embedder(config)
        if embedder.fingerprint != index.manifest["model"]["fingerprint"]:
            raise IndexFault(
                f"the index {index.path} was built with other weights of {embedder.name}; run `rag build`"
            )
        return cls.over(index, embedder, config)

    @classmethod
    def over(cls, index, embedder, config: Config) -> "QA":
        """The extractive QA over a loaded index."""
        retriever = Retriever(index, embedder, config)
        return cls(retriever, ExtractiveAnswerer(retriever, config), config)

    @property
    def index(self):
        return self.retriever.index

    def ask(self, question: str, filters: Filters | None = None) -> Answer:
        *_, last = self.stream(question, filters)
        return last.answer

    def stream(self, question: str, filters: Filters | None = None) -> Iterator[StreamEvent]:
        """What a chat shows as it comes, the "answer" event always last.

        An answerer with a `stream` method (a generator) first yields the text as it is written and each
        sentence once checked, with its citations; the extractive answerer yields only the answer.
        """
        try:
            cleaned = self.retriever.understood(check_question(question, self.config))
        except QuestionError as e:
            yield StreamEvent("answer", answer=Answer(question or "", str(e), False, error=str(e)))
            return
        t0 = time.perf_counter()
        hits = self.retriever.search(cleaned, k=self.config.rerank_k, filters=filters)
        t1 = time.perf_counter()
        stream = getattr(self.answerer, "stream", None)
        if stream is None:
            answer = self.answerer.answer(cleaned, hits, self.index.documents)
        else:
            for event in stream(cleaned, hits, self.index.documents, sentences=True):
                if event.kind == "answer":
                    answer = event.answer
                else:
                    yield event
        t2 = time.perf_counter()
        timings = {**answer.timings_ms, "retrieve": round((t1 - t0) * 1000, 2), "answer": round((t2 - t1) * 1000, 2)}
        yield StreamEvent("answer", answer=Answer(question, answer.answer, answer.found, answer.citations,
                                                  answer.passages, answer.support, timings))


class LiveQA:
    """The QA for whatever index version is current, switching when a new build lands.

    A chat in flight keeps the QA it started with; while one thread loads a new version, the others
    go on answering from the old one. The embedding model is loaded once and shared between versions.
    Every question checks `current` (its files' checksums, verified once per version and then by a stat of
    each file): when it is damaged or missing, the newest intact version answers and `problems` says why.
    """

    def __init__(self, config: Config, embedder=None, prepare: Callable[[QA], QA] | None = None,
                 say: Callable[[str], None] | None = None):
        """`prepare` is applied to each QA as it is opened (the web chat swaps in a generative answerer);
        `say` gets each new problem with the index once, in one line (default: a logged warning)."""
        import logging
        import threading

        self.config, self._embedder, self._prepare = config, embedder, prepare or (lambda qa: qa)
        self._say = say or logging.getLogger("rag").warning
        self._loading = threading.Lock()
        self._qa: QA | None = None
        self._tried: Path | None = None  # the version last loaded or tried: a failed one is not retried per question
        self.problems: list[str] = []  # why the version answering is not `current`; [] when it is

    def _report(self, problems: list[str]) -> None:
        for problem in problems:
            if problem not in self.problems:
                self._say(problem)
        self.problems = problems

    def get(self) -> QA:
        """The current QA; raises IndexFault (with what to do) when there is no usable index."""
        from .index import IndexFault
        from .stores import choose

        qa = self._qa
        try:
            path, problems = choose(self.config)
        except IndexFault as e:
            if qa is None:
                raise
            self._report([f"{e}; answering from {qa.index.version} meanwhile"])
            return qa  # no version can serve: the one in memory still can
        if qa is not None and path in (qa.index.path, self._tried):
            self._report(problems if path == qa.index.path else self.problems)
            return qa
        # Only the first caller waits for a load; later ones keep the old version meanwhile.
        if not self._loading.acquire(blocking=qa is None):
            return qa
        try:
            if self._qa is not None and path in (self._qa.index.path, self._tried):
                return self._qa
            self._tried = path
            found: list[str] = []
            try:
                fresh = self._prepare(QA.open(self.config, self._embedder, say=found.append))
            except (IndexFault, OSError, ValueError, KeyError) as e:
                if self._qa is None:
                    raise
                self._report([f"{e}; answering from {self._qa.index.version} meanwhile"])
                return self._qa  # a version that fails to load never replaces a working one
            self._embedder = fresh.retriever.embedder
            self._qa = fresh  # one assignment: readers see old or new
            self._report(found)
            return fresh
        finally:
            self._loading.release()
