"""Question -> what is asked: cleaned and checked, traditional characters mapped for matching, the kind of
answer it wants (person, time, place, number, title, organisation, role), in Chinese or English.

The patterns below are the question words of Chinese and English grammar, not words of any one question; how
much each kind match counts is learned (rag/spans.py, training/README.md).
"""
from __future__ import annotations

import functools
import re

from .config import Config
from .errors import RagError
from .text import CLAUSE_BREAK

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN = re.compile(r"[A-Za-z]{2,}")
_EMOJI = re.compile("[\U0001F000-\U0001FAFF\u2600-\u27BF\uFE0F\u200d]")

KINDS = ("who", "when", "where", "number", "title", "org", "role")

# Question words per kind of answer, Chinese then English.
_ASKS = {
    "who": re.compile(r"谁|哪位|哪几位|哪些人|什么人|哪个人|姓名|名字是|\bwho\b|\bwhom\b|\bwhose\b|\bname of\b", re.I),
    "when": re.compile(r"什么时候|何时|哪天|哪一天|几月|几号|几点|几时|哪年|哪一年|什么时间|日期|时间是|\bwhen\b|what time|what date|which (?:day|year|month)", re.I),
    "where": re.compile(r"哪里|哪儿|在哪|什么地方|地点|何地|何处|哪个地方|哪座|\bwhere\b|which (?:place|city|venue)|\bvenue\b|\blocation\b", re.I),
    "number": re.compile(r"(?<!哪)多少|几(?:个|名|位|人|项|次|家|所|场|天|年|岁|届|支|条|辆|户|间|栋|批|类|种|元|万|千|百|十)|多大|多长|多高|多久|多重|how (?:many|much|long|old|big)|\bnumber of\b|\bpercent", re.I),
    "title": re.compile(r"题目|主题|标题|题为|叫什么|名称|什么名字|口号|\btitle\b|\btheme\b|\btopic\b|\bcalled\b|\bnamed\b|\bslogan\b", re.I),
    "org": re.compile(r"哪个单位|哪家|哪个部门|什么机构|哪个机构|哪个公司|哪所|哪个学校|哪些单位|哪个组织|哪支|哪个队|\bwhich (?:organi[sz]ation|company|department|school|university|team|unit)\b|\borgani[sz]ed by\b", re.I),
    "role": re.compile(r"职务|身份|职位|担任|什么职|什么官|是做什么的|\bposition\b|\brole\b|\bjob\b|\bwhat post\b", re.I),
}


class QuestionError(RagError, ValueError):
    """A question that cannot be answered as asked; the message says why, in Chinese."""


def check_question(question: str, config: Config) -> str:
    """The question to answer, cleaned; raises QuestionError with a message for a user otherwise.

    check_question("  王任讲了什么？🙂 ", Config()) -> "王任讲了什么？"
    English and traditional-Chinese questions are accepted: the articles are searched across languages.
    """
    if question is None or not question.strip():
        raise QuestionError("请输入一个问题，例如「报告会在哪里举行？」。")
    if len(question) > config.max_question_chars:
        raise QuestionError(
            f"问题太长（{len(question)} 个字符，上限 {config.max_question_chars}）。请把问题缩短成一句话。"
        )
    cleaned = _EMOJI.sub("", question).strip()
    if not (_CJK.search(cleaned) or _LATIN.search(cleaned)):
        raise QuestionError("请用一句中文（或英文）提问，例如「报告会在哪里举行？」（Please ask a question in words）。")
    return cleaned


@functools.lru_cache(maxsize=1)
def _t2s():
    import opencc

    return opencc.OpenCC("t2s.json")


@functools.lru_cache(maxsize=4096)
def simplified(text: str) -> str:
    """Traditional characters mapped to simplified, for matching only: simplified("報告會在哪裡舉行") -> "报告会在哪里举行"."""
    return _t2s().convert(text) if _CJK.search(text) else text


def is_english(question: str) -> bool:
    """More Latin letters than Chinese characters: is_english("Who chaired the meeting?") -> True."""
    return len(_LATIN.findall(question)) > 0 and sum(len(w) for w in _LATIN.findall(question)) > 2 * len(_CJK.findall(question))


def asked_kinds(question: str) -> frozenset[str]:
    """The kinds of answer a question asks for: asked_kinds("报告会在哪里举行？") -> {"where"}."""
    return frozenset(k for k, p in _ASKS.items() if p.search(question))


# The Chinese question words (grammar): 谁 什么 多少 几 哪 何 怎么 怎样 如何.
_WH = re.compile(r"谁|什么|多少|几|哪|何|怎么|怎样|如何")


@functools.lru_cache(maxsize=4096)
def focus_words(question: str) -> tuple[str, ...]:
    """The words next to the question word, which name what is asked (the rest of a question mostly names the
    event): up to two words of two or more characters on each side, in the clause that holds the question word.
    A span that answers usually says them too; a sentence that only shares the event's words usually does not.

    focus_words("洋河镇中心卫生院的院长叫什么名字？") -> ("卫生院", "院长", "名字"); English -> ().
    """
    import jieba

    clause = next((c for c in CLAUSE_BREAK.split(question) if _WH.search(c)), "")
    words = jieba.lcut(clause)
    at = next((i for i, w in enumerate(words) if _WH.search(w)), None)
    if at is None:
        return ()
    content = lambda ws: [w for w in ws if len(w) >= 2 and not _WH.search(w)]  # noqa: E731
    return tuple(content(words[:at])[-2:] + content(words[at + 1 :])[:2])


def by_pinyin(words) -> dict[str, tuple[str, ...]]:
    """The Chinese words of 2-4 characters among `words`, by their toneless pinyin run together; where several
    words sound alike, the names of places, people and bodies among them (jieba's tags), if any:
    by_pinyin(["上饶", "会议", "会", "北京", "背景"]) -> {"shangrao": ("上饶",), "huiyi": ("会议",), "beijing": ("北京",)}"""
    import jieba.posseg
    from pypinyin import lazy_pinyin

    out: dict[str, list[str]] = {}
    for word in words:
        if 2 <= len(word) <= 4 and all(_CJK.match(ch) for ch in word):
            out.setdefault("".join(lazy_pinyin(word)).lower(), []).append(word)
    for key, alike in out.items():
        if len(alike) > 1:
            names = [w for w in alike if [p.flag for p in jieba.posseg.lcut(w)] in (["ns"], ["nr"], ["nt"], ["nz"])]
            out[key] = names or alike
    return {k: tuple(v) for k, v in out.items()}


def pinyin_names(question: str, spelled: dict[str, tuple[str, ...]]) -> list[str]:
    """The Chinese words an English question names in pinyin: capitalised words and pairs of them
    ("Shangrao" -> 上饶, "Chen Yong" -> 陈勇), looked up in `spelled` (by_pinyin of the corpus's words).
    A Chinese question names its words itself: [].

    pinyin_names("Who spoke at the Shangrao meeting?", {"shangrao": ("上饶",)}) -> ["上饶"]
    """
    if _CJK.search(question):
        return []
    words = re.findall(r"[A-Za-z][A-Za-z'’-]*", question)
    keys = [w for w in words if w[0].isupper()]
    keys += [a + b for a, b in zip(words, words[1:]) if a[0].isupper() and b[0].isupper()]
    found = [name for key in keys for name in spelled.get(re.sub(r"['’-]", "", key).lower(), ())]
    return list(dict.fromkeys(found))
