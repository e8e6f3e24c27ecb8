"""Follow-up questions without an LLM: whom "他" and "这个报告" refer to, and example questions from the index
(kept only when the bot answers them well)."""
from __future__ import annotations

import re
from typing import Callable, Iterable, Sequence

from .chunking import Chunk
from .text import DATE_MENTION, nfkc

# A pronoun or a "this leader" phrase standing for one person. Not the 他 of 其他/他们/他人, nor
# the 其 of 其他/其中/其实/其余/尤其/极其/与其, which refer to nobody.
_PERSON = re.compile(
    r"该领导|这位领导|那位领导|这位|那位|此人"
    r"|(?<![尤极与])其(?![他它中实余次])"
    r"|(?<!其)他(?![们人])"
    r"|她(?![们人])"
)
# "this report" phrases, replaced as a whole by "<speaker>的报告".
_REPORT = re.compile(r"(?:这个|这篇|这场|这一|该|此|那个|那篇)(?:专题)?报告")
_REFERENCE = re.compile(f"(?P<report>{_REPORT.pattern})|{_PERSON.pattern}")
# Questions that ask for a person: their answer, not their wording, says whom the chat is about.
_ASKS_WHO = re.compile(r"谁|哪位|哪几位|哪个人|什么人")


def mentioned(text: str, speakers: Iterable[str]) -> list[str]:
    """Speakers named in `text`, in the order they appear (a longer name wins over a name inside it).

    mentioned("李俊峰和王任都讲了", ["王任", "李俊峰"]) -> ["李俊峰", "王任"]
    """
    text = nfkc(text)
    found: list[tuple[int, str]] = []
    taken: list[tuple[int, int]] = []
    for name in sorted({s for s in speakers if s}, key=len, reverse=True):
        for m in re.finditer(re.escape(nfkc(name)), text):
            if not any(a < m.end() and m.start() < b for a, b in taken):
                found.append((m.start(), name))
                taken.append((m.start(), m.end()))
    return list(dict.fromkeys(name for _, name in sorted(found)))


def rewrite(question: str, focus: str | None, speakers: Iterable[str]) -> str:
    """The question with its references to the person the chat is about spelled out.

    rewrite("他提到了哪些后勤理念？", "王继元", ["王继元"]) -> "王继元提到了哪些后勤理念？"
    rewrite("这个报告的题目是什么？", "张根华", ["张根华"]) -> "张根华的报告的题目是什么？"
    A question that names a speaker itself, or comes with no one in focus, is left as it is.
    """
    if not focus or not question or mentioned(question, speakers):
        return question
    # One pass over both patterns, so a name put in is never rewritten again (a 其 in "李其").
    return _REFERENCE.sub(lambda m: f"{focus}的报告" if m.group("report") else focus, question)


def next_focus(
    understood: str, cited: Sequence[str | None], answer: str, speakers: Iterable[str], previous: str | None
) -> str | None:
    """Whom the next follow-up is about: the last speaker the question named or the answer cited.

    A "who" question is about the person its answer cites ("哪位领导讲了后勤？" -> the cited speaker);
    any other question is about the person it names. With neither, the focus stays where it was.

    next_focus("王继元讲了什么？", ["王继元"], "…", ["王继元"], None) -> "王继元"
    next_focus("谁讲了后勤？", ["王继元"], "…", ["王继元", "王任"], "王任") -> "王继元"
    """
    speakers = list(speakers)
    asked = mentioned(understood, speakers)
    answered = [s for s in cited if s] or mentioned(answer, speakers)
    order = (answered, asked) if _ASKS_WHO.search(understood) else (asked, answered)
    for names in order:
        if names:
            return names[-1]
    return previous


# The three forms of example question (our own templates, not fitted to any data); well_answered checks each
# against what its form asks.
_SAID, _WHO_REPORTED, _WHEN_PUBLISHED = "讲了什么？", "是谁作的报告？", "是哪天发布的？"


def example_questions(chunks: Sequence[Chunk], limit: int | None = 6) -> list[str]:
    """Questions a newcomer can click, drawn from the index: its speakers, their reports, its articles.

    For a chunk of 张根华 with report title 识变与求变 this gives "张根华讲了什么？" and
    "《识变与求变》是谁作的报告？"; each article adds "「<title>」是哪天发布的？".
    """
    by_speaker: list[str] = []
    by_report: list[str] = []
    by_title: list[str] = []
    seen_speakers: set[str] = set()
    seen_reports: set[str] = set()
    seen_titles: set[str] = set()
    for c in chunks:
        if c.speaker and c.speaker not in seen_speakers:
            seen_speakers.add(c.speaker)
            by_speaker.append(f"{c.speaker}{_SAID}")
        if c.report_title and c.report_title not in seen_reports and len(c.report_title) <= 20:
            seen_reports.add(c.report_title)
            by_report.append(f"《{c.report_title}》{_WHO_REPORTED}")
        if c.title and c.title not in seen_titles:
            seen_titles.add(c.title)
            by_title.append(f"「{c.title}」{_WHEN_PUBLISHED}")
    # Interleave so that a short list still shows each kind of question.
    return _interleave(by_speaker, by_report, by_title)[:limit]


def _interleave(*lists: list[str]) -> list[str]:
    """_interleave(["a", "b"], ["x"]) -> ["a", "x", "b"]"""
    return [lst[i] for i in range(max(map(len, lists), default=0)) for lst in lists if i < len(lst)]


def well_answered(question: str, answer, speakers: Iterable[str]) -> bool:
    """Whether `answer` (an rag.answering.Answer) is one to show off for an example question.

    It must be found (the fitted gate is confident) and cited, and give what the question's form asks:
    "X讲了什么？" cites X's own words, not a passage that only names X ("王沪宁、栗战书、杨洁篪出席。");
    "《…》是谁作的报告？" names a speaker; "「…」是哪天发布的？" contains a date.
    """
    if not answer.found or answer.error or not answer.citations:
        return False
    if question.endswith(_SAID):
        return any(c.speaker == question.removesuffix(_SAID) for c in answer.citations)
    if question.endswith(_WHO_REPORTED):
        return any(c.speaker for c in answer.citations) or bool(mentioned(answer.answer, speakers))
    if question.endswith(_WHEN_PUBLISHED):
        return bool(DATE_MENTION.search(answer.answer))
    return True


def checked_examples(chunks: Sequence[Chunk], ask: Callable[[str], object], speakers: Iterable[str],
                     limit: int = 6, tries: int = 24) -> list[str]:
    """Up to `limit` example questions that `ask` (question -> Answer) answers well, trying at most `tries`."""
    speakers = list(speakers)
    good = []
    for question in example_questions(chunks, limit=tries):
        if well_answered(question, ask(question), speakers):
            good.append(question)
            if len(good) == limit:
                break
    return good
