"""A chat turn without any UI: what the web page shows of a question and its answer, as plain records and HTML.

rag/web.py wires this and rag/operators.py (the operators' tab) to Gradio; nothing here imports it, so every step
can be tested by calling it.
"""

import dataclasses
import datetime as dt
import logging
import re
import threading
import time
from typing import Callable, Iterable, Iterator

from .answering import QA, LiveQA, StreamEvent
from .conversation import checked_examples, next_focus, rewrite
from .index import IndexFault, StoreUnreachable
from .llm import GenerationError
from .rendering import answer_html, answer_text, filters_text, message_html, writing_html
from .retrieval import Filters
from .serving import Rebuilder, index_status

NO_INDEX = "还没有可用的索引，暂时无法回答。请管理员在「管理」标签页上传文章并重建索引，或在服务器上运行 `rag build`。"
FIRST_BUILD = "索引正在构建中，请稍候一两分钟再提问。"
STORE_FAILED = "检索库暂时无法访问：{error}。请稍后再试，或请管理员检查 Milvus。"
GENERATION_FAILED = "生成回答时出错：{error}。请稍后再试，或请管理员检查语言模型（不设 RAG_GENERATOR 即用抽取式回答）。"
REBUILDING = "索引正在更新：本回答来自当前版本 {version}，更新完成后将自动使用新版本。"
TYPING_STEPS = 8  # pieces an answer is typed out in
TYPING_DELAY = 0.03  # seconds between pieces
SHOWN_QUESTION_CHARS = 300  # a very long question is shown shortened in the chat


# ------------------------------------------------------------------ records


@dataclasses.dataclass(frozen=True)
class Rated:
    """What a 👍/👎 on an answer records (the keyword arguments of FeedbackStore.add, less the rating)."""

    question: str
    understood: str
    answer: str
    found: bool
    citations: list[dict]
    index_version: str


@dataclasses.dataclass(frozen=True)
class Session:
    """One conversation: the speaker follow-ups refer to, and the answers that can be rated by message index."""

    focus: str | None = None
    turns: dict[int, Rated] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Reply:
    """One step of a chat turn: the reply's HTML as it shows now, and the session after this step."""

    html: str
    session: Session


@dataclasses.dataclass(frozen=True)
class PageInfo:
    """The page's header, filters and examples for the index now served."""

    speakers: list[str]  # the filter's choices
    date_from_hint: str  # placeholders of the date fields
    date_to_hint: str
    examples: list[str]  # checked example questions ([] until checked)
    headline: str  # the status line (Markdown)
    shown: tuple  # (index version, whether the examples are the checked ones): the page's state, to skip repeats


# ------------------------------------------------------------------ filters and small texts


def parse_filters(speakers: Iterable[str] | None, date_from: str | None, date_to: str | None) -> Filters:
    """Filters from the form; ValueError with a message in Chinese for a malformed date."""
    days = []
    for label, value in (("起始日期", date_from), ("截止日期", date_to)):
        value = (value or "").strip()
        if value:
            try:
                dt.date.fromisoformat(value)
            except ValueError:
                raise ValueError(f"{label}「{value}」格式不对，请写成 2023-07-04 这样的形式。") from None
        days.append(value or None)
    return Filters(speakers=tuple(speakers or ()), date_from=days[0], date_to=days[1])


def filter_problem(filters: Filters, chunks) -> str | None:
    """Why no passage can pass `filters`, in Chinese; None when some can (or there are no filters).

    Said instead of answering, so that "文章中没有提到" is never the filter's fault.
    """
    if not filters:
        return None
    if filters.date_from and filters.date_to and filters.date_from > filters.date_to:
        return f"起始日期 {filters.date_from} 晚于截止日期 {filters.date_to}，没有文章能同时满足，请调整日期。"
    known = {c.speaker for c in chunks if c.speaker}
    unknown = [s for s in filters.speakers if s not in known]
    if unknown and len(unknown) == len(filters.speakers):
        return f"索引中没有发言人「{'、'.join(unknown)}」，请从发言人列表中选择。"
    if any(filters.allows(c) for c in chunks):
        return None
    days = sorted(c.date[:10] for c in chunks if c.date)
    span = f"（已收录的文章在 {days[0]} 至 {days[-1]} 之间）" if days else ""
    return f"没有文章符合筛选条件（{filters_text(filters)}）{span}，请放宽筛选后再问。"


def question_html(question: str | None) -> str:
    """The user's message in the chat; a very long question shortened: "问"*301 -> "问"*300 + "…（共 301 个字符）"."""
    question = question or ""
    if len(question) > SHOWN_QUESTION_CHARS:
        question = f"{question[:SHOWN_QUESTION_CHARS]}…（共 {len(question)} 个字符）"
    return message_html(question or "（空问题）")


# ------------------------------------------------------------------ the chat


class _Writing:
    """Follows an answer stream: iterate for the HTML after each change; then `.answer`, and `.written`
    (the text a generator wrote; "" for the extractive answerer, which yields only the answer)."""

    def __init__(self, stream: Iterator[StreamEvent]):
        self._stream, self.written, self.sources, self.answer = stream, "", [], None

    def __iter__(self) -> Iterator[str]:
        for event in self._stream:
            if event.kind == "answer":
                self.answer = event.answer
                continue
            if event.kind == "text":  # a generator's tokens, as they come
                self.written += event.text
            elif event.kind == "retry":  # nothing it wrote had support: it writes again
                self.written, self.sources = "", []
            elif event.kind == "sentence":  # checked against the passages: its sources show while the rest is written
                self.sources += [c for c in event.sentence.spans if c not in self.sources]
            yield writing_html(self.written, self.sources)


class Chat:
    """Questions in, what the chat shows out, from whatever index LiveQA serves (or why none can answer)."""

    def __init__(self, live: LiveQA, rebuilder: Rebuilder, *, sleep: Callable[[float], None] = time.sleep):
        self.live, self.rebuilder, self._sleep = live, rebuilder, sleep
        self._examples: dict[str, list[str]] = {}  # index version -> example questions checked against it
        self._examples_lock = threading.Lock()

    def current(self) -> tuple[QA | None, str | None]:
        """(qa, None), or (None, message) when there is no index to answer from."""
        try:
            return self.live.get(), None
        except StoreUnreachable as e:
            return None, STORE_FAILED.format(error=e)
        except (IndexFault, OSError, ValueError):  # missing, or unreadable (a corrupt manifest is a ValueError)
            return None, FIRST_BUILD if self.rebuilder.running else NO_INDEX

    def _note(self, qa: QA) -> str | None:
        return REBUILDING.format(version=qa.index.version) if self.rebuilder.running else None

    def _filters_for(self, qa: QA | None, problem: str | None, speakers, date_from, date_to):
        """(filters, None), or (None, why the question is not answered)."""
        if problem is not None:
            return None, problem
        try:
            filters = parse_filters(speakers, date_from, date_to)
        except ValueError as e:
            return None, str(e)
        return filters, filter_problem(filters, qa.index.chunks)

    def turn(self, question: str | None, session: Session, speakers=(), date_from: str = "", date_to: str = "", *,
             at: int) -> Iterator[Reply]:
        """The reply to `question` as it is written, the finished answer last; `at`: the reply's message index
        in the chat (a rating refers to it). A notice (no index, a bad filter, a failed LLM) ends the turn."""
        question = question or ""
        qa, problem = self.current()
        filters, problem = self._filters_for(qa, problem, speakers, date_from, date_to)
        if problem is not None:
            yield Reply(message_html(problem, "rag-notice"), session)
            return
        yield Reply(message_html("…"), session)  # the question shows at once, with a placeholder for the answer
        understood = rewrite(question.strip(), session.focus, qa.index.speakers)
        writing = _Writing(qa.stream(understood, filters=filters))
        try:
            for shown in writing:
                yield Reply(shown, session)
        except GenerationError as e:  # the LLM failed (server down, model missing): say so, keep the chat going
            yield Reply(message_html(GENERATION_FAILED.format(error=e), "rag-notice"), session)
            return
        except IndexFault as e:  # the store went away (Milvus unreachable): say so, keep the chat going
            yield Reply(message_html(STORE_FAILED.format(error=e), "rag-notice"), session)
            return
        answer, note = writing.answer, self._note(qa)
        if not writing.written:
            # The extractive answer is ready at once; typing it out keeps the chat's familiar rhythm.
            step = max(1, -(-len(answer.answer) // TYPING_STEPS))
            for end in range(step, len(answer.answer), step):
                yield Reply(message_html(answer.answer[:end] + "▍"), session)
                self._sleep(TYPING_DELAY)
        if answer.error is None:
            rated = Rated(question, understood, answer.answer, answer.found,
                          [dataclasses.asdict(c) for c in answer.citations], qa.index.version)
            focus = next_focus(understood, [c.speaker for c in answer.citations], answer.answer,
                               qa.index.speakers, session.focus)
            session = Session(focus, {**session.turns, at: rated})
        yield Reply(answer_html(answer, understood, filters, note), session)

    def answer_text(self, question: str | None, speaker: str = "", date_from: str = "", date_to: str = "") -> str:
        """One question's answer and its sources as text (the /chat API). `speaker`: names separated by commas."""
        speakers = [s for s in re.split(r"[,，、\s]+", speaker or "") if s]
        qa, problem = self.current()
        filters, problem = self._filters_for(qa, problem, speakers, date_from, date_to)
        if problem is not None:
            return problem
        question = question or ""
        try:
            answer = qa.ask(question, filters=filters)
        except GenerationError as e:
            return GENERATION_FAILED.format(error=e)
        except IndexFault as e:
            return STORE_FAILED.format(error=e)
        return answer_text(answer, question, filters, self._note(qa))

    def _check_examples(self, qa: QA) -> list[str]:
        """The example questions for qa's index, each answered well by the extractive answerer (once per version)."""
        with self._examples_lock:
            version = qa.index.version
            if version not in self._examples:
                # Extractive even when an LLM writes the chat's answers: a quick check of what the passages support.
                checker = QA.over(qa.index, qa.retriever.embedder, qa.config)
                try:
                    self._examples[version] = checked_examples(qa.index.chunks, checker.ask, qa.index.speakers)
                except IndexFault as e:  # the store went away meanwhile: no examples now, a later page tries again
                    logging.getLogger("rag").warning("example questions not checked: %s", e)
                    return []
            return self._examples[version]

    def examples_ready(self, qa: QA) -> list[str] | None:
        """The checked examples if done; else None, with the check started in the background."""
        found = self._examples.get(qa.index.version)
        if found is None and not self._examples_lock.locked():
            threading.Thread(target=self._check_examples, args=(qa,), daemon=True).start()
        return found

    def page(self, shown: tuple | None = None) -> PageInfo | None:
        """What the page's header, filters and examples show now; None when `shown` (PageInfo.shown) still holds."""
        qa, problem = self.current()
        if qa is None:
            now = (None, False)
            return None if now == shown else PageInfo([], "", "", [], f"**注意：** {problem}", now)
        examples = self.examples_ready(qa)
        now = (qa.index.version, examples is not None)
        if now == shown:
            return None
        days = sorted(c.date[:10] for c in qa.index.chunks if c.date)
        status = index_status(qa.index)
        return PageInfo(sorted(qa.index.speakers), f"最早 {days[0]}" if days else "YYYY-MM-DD",
                        f"最新 {days[-1]}" if days else "YYYY-MM-DD", list(examples or []),
                        f"当前索引：{status['documents']} 篇文章、{status['chunks']} 个段落（版本 {status['version']}）",
                        now)

    def rate(self, feedback, session: Session, index: int, liked: bool | None) -> str | None:
        """Record a 👍 (liked True), 👎 (False) or its withdrawal (None) of the message at `index`; the thanks to
        show, or None when that message is a notice, not an answer."""
        rated = session.turns.get(index)
        if rated is None:
            return None
        rating = {True: "up", False: "down"}.get(liked, "none")
        feedback.add(rating=rating, **dataclasses.asdict(rated))
        return "谢谢，反馈已记录。" if rating != "none" else "已撤回反馈。"


# ------------------------------------------------------------------ the operators
