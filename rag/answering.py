"""Hits -> Answer with citations: the extractive answerer (no LLM) and the question checks."""
from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field

from .chunking import Chunk, normalize, split_sentences
from .config import Config
from .lexical import BM25, ChineseTokenizer
from .retrieval import Filters, Hit, Retriever

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_EMOJI = re.compile("[\U0001F000-\U0001FAFF\u2600-\u27BF\uFE0F\u200d]")
_CLAUSE = re.compile(r"[^，,、；;：:。！？!?]+[，,、；;：:。！？!?”’」》）)]*")
_DIGIT = re.compile(r"[0-9０-９零一二两三四五六七八九十百千万亿]")

# What kind of thing a question asks for, and how to see it in a sentence.
_ASKS = {
    "who": re.compile(r"谁|哪位|哪几位|哪些领导|哪些人|什么人|哪个人"),
    "when": re.compile(r"哪一天|哪天|什么时候|何时|几月几日|日期|什么时间"),
    "where": re.compile(r"哪里|在哪|什么地方|地点|何地|何处"),
    "number": re.compile(r"多少|几个|几位|几人|几项|几次"),
}
_HAS = {
    "when": re.compile(r"\d{1,4}\s*[年月日号]|[0-9]{4}-[0-9]{2}"),
    "where": re.compile(r"[楼厅室馆堂院校场中心会议]"),
    "number": re.compile(r"\d"),
}

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
    support: float = 0.0  # how well the best span covers the question (0..1), the decline criterion
    timings_ms: dict = field(default_factory=dict)
    error: str | None = None  # set when the question itself was refused (empty, too long, ...)

    def to_json(self) -> dict:
        return {
            "question": self.question, "answer": self.answer, "found": self.found,
            "citations": [asdict(c) for c in self.citations],
            "passages": [h.to_json() for h in self.passages],
            "support": round(self.support, 4), "timings_ms": self.timings_ms, "error": self.error,
        }


class QuestionError(ValueError):
    """A question that cannot be answered as asked; the message says why, in Chinese."""


def check_question(question: str, config: Config) -> str:
    """The question to answer, cleaned; raises QuestionError with a message for a user otherwise.

    check_question("  王任讲了什么？🙂 ", Config()) -> "王任讲了什么？"
    """
    if question is None or not question.strip():
        raise QuestionError("请输入一个问题，例如「报告会在哪里举行？」。")
    if len(question) > config.max_question_chars:
        raise QuestionError(
            f"问题太长（{len(question)} 个字符，上限 {config.max_question_chars}）。请把问题缩短成一句话。"
        )
    cleaned = _EMOJI.sub("", question).strip()
    if not _CJK.search(cleaned):
        raise QuestionError("请用中文提问：本系统回答关于学校中文新闻报道的问题（Please ask in Chinese）。")
    return cleaned


def _asks(question: str) -> set[str]:
    return {kind for kind, pattern in _ASKS.items() if pattern.search(question)}


def _clauses(text: str, start: int) -> list[tuple[int, int]]:
    return [(start + m.start(), start + m.end()) for m in _CLAUSE.finditer(text)]


class ExtractiveAnswerer:
    """Answers with the shortest sentence or clause span that covers the question, or declines.

    Support is the idf-weighted share of the question's content words found in the span and its
    segment's context (speaker, role, report title), which is what a reader would check.
    """

    def __init__(self, tokenizer: ChineseTokenizer, bm25: BM25, config: Config):
        self.tokenizer, self.bm25, self.config = tokenizer, bm25, config

    def _weights(self, question: str) -> dict[str, float]:
        return {t: self.bm25.idf_of(t) for t in dict.fromkeys(self.tokenizer.tokenize(question))}

    def _coverage(self, weights: dict[str, float], tokens: set[str], text: str) -> float:
        total = sum(weights.values()) or 1.0
        got = 0.0
        for tok, w in weights.items():
            if tok in tokens:
                got += w
            elif len(tok) >= 3 and tok in text:
                got += 0.5 * w  # a long word inside a differently segmented phrase
        return got / total

    def _context(self, chunk: Chunk) -> str:
        """The chunk's search header: article, speaker, role, report title (and metadata labels)."""
        body = normalize(chunk.text)
        return chunk.search_text[: len(chunk.search_text) - len(body)]

    def _score(self, question: str, weights: dict[str, float], chunk: Chunk, span_text: str) -> float:
        text = normalize(self._context(chunk) + span_text)
        score = self._coverage(weights, set(self.tokenizer.tokenize(text)), text)
        for kind in _asks(question):
            if kind == "who" and not (chunk.speaker or re.search(r"[\u4e00-\u9fff]{2,3}(?:主持|作|以|表示|指出)", span_text)):
                score *= 0.7
            elif kind in _HAS and not _HAS[kind].search(span_text):
                score *= 0.6
        return score

    def _shorten(self, weights: dict[str, float], text: str, start: int, end: int, limit: int) -> tuple[int, int]:
        """The clause window within `limit` characters that covers the most question weight."""
        clauses = _clauses(text[start:end], start)
        best, best_score = (start, min(end, start + limit)), -1.0
        for i in range(len(clauses)):
            for j in range(i, len(clauses)):
                a, b = clauses[i][0], clauses[j][1]
                if b - a > limit:
                    break
                piece = normalize(text[a:b])
                s = self._coverage(weights, set(self.tokenizer.tokenize(piece)), piece) - 0.001 * (b - a)
                if s > best_score:
                    best, best_score = (a, b), s
        return best

    def answer(self, question: str, hits: list[Hit], documents: dict[str, dict]) -> Answer:
        cfg = self.config
        weights = self._weights(question)
        best = None  # (score, hit, start, end)
        for rank, hit in enumerate(hits[: cfg.answer_passages]):
            chunk = hit.chunk
            doc_text = documents[chunk.doc_id]["text"]
            sentences = split_sentences(chunk.text, chunk.start) or []
            for s in sentences:
                # A tiny rank prior breaks ties in favour of the retriever's order.
                score = self._score(question, weights, chunk, doc_text[s.start : s.end]) - 0.01 * rank
                if best is None or score > best[0]:
                    best = (score, hit, s.start, s.end)
        topic = self._topic(question)
        if best is None or best[0] < cfg.min_support:
            return Answer(question, DECLINE.format(topic=topic), False, (), tuple(hits),
                          support=max(best[0], 0.0) if best else 0.0)
        score, hit, start, end = best
        chunk = hit.chunk
        doc_text = documents[chunk.doc_id]["text"]
        while start < end and doc_text[start].isspace():
            start += 1
        prefix = ""
        if "who" in _asks(question) and chunk.speaker and chunk.speaker not in doc_text[start:end]:
            prefix = f"{chunk.speaker}（{chunk.role}）：" if chunk.role else f"{chunk.speaker}："
        limit = cfg.max_answer_chars - len(prefix)
        if end - start > limit:
            start, end = self._shorten(weights, doc_text, start, end, limit)
        citation = Citation(chunk.doc_id, chunk.title, chunk.speaker, start, end, doc_text[start:end])
        return Answer(question, prefix + citation.text.strip(), True, (citation,), tuple(hits), support=score)

    def _topic(self, question: str) -> str:
        """A short echo of what was asked, for the decline message: "学校今年的科研经费是多少？" -> "学校今年的科研经费"."""
        topic = re.sub(r"[？?！!。.\s]+$", "", question)
        topic = re.sub(r"(是多少|是什么|有哪些|是谁|是哪.*|有多少.*|讲了什么|说了什么|吗|呢)$", "", topic)
        return f"「{topic[:40]}」" if topic else "这个问题"


class QA:
    """Question in, Answer out: checks the question, retrieves, answers, and times each step."""

    def __init__(self, retriever: Retriever, answerer, config: Config):
        self.retriever, self.answerer, self.config = retriever, answerer, config

    def ask(self, question: str, filters: Filters | None = None) -> Answer:
        try:
            cleaned = check_question(question, self.config)
        except QuestionError as e:
            return Answer(question or "", str(e), False, error=str(e))
        t0 = time.perf_counter()
        hits = self.retriever.search(cleaned, filters=filters)
        t1 = time.perf_counter()
        answer = self.answerer.answer(cleaned, hits, self.retriever.index.documents)
        t2 = time.perf_counter()
        timings = {"retrieve": round((t1 - t0) * 1000, 2), "answer": round((t2 - t1) * 1000, 2)}
        return Answer(question, answer.answer, answer.found, answer.citations, answer.passages,
                      answer.support, timings)
