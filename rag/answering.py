"""Hits -> Answer with citations: the extractive answerer (no LLM) and the question checks."""
from __future__ import annotations

import functools
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .chunking import Chunk, find_names, normalize, split_sentences
from .config import Config
from .lexical import BM25, ChineseTokenizer
from .retrieval import Filters, Hit, Retriever

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_EMOJI = re.compile("[\U0001F000-\U0001FAFF\u2600-\u27BF\uFE0F\u200d]")
_CLAUSE = re.compile(r"[^，,、；;：:。！？!?]+[，,、；;：:。！？!?”’」》）)]*")

# What kind of thing a question asks for, and how to see it in a sentence.
_ASKS = {
    "who": re.compile(r"谁|哪位|哪几位|哪些领导|哪些人|什么人|哪个人"),
    "when": re.compile(r"哪一天|哪天|什么时候|何时|几月几日|日期|什么时间"),
    "where": re.compile(r"哪里|在哪|什么地方|地点|何地|何处"),
    "number": re.compile(r"(?<!哪)(?:多少|几个|几位|几人|几项|几次)"),
    "role": re.compile(r"单位|职务|身份|职位|担任|哪个部门|什么职|什么身份"),
    "title": re.compile(r"题目|标题|题为|叫什么|什么名字"),
}
_WHERE = re.compile(r"在[^，,。；;]{1,20}?(?:举行|召开|举办|进行|开展)|在[\u4e00-\u9fff]{1,12}(?:楼|厅|室|馆|堂|场|中心)")
ROLE_WORDS = re.compile(r"大学|学院|学校|公司|部|处|办|中心|委员会|书记|校长|主任|部长|院长|处长|主席|经理|教授")
_WHEN = re.compile(r"\d{1,4}\s*[年月日号]|\d{4}-\d{1,2}")
_NUMBER = r"[0-9０-９零一二两三四五六七八九十百千万]+\s*(?:多|余)?"
_UNIT = re.compile(r"(?<!哪)(?:多少|几)([人名位个次项所篇场])")


def _has_kind(kind: str, question: str, span: str) -> bool:
    """Does `span` contain the kind of thing the question asks for (a name, a date, a place, a number)?"""
    if kind == "who":
        return bool(find_names(span))
    if kind == "when":
        return bool(_WHEN.search(span))
    if kind == "where":
        return bool(_WHERE.search(span))
    if kind == "role":
        # "张振宇是哪个单位的？" is answered where a role stands before the name ("…考核办副主任张振宇"),
        # not by a sentence of his that happens to mention a university.
        named = find_names(question)
        if named:
            return any(re.search(f"(?:{ROLE_WORDS.pattern})[^，,。；;：:]{{0,20}}?{re.escape(n)}", span) for n in named)
        return bool(ROLE_WORDS.search(span))
    if kind == "title":
        return "《" in span
    unit = _UNIT.search(question)
    return bool(re.search(_NUMBER + unit.group(1), span) if unit else re.search(r"\d", span))


DECLINE = "文章中没有提到{topic}。"

# Words that frame a question rather than carry its content ("叫什么名字", "哪个单位的", "提到了").
FRAME_WORDS = frozenset("叫 名字 题目 名称 单位 职务 职位 身份 担任 领导 报道 文章 新闻 内容 具体 方面 报告 作 主要 情况".split())
# Words that stand for a class: a question's "讲" is answered by a passage's "指出" or "强调".
WORD_CLASSES = (
    frozenset("讲 说 谈 讲话 发言 表示 指出 强调 提到 提出 认为 告诉 介绍 阐述 解读 称 谈到 要求".split()),
)
_MEETING = re.compile(r"会$|会议|会上")  # "在会上" is answered by a passage about a 报告会 or 会议
# A role or a person the question is about must be the one in the passage: "校长" is not "副校长".
_ROLE_WORD = re.compile(r"(?:长|书记|主任|部长|主席|经理|教授|老师|委员)$")
ENTITY_PENALTY = 0.5
FRAME_WEIGHT = 0.3
ANSWER_TYPE_PENALTY = 0.6  # support kept when a span lacks the kind of thing asked for
RANK_PRIOR = 0.002  # support given up per place down the retriever's ranking


@functools.lru_cache(maxsize=1)
def general_idf() -> dict[str, float]:
    """jieba's idf table for general Chinese (shipped in the wheel); "<median>" for unseen words."""
    import jieba.analyse

    path = Path(jieba.analyse.__file__).parent / "idf.txt"
    table = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        word, _, value = line.partition(" ")
        table[word] = float(value)
    table["<median>"] = float(np.median(list(table.values())))
    return table


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


def _matches(tok: str, tokens: set[str]) -> bool:
    """Is question word `tok` in a passage with `tokens`, as itself, a word it starts, or its class?"""
    if tok in tokens or any(p.startswith(tok) for p in tokens):
        return True
    if tok == "会上":
        return any(_MEETING.search(p) for p in tokens)
    # A class word may end a longer passage word: "系统阐述" is an "阐述".
    return any(
        tok in cls and any(p == w or (len(w) > 1 and p.endswith(w)) for p in tokens for w in cls)
        for cls in WORD_CLASSES
    )


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
        """Question words weighted by general Chinese idf; question-frame words count less."""
        idf = general_idf()
        return {t: idf.get(t, idf["<median>"]) * (FRAME_WEIGHT if t in FRAME_WORDS else 1.0)
                for t in dict.fromkeys(self.tokenizer.tokenize(question))}

    @staticmethod
    def _coverage(weights: dict[str, float], tokens: set[str]) -> float:
        """Share of question weight found among the span's tokens.

        A question word found as the start of a longer passage word counts ("主持" in "主持会议"); found
        only inside or at the end of one it does not: "校长" is not "副校长".
        """
        total = sum(weights.values()) or 1.0
        got = 0.0
        for tok, w in weights.items():
            if _matches(tok, tokens):
                got += w
        return got / total

    @staticmethod
    @functools.lru_cache(maxsize=256)
    def _names(question: str) -> frozenset[str]:
        return frozenset(find_names(question))

    def _context(self, chunk: Chunk) -> str:
        """The chunk's search header: article, speaker, role, report title (and metadata labels)."""
        body = normalize(chunk.text)
        return chunk.search_text[: len(chunk.search_text) - len(body)]

    def _score(self, question: str, weights: dict[str, float], chunk: Chunk, span_text: str) -> float:
        text = normalize(self._context(chunk) + span_text)
        tokens = set(self.tokenizer.tokenize(text))
        score = self._coverage(weights, tokens)
        entities = [t for t in weights if _ROLE_WORD.search(t) or t in self._names(question)]
        if any(t not in tokens for t in entities):
            score *= ENTITY_PENALTY
        for kind in _asks(question):
            # The speaker of a segment answers "who" even when the sentence says 他/她.
            if not _has_kind(kind, question, span_text) and not (kind == "who" and chunk.speaker):
                score *= ANSWER_TYPE_PENALTY
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
                s = self._coverage(weights, set(self.tokenizer.tokenize(piece))) - 0.001 * (b - a)
                if s > best_score:
                    best, best_score = (a, b), s
        return best

    def _meaning(self, cosine: float | None) -> float:
        """1 for a passage as close in meaning as real answers are, falling to 0 at the floor.

        Lexical coverage alone is fooled by a passage that merely shares the words (a distractor
        article's "学校校长" for "学校的校长在会上讲了什么"); the cosine gate is calibrated on the shared
        questions for the default model (real answers >= 0.84, such a distractor 0.82).
        """
        cfg = self.config
        if cosine is None:
            return 1.0
        return min(1.0, max(0.0, (cosine - cfg.dense_floor) / (cfg.dense_full - cfg.dense_floor)))

    def _best_span(self, question: str, weights: dict[str, float], hit: Hit, doc_text: str):
        """(support, start, end) of the hit's sentence that best covers the question."""
        chunk = hit.chunk
        meaning = self._meaning(hit.dense_score)
        best = (0.0, chunk.start, chunk.end)
        for s in split_sentences(chunk.text, chunk.start):
            score = meaning * self._score(question, weights, chunk, doc_text[s.start : s.end])
            if score > best[0]:
                best = (score, s.start, s.end)
        return best

    def answer(self, question: str, hits: list[Hit], documents: dict[str, dict]) -> Answer:
        """Rerank `hits` by how well their best sentence covers the question, then answer or decline."""
        cfg = self.config
        weights = self._weights(question)
        spans = [self._best_span(question, weights, h, documents[h.chunk.doc_id]["text"]) for h in hits]
        # Support decides; the retriever's order breaks near-ties.
        order = sorted(range(len(hits)), key=lambda i: -(spans[i][0] - RANK_PRIOR * i))
        passages = tuple(hits[i] for i in order[: cfg.retrieve_k])
        if not hits or spans[order[0]][0] < cfg.min_support:
            support = spans[order[0]][0] if hits else 0.0
            return Answer(question, DECLINE.format(topic=self.topic(question)), False, (), passages, support=support)
        support, start, end = spans[order[0]]
        chunk = hits[order[0]].chunk
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
        return Answer(question, prefix + citation.text.strip(), True, (citation,), passages, support=support)

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
    def open(cls, config: Config, embedder=None) -> "QA":
        """Load the index at config.index_dir and the embedding model it was built with.

        Pass an already loaded `embedder` to share one model between index versions.
        """
        from .embedding import load_embedder
        from .index import IndexError_, load

        index = load(config.index_dir, model_name=config.model)
        embedder = embedder or load_embedder(config)
        if embedder.fingerprint != index.manifest["model"]["fingerprint"]:
            raise IndexError_(
                f"the index at {config.index_dir} was built with other weights of {embedder.name}; run `rag build`"
            )
        return cls(Retriever(index, embedder, config), ExtractiveAnswerer(index.tokenizer, index.bm25, config), config)

    @property
    def index(self):
        return self.retriever.index

    def ask(self, question: str, filters: Filters | None = None) -> Answer:
        *_, answer = self.stream(question, filters)
        return answer

    def stream(self, question: str, filters: Filters | None = None) -> Iterator:
        """What a chat shows as it comes, the Answer always last.

        An answerer with a `stream` method (a generator) first yields the text as it is written and each
        sentence once checked, with its citations; the extractive answerer yields only the Answer.
        """
        try:
            cleaned = check_question(question, self.config)
        except QuestionError as e:
            yield Answer(question or "", str(e), False, error=str(e))
            return
        t0 = time.perf_counter()
        hits = self.retriever.search(cleaned, k=self.config.rerank_k, filters=filters)
        t1 = time.perf_counter()
        stream = getattr(self.answerer, "stream", None)
        if stream is None:
            answer = self.answerer.answer(cleaned, hits, self.index.documents)
        else:
            for item in stream(cleaned, hits, self.index.documents, sentences=True):
                if isinstance(item, Answer):
                    answer = item
                else:
                    yield item
        t2 = time.perf_counter()
        timings = {**answer.timings_ms, "retrieve": round((t1 - t0) * 1000, 2), "answer": round((t2 - t1) * 1000, 2)}
        yield Answer(question, answer.answer, answer.found, answer.citations, answer.passages,
                     answer.support, timings)


class LiveQA:
    """The QA for whatever index version is current, switching when a new build lands.

    A chat in flight keeps the QA it started with; while one thread loads a new version, the others
    go on answering from the old one. The embedding model is loaded once and shared between versions.
    """

    def __init__(self, config: Config, embedder=None, prepare: Callable[[QA], QA] | None = None):
        """`prepare` is applied to each QA as it is opened (the web chat swaps in a generative answerer)."""
        import threading

        self.config, self._embedder, self._prepare = config, embedder, prepare or (lambda qa: qa)
        self._loading = threading.Lock()
        self._qa: QA | None = None
        self._target: Path | None = None

    def get(self) -> QA:
        """The current QA; raises IndexError_ (with what to do) when there is no usable index."""
        from .index import IndexError_, current_path

        target = current_path(Path(self.config.index_dir))
        qa = self._qa
        if qa is not None and target == self._target:
            return qa
        # Only the first caller waits for a load; later ones keep the old version meanwhile.
        if not self._loading.acquire(blocking=qa is None):
            return qa
        try:
            if self._qa is not None and target == self._target:
                return self._qa
            try:
                fresh = self._prepare(QA.open(self.config, self._embedder))
            except (IndexError_, OSError, ValueError, KeyError):
                if self._qa is None:
                    raise
                return self._qa  # a version that fails to load never replaces a working one
            self._embedder = fresh.retriever.embedder
            self._qa, self._target = fresh, target  # one assignment each: readers see old or new
            return fresh
        finally:
            self._loading.release()
