"""One corpus file to Article records, per format: a saved news page as text (.txt), Markdown, JSONL, a
saved web page (.html) and Word (.docx), all laid out by the news-layout rules of rag/layout.py (title, date and
read-count line, image lines, body paragraphs, credits line); read_file picks the format by suffix.

Longer than 400 lines (~450): five readers, each a few short functions; split further, each module would hold one
reader and import the same layout rules.
"""
from __future__ import annotations

import dataclasses
import json
import re
import unicodedata
from pathlib import PurePosixPath

from .decoding import CorpusError, decode_bytes, decode_html, normalize_newlines
from .layout import (Article, Layout, Span, find_layout, is_meta_line, lines_of, make_article, names_in,
                     parse_credits, parse_date)

_MD_IMAGE_LINE = re.compile(r"!\[[^\]]*\]\([^)]*\)")
_MD_RULE = re.compile(r"(?:-[ \t]*){3,}|(?:\*[ \t]*){3,}|(?:_[ \t]*){3,}")
_MD_HEADING = re.compile(r"(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*")


# ---------------------------------------------------------------- text, Markdown and JSONL


def parse_article(text: str, path: str, doc_id: str, encoding: str = "utf-8") -> Article:
    """One article from decoded text: the saved-news-page format (title, date/read-count line, image
    file names, paragraphs, credits line), plain text (first line is the title) or, for a .md path,
    Markdown with optional front matter. Raises CorpusError when there is no text.

    >>> page = "学校举行报告会\\n2023年07月04日19时40分 阅读:2214\\n1.jpg\\n报告会在图书馆举行。\\n(王保红/摄影 南木/编辑)\\n"
    >>> a = parse_article(page, "x.txt", "x")
    >>> a.title, a.date, a.read_count, a.credits
    ('学校举行报告会', '2023-07-04 19:40', 2214, (('photographer', '王保红'), ('editor', '南木')))
    >>> [a.text[p.start : p.end] for p in a.paragraphs]
    ['报告会在图书馆举行。']
    """
    text = normalize_newlines(text)
    if not text.strip():
        raise CorpusError("no text")
    if PurePosixPath(path).suffix.lower() == ".md":
        return make_article(path, doc_id, text, encoding, _markdown_layout(text))
    return make_article(path, doc_id, text, encoding, find_layout(text, lines_of(text)))


_FRONT_MATTER = re.compile(r"---[ \t]*\n(.*?)^(?:---|\.\.\.)[ \t]*$\n?", re.DOTALL | re.MULTILINE)
_FRONT_KEY = re.compile(r"([A-Za-z_][\w-]*)[ \t]*:[ \t]*")
# Every line of real front matter looks like YAML; "---" rules around prose are not front matter.
_YAML_LINE = re.compile(r"[A-Za-z_][\w-]*[ \t]*:|- |#")


def _markdown_layout(text: str) -> Layout:
    """The layout of a Markdown article: front-matter fields, then the news-layout rules over the body's
    lines (heading marks, image lines and rules dropped); soft-wrapped lines join into one paragraph."""
    front, body_start = _front_matter(text)
    lines, headings = _markdown_lines(text, body_start)
    title_span = front.get("title_span")
    if title_span is None:
        title_span = next((s for s in lines if headings.get(s) == 1), None)
        if title_span is not None:
            lines.remove(title_span)
    elif lines and lines[0] in headings and text[lines[0].start : lines[0].end] == front["title"]:
        lines = lines[1:]  # the body repeats the front-matter title as its heading
    if title_span is None and not lines:
        raise CorpusError("no text")
    layout = find_layout(text, lines, title_span=title_span, titled=title_span is not None, find_meta="date" not in front)
    if layout.credits_span is not None:  # a credits line in the body says more than an author field
        front.pop("credits", None)
        front.pop("credits_span", None)
    return dataclasses.replace(layout, paragraphs=_join_soft_wraps(text, layout.paragraphs, headings), **front)


def _front_matter(text: str) -> tuple[dict[str, object], int]:
    """The Layout fields a Markdown file's front matter gives, and where its body starts (0 without one).

    >>> _front_matter("---\\ntitle: '学校新闻'\\nviews: 12\\n---\\n正文\\n")
    ({'title': '学校新闻', 'title_span': Span(start=12, end=16), 'read_count': 12}, 32)
    """
    front: dict[str, object] = {}
    fm = _FRONT_MATTER.match(text)
    if not fm or not all(_YAML_LINE.match(text, s.start, s.end) for s in lines_of(text, fm.start(1), fm.end(1))):
        return front, 0
    for line in lines_of(text, fm.start(1), fm.end(1)):
        key = _FRONT_KEY.match(text, line.start, line.end)
        if not key:
            continue
        value = _unquote(text, Span(key.end(), line.end))
        raw = text[value.start : value.end]
        name = key.group(1).lower()
        if name == "title" and raw:
            front.update(title=raw, title_span=value)
        elif name == "date" and parse_date(raw):
            front.update(date=parse_date(raw), meta_span=line)
        elif name in ("read_count", "reads", "views") and raw.isdigit():
            front.update(read_count=int(raw))
        elif name in ("author", "authors") and (names := names_in(raw.strip("[]"))):
            front.update(credits=tuple(("writer", n) for n in names), credits_span=value)
    return front, fm.end()


def _markdown_lines(text: str, start: int) -> tuple[list[Span], dict[Span, int]]:
    """The spans of the body's lines from `start` without image lines, rules and heading marks, and the
    level of each heading among them.

    >>> _markdown_lines("# 标题\\n![图](a.jpg)\\n---\\n正文\\n", 0)
    ([Span(start=2, end=4), Span(start=21, end=23)], {Span(start=2, end=4): 1})
    """
    lines: list[Span] = []
    headings: dict[Span, int] = {}
    for s in lines_of(text, start):
        line = text[s.start : s.end]
        if _MD_IMAGE_LINE.fullmatch(line) or _MD_RULE.fullmatch(line):
            continue
        h = _MD_HEADING.fullmatch(line)
        if h:
            heading = h.group(2) or ""
            if not heading.strip():
                continue  # a bare "#"
            left = s.start + h.start(2) + len(heading) - len(heading.lstrip())
            s = Span(left, left + len(heading.strip()))
            headings[s] = len(h.group(1))
        lines.append(s)
    return lines, headings


def _join_soft_wraps(text: str, paragraphs: tuple[Span, ...], headings: dict[Span, int]) -> tuple[Span, ...]:
    """Soft-wrapped lines (no blank line between) as one paragraph; headings stay on their own.

    >>> _join_soft_wraps("一行\\n接着\\n\\n另一段", (Span(0, 2), Span(3, 5), Span(7, 10)), {})
    (Span(start=0, end=5), Span(start=7, end=10))
    """
    joined: list[Span] = []
    for s in paragraphs:
        prev = joined[-1] if joined else None
        if prev and prev not in headings and s not in headings and text.count("\n", prev.end, s.start) == 1:
            joined[-1] = Span(prev.start, s.end)
        else:
            joined.append(s)
    return tuple(joined)


def _unquote(text: str, span: Span) -> Span:
    """The span of a front-matter value without surrounding quotes.

    >>> _unquote('title: "学校新闻"', Span(7, 13))
    Span(start=8, end=12)
    """
    value = text[span.start : span.end].strip()
    start = span.start + text[span.start : span.end].find(value) if value else span.start
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return Span(start + 1, start + len(value) - 1)
    return Span(start, start + len(value))


def _jsonl_articles(text: str, path: str, encoding: str) -> tuple[list[Article], list[str]]:
    """The articles of a JSONL file, one per line, and why each bad line was left out ("line 3: …")."""
    stem = PurePosixPath(path).with_suffix("").as_posix()
    articles: list[Article] = []
    problems: list[str] = []
    ids: set[str] = set()
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            article = _record_article(json.loads(line), stem, path, encoding)
        except json.JSONDecodeError as e:
            problems.append(f"line {lineno}: invalid JSON ({e.msg} at column {e.colno})")
            continue
        except CorpusError as e:
            problems.append(f"line {lineno}: {e}")
            continue
        if article.doc_id in ids:
            problems.append(f"line {lineno}: id {article.doc_id[len(stem) + 1 :]} repeats an earlier line")
            continue
        ids.add(article.doc_id)
        articles.append(article)
    return articles, problems


def _record_article(record: object, stem: str, path: str, encoding: str) -> Article:
    if not isinstance(record, dict):
        raise CorpusError("not a JSON object")
    rid = record.get("id")
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or not str(rid).strip():
        raise CorpusError("'id' must be a non-empty string or integer")
    body = record.get("text")
    if not isinstance(body, str) or not body.strip():
        raise CorpusError("'text' must be a non-empty string")
    for key in ("title", "date", "url"):
        if record.get(key) is not None and not isinstance(record[key], str):
            raise CorpusError(f"'{key}' must be a string")
    body = normalize_newlines(body)
    title = (record.get("title") or "").strip()
    # The record's own fields are the metadata; its text is body only (images and credits still dropped).
    layout = find_layout(body, lines_of(body), titled=bool(title), find_meta=False)
    reads = record.get("read_count")
    layout = dataclasses.replace(
        layout,
        title=title or layout.title,
        date=parse_date(record.get("date") or ""),
        read_count=reads if isinstance(reads, int) and not isinstance(reads, bool) and reads >= 0 else None,
    )
    return make_article(path, f"{stem}#{str(rid).strip()}", body, encoding, layout)


# ---------------------------------------------------------------- saved web pages and Word files

_HTML_TAG = re.compile(r"<(?:!doctype\s+html|html|head|body|title|meta|div|p|h[1-6]|article|main|table|br)\b", re.I)
_BLOCK_TAGS = {
    "address", "article", "aside", "blockquote", "body", "caption", "dd", "details", "dialog", "div", "dl",
    "dt", "fieldset", "figcaption", "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6", "header",
    "hr", "li", "main", "nav", "ol", "p", "pre", "section", "summary", "table", "td", "th", "tr", "ul",
}  # fmt: skip
# A .docx that unpacks to more than this is a ZIP bomb or not a news article.
_MAX_DOCX_UNPACKED = 200_000_000
_UNSEEN_TAGS = ("script", "style", "noscript", "template", "head", "select", "option", "button", "svg")
# "标题-学校新闻网", "标题 | 新闻网"; a hyphen between digits is a range ("2023-2024学年"), not a separator.
_TITLE_SEPARATOR = re.compile(r"\s*(?:(?<!\d)-(?!\d)|[_|–—]|::)\s*")
_PUBLISHED_META = (  # machine-readable publication dates, used only when the page shows no date line
    "article:published_time", "og:published_time", "publishdate", "pubdate", "publish_date", "date", "dc.date",
    "dcterms.created", "dc.date.issued",
)  # fmt: skip



def _squeeze(value: str) -> str:
    """Collapse runs of HTML whitespace as a browser shows them; no-break and ideographic spaces are
    content (the seed's date line is "…40分\\xa0\\xa0\\xa0\\xa0阅读:2214") and stay.

    >>> _squeeze(" 2023年07月04日\\n  19时40分\\xa0\\xa0阅读: 2214 ")
    '2023年07月04日 19时40分\\xa0\\xa0阅读: 2214'
    """
    return re.sub(r"[ \t\n\r\f]+", " ", value).strip(" ")


def _same(a: str, b: str) -> bool:
    # trafilatura collapses every kind of whitespace and NFC-normalises; compare lines the same way.
    return unicodedata.normalize("NFC", a).split() == unicodedata.normalize("NFC", b).split()


def _page_lines(tree) -> list[str]:
    """The visible text of a parsed page, one line per block element, in document order (tree unchanged)."""
    import copy

    from lxml import etree

    tree = copy.deepcopy(tree)
    etree.strip_elements(tree, *_UNSEEN_TAGS, with_tail=False)
    for element in tree.iter():
        if not isinstance(element.tag, str):
            continue  # comments and processing instructions
        if element.tag in _BLOCK_TAGS:
            element.text = "\n" + (element.text or "")
            element.tail = "\n" + (element.tail or "")
        elif element.tag == "br":
            element.tail = "\n" + (element.tail or "")
    lines = (_squeeze(line) for line in etree.tostring(tree, method="text", encoding="unicode").split("\n"))
    return [line for line in lines if line.strip()]


def _page_title(tree) -> str:
    """The article's headline: the longest <h1>/<h2> that the <title> repeats ("标题-网站名"), else
    og:title, else the first <h1>, else the longest part of <title>; "" when the page has none."""
    head_title = _squeeze(tree.findtext(".//title") or "")
    headings = {level: [_squeeze(h.text_content()) for h in tree.iter(level)] for level in ("h1", "h2")}
    # Longest, because a sidebar's "<h2>学校要闻</h2>" is often in the <title> too ("标题-学校要闻-某大学").
    repeated = [h for h in headings["h1"] + headings["h2"] if len(h) >= 2 and h in head_title]
    if repeated:
        return max(repeated, key=len)
    for meta in tree.iter("meta"):
        if meta.get("property", meta.get("name", "")).lower() == "og:title" and meta.get("content", "").strip():
            return _squeeze(meta.get("content"))
    if heading := next((h for h in headings["h1"] if h), ""):
        return heading
    return max(_TITLE_SEPARATOR.split(head_title), key=len, default="")


def _published(tree) -> str | None:
    for meta in tree.iter("meta"):
        key = (meta.get("property") or meta.get("name") or meta.get("itemprop") or "").lower()
        if key in _PUBLISHED_META and (date := parse_date(meta.get("content") or "")):
            return date
    for time in tree.iter("time"):
        if date := parse_date(time.get("datetime") or ""):
            return date
    return None


def _index(lines: list[str], wanted: str) -> int | None:
    return next((i for i, line in enumerate(lines) if _same(line, wanted)), None)


def parse_html(html: str, path: str, doc_id: str, encoding: str = "utf-8") -> Article:
    """One article from a decoded saved news page. trafilatura (Barbaresi 2021, ACL demo) finds the body
    and leaves out navigation, sidebars, footers, scripts and styles; the headline, the date/read-count
    line and a credits line next to the body are taken from the page when trafilatura left them out.
    Article.text is this extracted text, never markup: the title line, the meta lines, the body
    paragraphs and the credits line, one per line, laid out by the same rules as a .txt article.
    Raises CorpusError when the file is not HTML or has no article text."""
    import copy

    import trafilatura
    from lxml import etree

    if not _HTML_TAG.search(html):
        raise CorpusError("not an HTML page (no HTML tags)")
    try:
        # trafilatura refuses a lone fragment ("<p>…</p>"); a page body is what a fragment means.
        tree = trafilatura.load_html(html)
        if tree is None:
            tree = trafilatura.load_html(f"<html><body>{html}</body></html>")
        body = None
        if tree is not None:
            body = trafilatura.extract(
                copy.deepcopy(tree), include_comments=False, include_tables=True, include_images=False,
                include_links=False, include_formatting=False, with_metadata=False, deduplicate=False,
                favor_precision=True,
            )  # fmt: skip
    except (ValueError, TypeError, RecursionError, etree.LxmlError) as e:
        # trafilatura is a set of heuristics over arbitrary markup: one page it trips on is skipped.
        raise CorpusError(f"unparseable HTML ({type(e).__name__}: {e})".replace("\n", " ")) from None
    if tree is None:
        raise CorpusError("unparseable HTML (no document tree)")
    body_lines = [line.strip() for line in normalize_newlines(body or "").split("\n") if line.strip()]
    title = _page_title(tree)
    if title and body_lines and _same(body_lines[0], title):
        body_lines = body_lines[1:]
    if not body_lines:
        raise CorpusError("no article text found in the page")
    published = _published(tree)
    page = _page_lines(tree)
    meta = _meta_lines(page, title, body_lines[0]) if title and not is_meta_line(body_lines[0]) else []
    credits = [] if parse_credits(body_lines[-1]) else _credits_line(page, body_lines[-1])
    # Without a headline, the first body line is the title, as in a .txt file.
    text = "\n".join([*([title] if title else []), *meta, *body_lines, *credits]) + "\n"
    article = parse_article(text, path, doc_id, encoding)
    if article.date is None and published:
        article = dataclasses.replace(article, date=published)
    return article


def _meta_lines(page: list[str], title: str, first: str) -> list[str]:
    """The date/read-count lines between the headline and the body's first line in the page's lines;
    trafilatura often leaves them out, as they sit outside the element that holds the body.

    >>> _meta_lines(["首页", "标题", "2023年07月04日 阅读:5", "分享", "正文。"], "标题", "正文。")
    ['2023年07月04日 阅读:5']
    """
    at_body = _index(page, first)
    # The headline nearest above the body: a sidebar may list the same title further up.
    above = [i for i in range(len(page) if at_body is None else at_body) if _same(page[i], title)]
    if not above:
        return []
    stop = above[-1] + 4 if at_body is None else min(at_body, above[-1] + 6)
    return [line for line in page[above[-1] + 1 : stop] if is_meta_line(line)]


def _credits_line(page: list[str], last: str) -> list[str]:
    """The credits line ("责任编辑：南木") within two lines after the body's last line, as a list of 0 or 1.

    >>> _credits_line(["正文。", "责任编辑：南木", "上一篇：别的新闻"], "正文。")
    ['责任编辑：南木']
    """
    at = [i for i, line in enumerate(page) if _same(line, last)]
    if not at:
        return []
    return [line for line in page[at[-1] + 1 : at[-1] + 3] if parse_credits(line)][:1]


def parse_docx(data: bytes, path: str, doc_id: str) -> Article:
    """One article from a Word .docx file: the body's paragraphs (and table rows) in order, one per line,
    laid out like a .txt article. Page headers and footers are left out. Raises CorpusError when the
    file is empty, not a .docx or has no text."""
    import io
    import zipfile
    import zlib

    if not data:
        raise CorpusError("empty file")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as package:
            names = set(package.namelist())
            unpacked = sum(info.file_size for info in package.infolist())
            broken = package.testzip() if unpacked <= _MAX_DOCX_UNPACKED else None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, OSError) as e:
        raise CorpusError(f"not a readable .docx (bad ZIP archive: {e})") from None
    if "[Content_Types].xml" not in names or "word/document.xml" not in names:
        raise CorpusError("not a .docx (a ZIP archive without word/document.xml)")
    if unpacked > _MAX_DOCX_UNPACKED:
        raise CorpusError(f"too large: {unpacked} bytes unpacked (a .docx may unpack to {_MAX_DOCX_UNPACKED})")
    if broken is not None:
        raise CorpusError(f"corrupt .docx ({broken} fails its checksum)")

    import docx
    from docx.opc.exceptions import OpcError
    from docx.table import Table
    from lxml import etree

    stream = io.BytesIO(data)
    try:
        document = docx.Document(stream)
        lines: list[str] = []
        for block in document.iter_inner_content():
            if isinstance(block, Table):
                for row in block.rows:
                    cells = [c.text.strip() for c in row.cells]
                    # A merged cell comes back once per grid column it spans.
                    lines.append("\t".join(c for i, c in enumerate(cells) if c and c not in cells[:i]))
            else:
                lines.append(block.text)
    except (OpcError, KeyError, ValueError, zipfile.BadZipFile, zlib.error, etree.LxmlError) as e:
        message = str(e).replace(f"file '{stream!r}'", "the file").replace("\n", " ")  # python-docx names the stream
        raise CorpusError(f"corrupt .docx ({type(e).__name__}: {message})") from None
    text = "\n".join(lines)
    if not text.strip():
        raise CorpusError("no text in the document")
    return parse_article(text, path, doc_id, "utf-8")


# ---------------------------------------------------------------- one file, by its suffix

SUFFIXES = (".txt", ".md", ".jsonl", ".html", ".htm", ".docx")  # the formats read_file knows
_HTML_SUFFIXES = (".html", ".htm")


def read_file(data: bytes, path: str) -> tuple[list[Article], list[str]]:
    """The articles in one corpus file's bytes, read by the format its suffix names, and why each bad JSONL
    line was left out. `path` is relative to the corpus folder, posix; an article's doc_id is it without
    the suffix. Raises CorpusError when the file as a whole cannot be used.

    >>> articles, problems = read_file('{"id": 1, "text": "正文。"}\\n[1]\\n'.encode(), "news.jsonl")
    >>> [a.doc_id for a in articles], problems
    (['news#1'], ['line 2: not a JSON object'])
    """
    suffix, doc_id = PurePosixPath(path).suffix.lower(), PurePosixPath(path).with_suffix("").as_posix()
    if suffix == ".docx":
        return [parse_docx(data, path, doc_id)], []
    if suffix in _HTML_SUFFIXES:
        html, encoding = decode_html(data)
        return [parse_html(html, path, doc_id, encoding)], []
    text, encoding = decode_bytes(data)
    if suffix == ".jsonl":
        return _jsonl_articles(text, path, encoding)
    return [parse_article(text, path, doc_id, encoding)], []
