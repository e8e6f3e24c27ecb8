"""Chinese text primitives, each defined once: punctuation sets, sentence, clause and date patterns, and the
normal forms text is matched in.

The normal forms are for matching only: what users see is the original text, and offsets point into it
(NFKC can change a text's length, so never slice the original with offsets found in a normal form).
Where two primitives look alike but differ (a set with or without ；, case kept or folded), both are here
under names that say which is which; each says who uses it and why it differs from its neighbour.
This module imports nothing else of rag's: it is the bottom of the dependency graph.

Constants cannot carry docstrings, so their examples are the `__test__` entries beside them (doctest runs
those as it runs function docstrings; tests/test_text.py runs them all).
"""
from __future__ import annotations

import re
import unicodedata

__test__: dict[str, str] = {}

# --------------------------------------------------------------------------- punctuation

# Marks that end a sentence outright. Without ；: a line holding one of these is prose, not a dateline
# (rag.readers: "2023年7月4日，学校举行报告会。" is body text, "发布时间：2023-07-04" is not).
FULL_STOPS = "。！？!?"
FULL_STOP = re.compile(f"[{FULL_STOPS}]")
__test__["FULL_STOP"] = """
>>> bool(FULL_STOP.search("2023年7月4日，学校举行报告会。")), bool(FULL_STOP.search("来源：学工处；宣传部"))
(True, False)
"""

# Where a sentence ends for chunking, citing and checking: the full stops and the semicolon, because a
# news sentence joined by ； is usually two statements, each with its own source.
SENTENCE_ENDS = FULL_STOPS + "；;"
__test__["SENTENCE_ENDS"] = """
>>> "我们要坚持；也要创新。".rstrip(SENTENCE_ENDS), set(SENTENCE_ENDS) - set(FULL_STOPS) == {"；", ";"}
('我们要坚持；也要创新', True)
"""

# Closing quotes and brackets, which stay with the sentence they close: 他说：“好。”
CLOSERS = "”’」』》）)\"'"
__test__["CLOSERS"] = """
>>> "“好。”".rstrip(CLOSERS)
'“好。'
"""

# The end of a sentence: a run of sentence ends and the closing quotes after it (rag.chunking.split_sentences).
SENTENCE_BREAK = re.compile(f"[{SENTENCE_ENDS}]+[{CLOSERS}]*")
__test__["SENTENCE_BREAK"] = """
>>> [m.group() for m in SENTENCE_BREAK.finditer("他说：“好！”她走了。。还有；最后")]
['！”', '。。', '；']
"""

# Where a clause ends: commas, semicolons, colons and the full stops; not at 、, which joins the items of a
# list ("张根华、王任" is one clause). Used to find the clause a question word or a claim is in.
CLAUSE_ENDS = "，,；;：:" + FULL_STOPS
CLAUSE_BREAK = re.compile(f"[{CLAUSE_ENDS}]")
__test__["CLAUSE_BREAK"] = """
>>> CLAUSE_BREAK.split("上午,张根华、王任作报告；徐惠钢主持。")
['上午', '张根华、王任作报告', '徐惠钢主持', '']
"""

# A clause with the marks that end it and the closing quotes after them (rag.generation.focus_clause). Its
# closers are fewer than CLOSERS (no 』 and no straight quotes): that is how the focus clause was written and
# fitted, and widening it would move some clause ends.
CLAUSE = re.compile(f"[^{CLAUSE_ENDS}]+[{CLAUSE_ENDS}”’」》）)]*")
__test__["CLAUSE"] = """
>>> [m.group() for m in CLAUSE.finditer("上午,李俊峰作报告,徐惠钢说“开会。”")]
['上午,', '李俊峰作报告,', '徐惠钢说“开会。”']
>>> [m.group() for m in CLAUSE.finditer("他说『好。』")]
['他说『好。', '』']
"""

# Pause marks inside one sentence (逗号, 顿号, 冒号) where the chunker cuts a sentence too long for a chunk.
# Unlike CLAUSE_ENDS it has 、 (a long list may be cut between items) and no ；or full stop (they already
# ended the sentence: SENTENCE_BREAK).
PAUSE_MARKS = "，,、：:"
PAUSE = re.compile(f"[{PAUSE_MARKS}]")
__test__["PAUSE"] = """
>>> [m.end() for m in PAUSE.finditer("党委常委、副校长：张根华，王任")]
[5, 9, 13]
"""

# --------------------------------------------------------------------------- dates

# A Chinese date, optionally with a time: groups (year, month, day, hour, minute); hour and minute may be None.
# Spaces are allowed between the parts, as datelines write them (rag.readers).
CN_DATE = re.compile(
    r"(\d{4})\s*年\s*(\d{1,2})\s*月\s*(\d{1,2})\s*日(?:\s*(\d{1,2})\s*[时時点點:：]\s*(\d{1,2})\s*分?)?"
)
__test__["CN_DATE"] = """
>>> CN_DATE.search("2023年07月04日19时40分 阅读:2214").groups()
('2023', '07', '04', '19', '40')
>>> CN_DATE.search("2023 年 7 月 4 日").groups()
('2023', '7', '4', None, None)
"""

# A numeric date (2023-07-04, 2023/7/4, 2023.7.4), optionally with a time; the same groups as CN_DATE.
ISO_DATE = re.compile(r"(?<!\d)(\d{4})[-/.](\d{1,2})[-/.](\d{1,2})(?!\d)(?:(?:\s+|T)(\d{1,2}):(\d{2})(?::\d{2})?)?")
__test__["ISO_DATE"] = """
>>> ISO_DATE.search("发布时间：2023/7/4 19:40").groups(), ISO_DATE.search("12023-07-04")
(('2023', '7', '4', '19', '40'), None)
"""

# Whether a text mentions a date at all: a year, a month and day, or an ISO date. Looser than CN_DATE (a
# year alone counts) and without groups: it says an answer gives a date (rag.conversation), it parses nothing.
DATE_MENTION = re.compile(r"\d{4}年|\d{1,2}月\d{1,2}日|\d{4}-\d{1,2}-\d{1,2}")
__test__["DATE_MENTION"] = """
>>> [bool(DATE_MENTION.search(t)) for t in ("2023年举行", "于7月4日发布", "2023-07-04", "七月四日")]
[True, True, True, False]
"""

# --------------------------------------------------------------------------- normal forms, for matching only


def nfkc(text: str) -> str:
    """NFKC: full-width letters, digits and punctuation become their ASCII forms; case is kept.
    For matching and for what is embedded and indexed (Chunk.search_text), never for display.

    >>> nfkc("ＡＢ，１２")
    'AB,12'
    """
    return unicodedata.normalize("NFKC", text)


def fold(text: str) -> str:
    """NFKC and lower-cased: the form in which words are compared whatever their width and case
    (BM25 tokens, the support checker's word overlap). Unlike `nfkc`, "CCTV" and "cctv" are the same.

    >>> fold("ＣＣＴＶ报道"), nfkc("ＣＣＴＶ报道")
    ('cctv报道', 'CCTV报道')
    """
    return nfkc(text).lower()


def compact(text: str) -> str:
    """NFKC without any whitespace, case kept: how gold answers are found in answers and passages
    (the shared eval format prescribes it), so "7 月 4 日" matches "7月4日".

    >>> compact("7 月\\u3000４ 日"), compact("ABC d")
    ('7月4日', 'ABCd')
    """
    return re.sub(r"\s+", "", nfkc(text))
