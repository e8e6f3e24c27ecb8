"""The news layout: the Article record and the rules that find a saved news page's parts in its lines (title, date
and read-count line, image file names, body paragraphs, credits line); rag/readers.py applies them per format."""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime

from .decoding import CorpusError
from .text import CN_DATE, FULL_STOP, ISO_DATE

@dataclass(frozen=True)
class Span:
    """A piece of Article.text: text[start:end]."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if not 0 <= self.start <= self.end:
            raise ValueError(f"bad span [{self.start}, {self.end})")


@dataclass(frozen=True)
class Article:
    doc_id: str  # path relative to the corpus dir without suffix ("sub/x"); JSONL records: "<stem>#<id>"
    path: str  # path relative to the corpus dir, posix
    title: str
    date: str | None  # "2023-07-04 19:40", or "2023-07-04" when the source gives no time
    read_count: int | None
    credits: tuple[tuple[str, str], ...]  # (role, name) in source order
    text: str  # decoded, BOM removed, CRLF/CR -> LF, nothing else changed
    paragraphs: tuple[Span, ...]  # body paragraphs, trimmed; no title/meta/image/credits lines
    title_span: Span | None  # None when the title is not in text (JSONL)
    meta_span: Span | None  # the date/read-count line
    credits_span: Span | None
    encoding: str
    content_hash: str  # sha256 hex of text

    def to_json(self) -> dict:
        def span(s: Span | None) -> list[int] | None:
            return None if s is None else [s.start, s.end]

        return {
            "doc_id": self.doc_id,
            "path": self.path,
            "title": self.title,
            "date": self.date,
            "read_count": self.read_count,
            "credits": [{"role": role, "name": name} for role, name in self.credits],
            "encoding": self.encoding,
            "content_hash": self.content_hash,
            "title_span": span(self.title_span),
            "meta_span": span(self.meta_span),
            "credits_span": span(self.credits_span),
            "paragraphs": [[p.start, p.end] for p in self.paragraphs],
            "text": self.text,
        }


# ---------------------------------------------------------------- the news layout

_IMAGE_LINE = re.compile(r"\S+\.(?:jpg|jpeg|png|gif|webp|bmp)", re.IGNORECASE)
# The labels news pages put on their date/read-count and credits lines: the seed page's ("阅读:2214",
# "(王保红/摄影 南木/编辑)") and their usual synonyms in Chinese newsrooms, simplified and traditional. Page grammar,
# not fitted to any question; tests/test_corpus.py reads pages in each form.
_READS = re.compile(r"(?:阅读|閱讀|浏览|瀏覽|点击|點擊)(?:次数|次數|量|数|數)?\s*[:：]?\s*(\d[\d,]*)")
_META_LABEL = re.compile(
    r"(?:(?:发布|發布|發佈|发表|發表|更新)(?:时间|時間|日期)|来源|來源|作者|日期|时间|時間)\s*[:：]"
)

_ROLES = {
    "摄影": "photographer", "攝影": "photographer", "图片": "photographer", "圖片": "photographer",
    "图": "photographer", "圖": "photographer",
    "供稿": "contributor",
    "审核": "reviewer", "審核": "reviewer", "审稿": "reviewer", "審稿": "reviewer",
    "编辑": "editor", "編輯": "editor", "责任编辑": "editor", "責任編輯": "editor",
    "责编": "editor", "責編": "editor",
    "文字": "writer", "撰稿": "writer", "撰文": "writer", "作者": "writer", "文": "writer",
    "通讯员": "correspondent", "通訊員": "correspondent",
    "记者": "reporter", "記者": "reporter",
}  # fmt: skip


def lines_of(text: str, start: int = 0, end: int | None = None) -> list[Span]:
    """Spans of the non-blank lines of text[start:end], trimmed of surrounding whitespace.

    >>> lines_of("标题\\n\\n  正文 \\n")
    [Span(start=0, end=2), Span(start=6, end=8)]
    """
    end = len(text) if end is None else end
    spans = []
    pos = start
    while pos <= end:
        stop = text.find("\n", pos, end)
        stop = end if stop < 0 else stop
        line = text[pos:stop]
        stripped = line.strip()
        if stripped:
            left = pos + len(line) - len(line.lstrip())
            spans.append(Span(left, left + len(stripped)))
        pos = stop + 1
    return spans


def parse_date(value: str) -> str | None:
    """First date in value as "YYYY-MM-DD HH:MM", or "YYYY-MM-DD" when it has no time.

    >>> parse_date("2023年07月04日19时40分\\xa0阅读:2214")
    '2023-07-04 19:40'
    >>> parse_date("发布时间：2023/7/4")
    '2023-07-04'
    """
    for pattern in (CN_DATE, ISO_DATE):
        for m in pattern.finditer(value):
            y, mo, d, h, mi = m.groups()
            try:
                day = datetime(int(y), int(mo), int(d))
            except ValueError:
                continue
            if h is not None and int(h) < 24 and int(mi) < 60:
                return f"{day:%Y-%m-%d} {int(h):02d}:{int(mi):02d}"
            return f"{day:%Y-%m-%d}"
    return None


def _read_count(value: str) -> int | None:
    """The read count of a dateline.

    >>> _read_count("2023年07月04日 阅读:2,214"), _read_count("2023年07月04日")
    (2214, None)
    """
    m = _READS.search(value)
    return int(m.group(1).replace(",", "")) if m else None


def is_meta_line(line: str) -> bool:
    """Whether a line is a dateline (date, read count or a label such as 来源：) rather than body text.

    >>> is_meta_line("发布时间：2023-07-04  浏览次数：35"), is_meta_line("2023年7月4日，学校举行报告会。")
    (True, False)
    """
    # A dateline is short and not a sentence; a body paragraph opening with a date ends in "。".
    if len(line) > 120 or FULL_STOP.search(line):
        return False
    return bool(CN_DATE.search(line) or ISO_DATE.search(line) or _READS.search(line) or _META_LABEL.search(line))


def parse_credits(line: str) -> tuple[tuple[str, str], ...] | None:
    """(role, name) pairs of a credits line, or None when the line is not one.

    Items are "name/role", "role/name", "role：name" or "role name"; names may be joined with 、.

    >>> parse_credits("(王保红/摄影 孙珊/供稿)")
    (('photographer', '王保红'), ('contributor', '孙珊'))
    >>> parse_credits("（文字：张三、李四 责任编辑：南木）")
    (('writer', '张三'), ('writer', '李四'), ('editor', '南木'))
    >>> parse_credits("他强调,要坚持问题导向/目标导向。") is None
    True
    """
    line = line.strip()
    if len(line) >= 2 and line[0] in "(（" and line[-1] in ")）":
        line = line[1:-1].strip()
    elif len(line) > 80 or not re.search(r"[:：/／]", line):
        return None  # unwrapped, a credits line must at least look like "责任编辑：南木"
    items: list[tuple[str, str]] = []
    pending: list[str] = []  # names waiting for the role that follows them ("张三 李四/摄影")
    current: str | None = None  # role that later bare names inherit ("摄影：张三 李四")
    for token in re.split(r"[\s;；|]+", line):
        if not token:
            continue
        labelled = re.fullmatch(r"([^:：]+)[:：](.*)", token)
        slashed = re.fullmatch(r"([^/／]+)[/／]([^/／]+)", token)
        if labelled:
            role, names = labelled.group(1), names_in(labelled.group(2))
            if role not in _ROLES or pending or names is None:
                return None
            items += [(_ROLES[role], n) for n in names]
            current = role
        elif slashed:
            left, right = slashed.groups()
            if right in _ROLES and (names := names_in(left)):
                items += [(_ROLES[right], n) for n in pending + names]
                pending, current = [], None
            elif left in _ROLES and (names := names_in(right)) and not pending:
                items += [(_ROLES[left], n) for n in names]
                current = left
            else:
                return None
        elif token in _ROLES and len(token) > 1:  # "记者 张三"; a lone 文 or 图 is too often a word
            if pending:
                return None
            current = token
        else:
            names = names_in(token)
            if not names:
                return None
            if current is None:
                pending += names
            else:
                items += [(_ROLES[current], n) for n in names]
    if pending or not items:
        return None
    return tuple(items)


def names_in(value: str) -> list[str] | None:
    names = [n.strip() for n in re.split(r"[、,，]", value) if n.strip()]
    if any(len(n) > 20 or n in _ROLES or re.search(r"[()（）/／:：。]", n) for n in names):
        return None
    return names


@dataclass(frozen=True)
class Layout:
    title: str
    title_span: Span | None
    date: str | None
    read_count: int | None
    meta_span: Span | None
    credits: tuple[tuple[str, str], ...]
    credits_span: Span | None
    paragraphs: tuple[Span, ...]


def find_layout(
    text: str, lines: list[Span], *, title_span: Span | None = None, titled: bool = False, find_meta: bool = True
) -> Layout:
    # `titled`: the caller already has the title (front matter, JSONL field), so no line is taken for it.
    body = [s for s in lines if not _IMAGE_LINE.fullmatch(text[s.start : s.end])]
    title = text[title_span.start : title_span.end] if title_span else ""
    if not titled:
        if not body:
            raise CorpusError("no text besides image file names")
        title_span, body = body[0], body[1:]
        title = text[title_span.start : title_span.end]
    date = read_count = meta_span = None
    # The date line follows the title (a Markdown "# title" may come after other lines). Directly
    # adjacent meta lines ("发布时间：…" then "浏览次数：…") make one span; a blank or image line ends it.
    first = next((i for i, s in enumerate(body) if title_span is None or s.start >= title_span.end), len(body))
    last = first
    while find_meta and last < len(body) and is_meta_line(text[body[last].start : body[last].end]):
        gap = text[body[last - 1].end : body[last].start] if last > first else "\n"
        if gap.strip() or gap.count("\n") != 1:
            break
        last += 1
    if last > first:
        meta_span = Span(body[first].start, body[last - 1].end)
        meta_text = text[meta_span.start : meta_span.end]
        date, read_count, body = parse_date(meta_text), _read_count(meta_text), body[:first] + body[last:]
    credits: tuple[tuple[str, str], ...] = ()
    credits_span = None
    if body and (parsed := parse_credits(text[body[-1].start : body[-1].end])):
        credits, credits_span, body = parsed, body[-1], body[:-1]
    return Layout(title, title_span, date, read_count, meta_span, credits, credits_span, tuple(body))



def make_article(path: str, doc_id: str, text: str, encoding: str, layout: Layout) -> Article:
    return Article(
        doc_id=doc_id,
        path=path,
        title=layout.title,
        date=layout.date,
        read_count=layout.read_count,
        credits=layout.credits,
        text=text,
        paragraphs=layout.paragraphs,
        title_span=layout.title_span,
        meta_span=layout.meta_span,
        credits_span=layout.credits_span,
        encoding=encoding,
        content_hash=hashlib.sha256(text.encode("utf-8")).hexdigest(),
    )
