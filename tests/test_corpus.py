"""Tests for rag.corpus: corpus files to Article records, encodings, skipped files and offsets."""
from __future__ import annotations

import doctest
import io
import json
import random
import shutil
import socket
import zipfile
from pathlib import Path

import pytest

import rag.corpus
import rag.decoding
import rag.layout
import rag.readers
from rag.config import Config
from rag.corpus import Article, CorpusError, Skipped, Span, load_corpus
from rag.decoding import decode_bytes, decode_html, read_text
from rag.errors import RagError
from rag.readers import parse_article, parse_html

DATA = Path(__file__).parent / "data"
SEED = DATA / "seed" / "000_3ab29ec542edc89a.txt"
SEED_ID = "000_3ab29ec542edc89a"
TRADITIONAL = DATA / "traditional" / "seed_zh_hant.txt"  # hand-converted, stored as UTF-8
SAMPLES = DATA / "samples"
NEWS_PAGE = SAMPLES / "news_page.html"  # the seed article as its university's news site serves it

SEED_TITLE = "学校举行高质量发展中层干部学习研讨班系列专题报告会"
SEED_META = "2023年07月04日19时40分\xa0\xa0\xa0\xa0阅读:2214"
SEED_CREDITS_LINE = "(王保红/摄影 孙珊/供稿 陈清森/审核 南木/编辑)"
SEED_CREDITS = (("photographer", "王保红"), ("contributor", "孙珊"), ("reviewer", "陈清森"), ("editor", "南木"))
SPEAKERS = ("7月4日", "李俊峰", "张根华", "王任", "王继元", "张振宇")


def cut(article: Article, span: Span | None) -> str | None:
    return None if span is None else article.text[span.start : span.end]


def body_lines(text: str) -> list[str]:
    """What the paragraphs of a saved news page must be, worked out independently of the parser:
    its non-empty lines less the title, the date line, the image file names and the credits line."""
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    return [line for line in lines[2:-1] if not line.lower().endswith(".jpg")]


def assert_spans_sound(article: Article) -> None:
    text = article.text
    assert "\r" not in text and not text.startswith("\ufeff")
    spans = [s for s in (article.title_span, article.meta_span, article.credits_span) if s is not None]
    for s in [*spans, *article.paragraphs]:
        assert 0 <= s.start < s.end <= len(text)
        piece = text[s.start : s.end]
        assert piece == piece.strip() and "\n\n" not in piece
    ordered = sorted([*spans, *article.paragraphs], key=lambda s: s.start)
    for a, b in zip(ordered, ordered[1:]):
        assert a.end <= b.start, "spans overlap"
    if article.title_span is not None:
        assert cut(article, article.title_span) == article.title


def write(folder: Path, name: str, data: bytes | str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


@pytest.fixture(scope="module")
def seed() -> Article:
    articles, skipped = load_corpus(SEED.parent, Config())
    assert skipped == []
    assert len(articles) == 1
    return articles[0]


# ---------------------------------------------------------------- the seed article


def test_seed_metadata(seed: Article) -> None:
    assert seed.doc_id == SEED_ID
    assert seed.path == SEED_ID + ".txt"
    assert seed.title == SEED_TITLE
    assert seed.date == "2023-07-04 19:40"
    assert seed.read_count == 2214
    assert seed.credits == SEED_CREDITS
    assert seed.encoding == "utf-8"
    assert seed.text == SEED.read_text(encoding="utf-8")
    assert len(seed.content_hash) == 64 and int(seed.content_hash, 16) >= 0


def test_seed_spans_point_at_the_right_text(seed: Article) -> None:
    assert cut(seed, seed.title_span) == SEED_TITLE
    assert seed.title_span == Span(0, len(SEED_TITLE))
    assert cut(seed, seed.meta_span) == SEED_META
    assert cut(seed, seed.credits_span) == SEED_CREDITS_LINE
    assert_spans_sound(seed)


def test_seed_paragraphs(seed: Article) -> None:
    paragraphs = [cut(seed, p) for p in seed.paragraphs]
    assert len(paragraphs) == 6
    assert paragraphs == body_lines(seed.text)
    for paragraph, speaker in zip(paragraphs, SPEAKERS):
        assert paragraph.startswith(speaker)
        assert ".jpg" not in paragraph and "摄影" not in paragraph and "阅读:" not in paragraph
    assert paragraphs[0].endswith("李俊峰主持会议。")
    assert paragraphs[-1].endswith("在反思改进中推进改革发展。")


def test_seed_to_json_has_text_and_offsets(seed: Article) -> None:
    data = json.loads(json.dumps(seed.to_json(), ensure_ascii=False))
    assert data["text"] == seed.text
    assert data["doc_id"] == SEED_ID and data["date"] == "2023-07-04 19:40" and data["read_count"] == 2214
    assert data["credits"][0] == {"role": "photographer", "name": "王保红"}
    assert [(c["role"], c["name"]) for c in data["credits"]] == list(SEED_CREDITS)
    start, end = data["title_span"]
    assert data["text"][start:end] == data["title"] == SEED_TITLE
    start, end = data["meta_span"]
    assert data["text"][start:end] == SEED_META
    start, end = data["credits_span"]
    assert data["text"][start:end] == SEED_CREDITS_LINE
    assert [data["text"][s:e] for s, e in data["paragraphs"]] == body_lines(seed.text)
    assert data["encoding"] == "utf-8" and data["content_hash"] == seed.content_hash


# ---------------------------------------------------------------- encodings


def with_bom(bom: bytes, codec: str):
    return lambda text: bom + text.encode(codec)


ENCODED = {
    "utf-8-sig+crlf": (lambda t: t.replace("\n", "\r\n").encode("utf-8-sig"), "utf-8-sig"),
    "gb18030": (lambda t: t.encode("gb18030"), "gb18030"),
    "gb18030+crlf": (lambda t: t.replace("\n", "\r\n").encode("gb18030"), "gb18030"),
    "utf-16-le-bom": (with_bom(b"\xff\xfe", "utf-16-le"), "utf-16"),
    "utf-16-be-bom+crlf": (lambda t: b"\xfe\xff" + t.replace("\n", "\r\n").encode("utf-16-be"), "utf-16"),
    "utf-8+cr": (lambda t: t.replace("\n", "\r").encode("utf-8"), "utf-8"),
}


@pytest.mark.parametrize("variant", ENCODED)
def test_seed_in_other_encodings_parses_the_same(variant: str, seed: Article, tmp_path: Path) -> None:
    encode, expected_encoding = ENCODED[variant]
    path = write(tmp_path, SEED_ID + ".txt", encode(seed.text))
    text, encoding = read_text(path)
    assert encoding == expected_encoding
    assert text == seed.text  # exact round trip: BOM gone, CRLF/CR now LF
    articles, skipped = load_corpus(tmp_path, Config())
    assert skipped == []
    (article,) = articles
    assert article.encoding == expected_encoding
    assert {**article.to_json(), "encoding": "utf-8"} == seed.to_json()


def test_traditional_article_in_big5(seed: Article, tmp_path: Path) -> None:
    source = TRADITIONAL.read_text(encoding="utf-8")
    write(tmp_path, "zh_hant.txt", source.replace("\n", "\r\n").encode("big5"))
    articles, skipped = load_corpus(tmp_path, Config())
    assert skipped == []
    (article,) = articles
    assert article.encoding == "big5"
    assert article.text == source
    assert article.doc_id == "zh_hant"
    assert article.title == "學校舉行高質量發展中層幹部學習研討班系列專題報告會"
    assert article.date == seed.date and article.read_count == seed.read_count
    assert article.credits == (("photographer", "王保紅"), ("contributor", "孫珊"), ("reviewer", "陳清森"), ("editor", "南木"))
    assert [role for role, _ in article.credits] == [role for role, _ in seed.credits]
    assert cut(article, article.meta_span) == "2023年07月04日19時40分\u3000\u3000閱讀:2214"
    assert cut(article, article.credits_span) == "(王保紅/攝影 孫珊/供稿 陳清森/審核 南木/編輯)"
    paragraphs = [cut(article, p) for p in article.paragraphs]
    assert paragraphs == body_lines(source)
    assert len(paragraphs) == len(seed.paragraphs) == 6
    assert paragraphs[0].startswith("7月4日,學校在慎行樓樂之廳")
    assert all(p.startswith(s) for p, s in zip(paragraphs[1:], ("李俊峰", "張根華", "王任", "王繼元", "張振宇")))
    assert_spans_sound(article)


@pytest.mark.parametrize(
    "text, encoding",
    [
        ("学校\n", "gb18030"),  # D1A7 D0A3 is also valid UTF-8 ("ѧУ")
        ("什么\n", "gb18030"),  # C9CA C3B4 is also valid UTF-8 ("Ɋô")
        ("学校举行报告会\n", "gb18030"),
        ("學校舉行報告會\n", "big5"),
        ("學習\n", "big5"),
        ("發展中層幹部\n", "big5"),
        ("学校举行报告会\n", "utf-8"),
        ("Café au lait\n", "utf-8"),
        ("Temperature 20°C\n", "utf-8"),
        ("plain ascii\n", "utf-8"),
    ],
)
def test_short_texts_are_not_mislabelled(text: str, encoding: str) -> None:
    assert decode_bytes(text.encode(encoding)) == (text, encoding)


def test_gb18030_article_round_trips_through_decode_bytes(seed: Article) -> None:
    assert decode_bytes(seed.text.encode("gb18030")) == (seed.text, "gb18030")
    assert decode_bytes(seed.text.encode("utf-8-sig")) == (seed.text, "utf-8-sig")


def test_decode_bytes_refuses_bad_input() -> None:
    with pytest.raises(CorpusError, match="empty"):
        decode_bytes(b"")
    with pytest.raises(CorpusError, match="empty"):
        decode_bytes(b"\xef\xbb\xbf \r\n\t")
    with pytest.raises(CorpusError, match="binary"):
        decode_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(CorpusError, match="undecodable"):
        decode_bytes(bytes(range(0x80, 0x100)) * 4)
    with pytest.raises(CorpusError, match="undecodable"):
        decode_bytes(b"\xff\xfe\x41")  # UTF-16 BOM and then half a code unit


def test_read_text_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="missing.txt"):
        read_text(tmp_path / "missing.txt")
    path = write(tmp_path, "bin.txt", b"abc\x00def")
    with pytest.raises(CorpusError, match=r"bin\.txt: binary"):
        read_text(path)


# ---------------------------------------------------------------- other formats


def test_plain_text_without_page_furniture() -> None:
    text = "学校新闻\n第一段,介绍会议。\n\n  第二段,总结发言。  \n"
    article = parse_article(text, "plain.txt", "plain")
    assert article.title == "学校新闻"
    assert article.date is None and article.read_count is None and article.meta_span is None
    assert article.credits == () and article.credits_span is None
    assert [cut(article, p) for p in article.paragraphs] == ["第一段,介绍会议。", "第二段,总结发言。"]
    assert article.encoding == "utf-8"
    assert_spans_sound(article)


def test_parse_article_normalizes_newlines_and_bom() -> None:
    article = parse_article("\ufeff标题\r\n正文一。\r正文二。\r\n", "x.txt", "x", "gb18030")
    assert article.text == "标题\n正文一。\n正文二。\n"
    assert article.encoding == "gb18030"
    assert [cut(article, p) for p in article.paragraphs] == ["正文一。", "正文二。"]
    with pytest.raises(CorpusError):
        parse_article(" \n\n", "x.txt", "x")


def test_image_lines_are_dropped_in_any_case() -> None:
    article = parse_article("标题\nIMG_0001.JPG\n正文。\nphoto-2.webp\n结尾。\n", "x.txt", "x")
    assert [cut(article, p) for p in article.paragraphs] == ["正文。", "结尾。"]


@pytest.mark.parametrize(
    "meta, date, reads",
    [
        ("发布时间：2023-07-04 19:40\u3000来源：宣传部\u3000浏览次数：1,024", "2023-07-04 19:40", 1024),
        ("2023年7月4日", "2023-07-04", None),
        ("来源：宣传部  阅读：35", None, 35),
        ("2023/07/04", "2023-07-04", None),
    ],
)
def test_meta_line_variants(meta: str, date: str | None, reads: int | None) -> None:
    article = parse_article(f"学校新闻\n{meta}\n正文。\n", "x.txt", "x")
    assert (article.date, article.read_count) == (date, reads)
    assert cut(article, article.meta_span) == meta
    assert [cut(article, p) for p in article.paragraphs] == ["正文。"]


def test_adjacent_meta_lines_make_one_span() -> None:
    article = parse_article("学校新闻\n发布时间：2023-07-04\n浏览次数：88\n\n正文。\n", "x.txt", "x")
    assert (article.date, article.read_count) == ("2023-07-04", 88)
    assert cut(article, article.meta_span) == "发布时间：2023-07-04\n浏览次数：88"
    assert [cut(article, p) for p in article.paragraphs] == ["正文。"]


def test_a_paragraph_that_opens_with_a_date_is_not_the_meta_line() -> None:
    article = parse_article("学校新闻\n2023年7月4日,学校举行会议。\n", "x.txt", "x")
    assert article.date is None and article.meta_span is None
    assert [cut(article, p) for p in article.paragraphs] == ["2023年7月4日,学校举行会议。"]


@pytest.mark.parametrize(
    "line, credits",
    [
        ("（文字：张三 摄影：李四 责任编辑：王五）", (("writer", "张三"), ("photographer", "李四"), ("editor", "王五"))),
        ("(张三、李四/摄影 南木/编辑)", (("photographer", "张三"), ("photographer", "李四"), ("editor", "南木"))),
        ("（通讯员 赵六 记者 钱七）", (("correspondent", "赵六"), ("reporter", "钱七"))),
        ("(撰稿/孙珊 作者：周八)", (("writer", "孙珊"), ("writer", "周八"))),
        ("责任编辑：南木", (("editor", "南木"),)),
        ("(會議由李俊峰主持)", ()),
        ("(李俊峰主持会议)", ()),
        ("图 为 会议 现场", ()),
    ],
)
def test_credits_line_forms(line: str, credits: tuple) -> None:
    article = parse_article(f"标题\n正文。\n{line}\n", "x.txt", "x")
    assert article.credits == credits
    if credits:
        assert cut(article, article.credits_span) == line
        assert [cut(article, p) for p in article.paragraphs] == ["正文。"]
    else:
        assert article.credits_span is None
        assert [cut(article, p) for p in article.paragraphs] == ["正文。", line]


def test_markdown_with_front_matter() -> None:
    path = SAMPLES / "reading-day.md"
    article = parse_article(path.read_text(encoding="utf-8"), "reading-day.md", "reading-day")
    assert article.title == "图书馆开展“世界读书日”主题活动"
    assert cut(article, article.title_span) == article.title
    assert article.text.startswith("---\ntitle: \"")  # the front matter stays in the text
    assert article.date == "2023-04-23 10:00"
    assert cut(article, article.meta_span) == "date: 2023-04-23 10:00"
    # The body's credits line wins over the front matter's author.
    assert article.credits == (("photographer", "张华"), ("contributor", "李明"), ("editor", "南木"))
    assert cut(article, article.credits_span) == "(张华/摄影 李明/供稿 南木/编辑)"
    assert [cut(article, p) for p in article.paragraphs] == [
        "4月23日,图书馆在馆前广场举办“世界读书日”主题活动,师生代表三百余人参加。",
        "好书推荐",
        "活动现场展出新书两百余种,\n馆员为同学们逐一介绍推荐理由。",
    ]
    assert_spans_sound(article)


def test_markdown_heading_as_title_and_author_credit() -> None:
    text = "---\nauthor: 李明\n---\n\n# 校园简讯\n\n正文第一段。\n\n### 小标题 ###\n正文第二段。\n"
    article = parse_article(text, "brief.md", "brief")
    assert article.title == "校园简讯" and cut(article, article.title_span) == "校园简讯"
    assert article.credits == (("writer", "李明"),) and cut(article, article.credits_span) == "李明"
    assert article.date is None
    assert [cut(article, p) for p in article.paragraphs] == ["正文第一段。", "小标题", "正文第二段。"]
    assert_spans_sound(article)


def test_markdown_without_front_matter_or_heading_is_plain_text() -> None:
    article = parse_article("校园简讯\n\n正文。\n", "brief.md", "brief")
    assert article.title == "校园简讯" and [cut(article, p) for p in article.paragraphs] == ["正文。"]


def test_markdown_rules_around_prose_are_not_front_matter() -> None:
    article = parse_article("---\n校园简讯\n---\n\n正文。\n#\n", "brief.md", "brief")
    assert article.title == "校园简讯"
    assert [cut(article, p) for p in article.paragraphs] == ["正文。"]
    assert_spans_sound(article)


def test_jsonl_two_articles() -> None:
    articles, skipped = load_corpus(SAMPLES, Config())
    assert skipped == []
    assert [a.doc_id for a in articles] == ["news#a1", "news#2", "news_page", "reading-day"]
    first, second = articles[0], articles[1]
    assert first.path == second.path == "news.jsonl"
    assert first.title == "学校召开2023年招生工作会议" and first.title_span is None
    assert first.date == "2023-06-01 09:30" and first.read_count is None and first.meta_span is None
    assert first.text.startswith("6月1日,学校召开")
    assert [cut(first, p) for p in first.paragraphs] == [
        "6月1日,学校召开2023年招生工作会议。",
        "会议总结了去年的招生工作,部署了今年的重点任务。",
    ]
    assert first.credits == (("contributor", "孙珊"), ("editor", "南木"))
    assert second.title == "计算机学院举办人工智能专题讲座"
    assert second.date == "2023-06-02"
    assert second.text == "6月2日下午,计算机学院举办人工智能专题讲座。\n讲座吸引了两百余名师生参加。"
    assert [cut(second, p) for p in second.paragraphs] == second.text.split("\n")
    for article in articles:
        assert_spans_sound(article)
    assert json.loads(json.dumps(first.to_json()))["paragraphs"] == [[p.start, p.end] for p in first.paragraphs]


# ---------------------------------------------------------------- saved web pages and Word files

# Text of the page around the article: navigation, search box, sidebar, breadcrumb, share and
# previous/next links, footer, and what scripts and style sheets hold. None of it may be indexed.
PAGE_FURNITURE = (
    "首页", "学校主页", "请输入关键字", "搜索", "学校召开2023年暑期工作会议", "当前位置", "正文\n", "分享到",
    "上一篇", "下一篇", "版权所有", "ICP", "公网安备", "xcb@cslg.edu.cn", "联系我们", "0512-52251012",
    "脚本里的提示文字", "页面底部的脚本输出", "样式表里的文字", "font-family", "_hmt", "_showDynClicks",
    "常熟理工学院新闻网", "<", ">", "&nbsp;", ".jpg",
)  # fmt: skip


def seed_page_text(seed: Article) -> str:
    """What the saved page must become: the seed article's own lines, image names left out."""
    return "\n".join([SEED_TITLE, SEED_META, *body_lines(seed.text), SEED_CREDITS_LINE]) + "\n"


def test_saved_news_page(seed: Article, tmp_path: Path) -> None:
    shutil.copy(NEWS_PAGE, tmp_path / NEWS_PAGE.name)
    articles, skipped = load_corpus(tmp_path, Config())
    assert skipped == []
    (page,) = articles
    assert (page.doc_id, page.path, page.encoding) == ("news_page", "news_page.html", "utf-8")
    assert page.title == SEED_TITLE
    assert (page.date, page.read_count) == ("2023-07-04 19:40", 2214)
    assert page.credits == SEED_CREDITS
    # Article.text is the extracted article, one line per block; the date line keeps its no-break spaces.
    assert page.text == seed_page_text(seed)
    assert cut(page, page.title_span) == SEED_TITLE
    assert cut(page, page.meta_span) == SEED_META
    assert cut(page, page.credits_span) == SEED_CREDITS_LINE
    paragraphs = [cut(page, p) for p in page.paragraphs]
    assert paragraphs == [cut(seed, p) for p in seed.paragraphs]
    assert [p[: len(s)] for p, s in zip(paragraphs, SPEAKERS)] == list(SPEAKERS)
    for furniture in PAGE_FURNITURE:
        assert furniture not in page.text, furniture
    assert_spans_sound(page)


@pytest.mark.parametrize("label", ["gbk", "GB2312", "gb18030"])
def test_saved_news_page_in_gbk(seed: Article, tmp_path: Path, label: str) -> None:
    html = NEWS_PAGE.read_text(encoding="utf-8").replace('<meta charset="utf-8">', f'<meta charset="{label}">')
    assert f'<meta charset="{label}">' in html
    write(tmp_path, "news_page.htm", html.encode("gbk"))
    articles, skipped = load_corpus(tmp_path, Config())
    assert skipped == []
    (page,) = articles
    assert page.encoding == "gb18030"  # the WHATWG decoder for every GB label
    assert page.text == seed_page_text(seed)
    assert (page.title, page.date, page.read_count, page.credits) == (
        SEED_TITLE, "2023-07-04 19:40", 2214, SEED_CREDITS,
    )  # fmt: skip
    assert_spans_sound(page)


def test_saved_news_page_in_big5(seed: Article, tmp_path: Path) -> None:
    lines = [line.strip() for line in TRADITIONAL.read_text(encoding="utf-8").split("\n") if line.strip()]
    title, meta, body, credits = lines[0], lines[1], lines[2:-1], lines[-1]
    paragraphs = "".join(f'<p><img src="/images/{b}"></p>' if b.endswith(".jpg") else f"<p>{b}</p>" for b in body)
    html = (
        '<html><head><meta http-equiv="Content-Type" content="text/html; charset=big5">'
        f"<title>{title} - 學校新聞網</title><script>var 訪問 = 1;</script></head><body>"
        '<div id="nav"><a href="/">首頁</a> | <a href="/news">學校要聞</a> | <a href="/media">媒體報道</a></div>'
        f'<div class="article"><h1>{title}</h1><div class="info">{meta}</div>'
        f'<div class="content">{paragraphs}<p align="right">{credits}</p></div></div>'
        "<div id=\"footer\">版權所有 &copy; 2023 學校新聞網</div></body></html>"
    )
    write(tmp_path, "zh_hant.html", html.encode("big5"))
    articles, skipped = load_corpus(tmp_path, Config())
    assert skipped == []
    (page,) = articles
    assert page.encoding == "big5"
    assert page.title == title and cut(page, page.meta_span) == meta
    assert (page.date, page.read_count) == (seed.date, seed.read_count)
    assert cut(page, page.credits_span) == credits and len(page.credits) == 4
    assert [cut(page, p) for p in page.paragraphs] == [b for b in body if not b.endswith(".jpg")]
    assert "首頁" not in page.text and "版權所有" not in page.text and "訪問" not in page.text
    assert_spans_sound(page)


@pytest.mark.parametrize(
    "data, text, encoding",
    [
        # Short GBK or Big5 text can also be valid UTF-8 or GBK: the declaration decides.
        ('<meta charset="gbk"><p>学校</p>'.encode("gbk"), '<meta charset="gbk"><p>学校</p>', "gb18030"),
        ('<meta content="text/html; charset=big5" http-equiv="Content-Type"><p>學習</p>'.encode("big5"),
         '<meta content="text/html; charset=big5" http-equiv="Content-Type"><p>學習</p>', "big5"),
        # A BOM beats a stale declaration.
        ('\ufeff<meta charset="gbk"><p>学校</p>'.encode("utf-8"), '<meta charset="gbk"><p>学校</p>', "utf-8-sig"),
        # A page re-saved as UTF-8 that kept its GBK declaration.
        ('<meta charset="gbk"><p>学校举行报告会</p>'.encode("utf-8"), '<meta charset="gbk"><p>学校举行报告会</p>', "utf-8"),
        # A Western label on a Chinese page is a server misconfiguration: detect instead.
        ('<meta charset="iso-8859-1"><p>学校举行报告会</p>'.encode("gbk"), '<meta charset="iso-8859-1"><p>学校举行报告会</p>',
         "gb18030"),
        # A wrong UTF-8 label falls back to detection.
        ('<meta charset="utf-8"><p>学校举行报告会</p>'.encode("gb18030"), '<meta charset="utf-8"><p>学校举行报告会</p>',
         "gb18030"),
        ('<?xml version="1.0" encoding="GBK"?>\r\n<html><p>学校</p></html>'.encode("gbk"),
         '<?xml version="1.0" encoding="GBK"?>\n<html><p>学校</p></html>', "gb18030"),
        ("<html><p>學校舉行報告會</p></html>".encode("big5"), "<html><p>學校舉行報告會</p></html>", "big5"),
    ],
)
def test_decode_html_honours_bom_then_declaration_then_detection(data: bytes, text: str, encoding: str) -> None:
    assert decode_html(data) == (text, encoding)


def test_page_furniture_next_to_the_body_is_found() -> None:
    # A common CMS layout: the date and read count in their own block above the body, the editor's
    # name in a block below it, and the sidebar's "学校要闻" heading repeated in the <title>.
    html = (
        "<html><head><title>图书馆举办“世界读书日”主题活动-学校要闻-某某大学</title></head><body>"
        '<div class="nav"><a href="/">首页</a><a href="/xxyw">学校要闻</a></div>'
        '<div class="side"><h2>学校要闻</h2><ul><li><a href="/1">图书馆举办“世界读书日”主题活动</a></li></ul></div>'
        '<div class="art"><h2 class="title">图书馆举办“世界读书日”主题活动</h2>'
        '<div class="meta"><span>发布时间：2023-04-23 10:00</span>　<span>浏览次数：<b>1,024</b></span></div>'
        '<div class="body"><p>　　4月23日,图书馆在馆前广场举办“世界读书日”主题活动,师生代表三百余人参加。</p>'
        "<p>　　活动现场展出新书两百余种,馆员为同学们逐一介绍推荐理由,ＡＩ导读台吸引了不少同学。</p></div>"
        '<div class="editor">（文字：张三　摄影：李四　责任编辑：南木）</div>'
        '<div class="prev">上一篇：<a href="/2">别的新闻</a></div></div>'
        "<footer>版权所有 © 2023 某某大学</footer></body></html>"
    )
    article = parse_html(html, "x.html", "x")
    assert article.title == "图书馆举办“世界读书日”主题活动"
    assert (article.date, article.read_count) == ("2023-04-23 10:00", 1024)
    assert cut(article, article.meta_span) == "发布时间：2023-04-23 10:00　浏览次数：1,024"
    assert article.credits == (("writer", "张三"), ("photographer", "李四"), ("editor", "南木"))
    # Full-width characters stay as written; NFKC is for matching only.
    assert cut(article, article.credits_span) == "（文字：张三　摄影：李四　责任编辑：南木）"
    assert [cut(article, p) for p in article.paragraphs] == [
        "4月23日,图书馆在馆前广场举办“世界读书日”主题活动,师生代表三百余人参加。",
        "活动现场展出新书两百余种,馆员为同学们逐一介绍推荐理由,ＡＩ导读台吸引了不少同学。",
    ]
    assert "首页" not in article.text and "上一篇" not in article.text and "版权所有" not in article.text
    assert_spans_sound(article)


def test_page_without_a_date_line_takes_its_published_time() -> None:
    html = (
        '<html><head><meta property="article:published_time" content="2023-05-06T10:00:00+08:00">'
        "<title>校园简讯</title></head><body><article><h1>校园简讯</h1>"
        "<p>5月6日,学校在田径场举行第二十届田径运动会,两千余名运动员参赛。</p></article></body></html>"
    )
    article = parse_html(html, "x.html", "x")
    assert (article.title, article.date, article.meta_span) == ("校园简讯", "2023-05-06 10:00", None)
    assert [cut(article, p) for p in article.paragraphs] == ["5月6日,学校在田径场举行第二十届田径运动会,两千余名运动员参赛。"]


def make_docx(paragraphs: list[str], header: str = "") -> bytes:
    import docx

    document = docx.Document()
    for text in paragraphs:
        document.add_paragraph(text)
    if header:
        document.sections[0].header.paragraphs[0].text = header
    buffer = io.BytesIO()
    document.save(buffer)
    return buffer.getvalue()


def test_word_document(seed: Article, tmp_path: Path) -> None:
    # The seed article typed into Word, one paragraph per line, with the office's name in the page header.
    write(tmp_path, "report.docx", make_docx(seed.text.split("\n"), header="某某大学党委宣传部"))
    articles, skipped = load_corpus(tmp_path, Config())
    assert skipped == []
    (article,) = articles
    assert (article.doc_id, article.path, article.encoding) == ("report", "report.docx", "utf-8")
    assert article.text == seed.text and "宣传部" not in article.text
    assert (article.title, article.date, article.read_count, article.credits) == (
        SEED_TITLE, "2023-07-04 19:40", 2214, SEED_CREDITS,
    )  # fmt: skip
    spans = (article.title_span, article.meta_span, article.credits_span, article.paragraphs)
    assert spans == (seed.title_span, seed.meta_span, seed.credits_span, seed.paragraphs)
    assert_spans_sound(article)


def test_word_document_tables_and_full_width_text(tmp_path: Path) -> None:
    import docx

    document = docx.Document()
    document.add_paragraph("校运会成绩公布")
    document.add_paragraph("2023年05月06日10时00分\u3000\u3000阅读:35")
    document.add_paragraph("\u3000\u3000第二十届田径运动会圆满落幕,ＡＩ裁判系统首次启用。")
    table = document.add_table(rows=2, cols=2)
    for (row, col), text in {(0, 0): "项目", (0, 1): "冠军", (1, 0): "100米", (1, 1): "张三"}.items():
        table.cell(row, col).text = text
    document.add_paragraph("（文字：李明　摄影：张华）")
    document.save(tmp_path / "results.docx")
    (article,), skipped = load_corpus(tmp_path, Config())
    assert skipped == []
    assert cut(article, article.meta_span) == "2023年05月06日10时00分\u3000\u3000阅读:35"
    assert (article.date, article.read_count) == ("2023-05-06 10:00", 35)
    assert [cut(article, p) for p in article.paragraphs] == [
        "第二十届田径运动会圆满落幕,ＡＩ裁判系统首次启用。", "项目\t冠军", "100米\t张三",
    ]  # fmt: skip
    assert article.credits == (("writer", "李明"), ("photographer", "张华"))
    assert "ＡＩ" in article.text and "（文字：李明　摄影：张华）" in article.text  # not NFKC-folded
    assert_spans_sound(article)


def test_bad_pages_and_documents_are_skipped_with_reasons(tmp_path: Path) -> None:
    shutil.copy(NEWS_PAGE, tmp_path / "good.html")
    good_docx = make_docx(["校园简讯", "5月6日,学校举行运动会。"])
    write(tmp_path, "brief.docx", good_docx)
    write(tmp_path, "empty.html", b"")
    write(tmp_path, "blank.htm", " \r\n\t")
    write(tmp_path, "image.html", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    write(tmp_path, "notes.html", "这只是一段纯文本,\n没有任何标签。\n")
    write(tmp_path, "script.html", "<html><head><script>alert('只有脚本')</script></head><body></body></html>")
    nav = '<ul class="nav"><li><a href="/">首页</a></li><li><a href="/news">学校要闻</a></li></ul>'
    write(tmp_path, "nav.html", f"<html><body>{nav}<footer>版权所有 © 2023 某某大学</footer></body></html>")
    write(tmp_path, "empty.docx", b"")
    write(tmp_path, "text.docx", "这不是Word文件".encode())
    write(tmp_path, "truncated.docx", good_docx[: len(good_docx) // 2])
    damaged = bytearray(good_docx)
    damaged[good_docx.index(b"word/document.xml") + 100] ^= 0xFF  # inside the compressed document
    write(tmp_path, "damaged.docx", bytes(damaged))
    other = io.BytesIO()
    with zipfile.ZipFile(other, "w") as package:
        package.writestr("mimetype", "application/vnd.oasis.opendocument.text")
    write(tmp_path, "odt.docx", other.getvalue())
    write(tmp_path, "blank.docx", make_docx(["", "  "]))

    articles, skipped = load_corpus(tmp_path, Config())  # never raises for a bad file
    assert [a.doc_id for a in articles] == ["brief", "good"]
    reasons = {s.path: s.reason for s in skipped}
    assert len(reasons) == len(skipped) == 12
    assert reasons["empty.html"] == reasons["blank.htm"] == reasons["empty.docx"] == "empty file"
    assert reasons["image.html"] == "binary file (contains NUL bytes)"
    assert reasons["notes.html"] == "not an HTML page (no HTML tags)"
    assert reasons["script.html"] == reasons["nav.html"] == "no article text found in the page"
    assert reasons["text.docx"].startswith("not a readable .docx (bad ZIP archive:")
    assert reasons["truncated.docx"].startswith("not a readable .docx (bad ZIP archive:")
    assert reasons["damaged.docx"].startswith("not a readable .docx (bad ZIP archive:")
    assert reasons["odt.docx"] == "not a .docx (a ZIP archive without word/document.xml)"
    assert reasons["blank.docx"] == "no text in the document"
    assert all("\n" not in s.reason for s in skipped)


def test_pages_and_documents_are_read_offline(seed: Article, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    attempts: list[object] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(args)
        raise OSError("network is off in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    shutil.copy(NEWS_PAGE, tmp_path / NEWS_PAGE.name)
    write(tmp_path, "report.docx", make_docx(seed.text.split("\n")))
    articles, skipped = load_corpus(tmp_path, Config())
    assert [a.doc_id for a in articles] == ["news_page", "report"] and skipped == []
    assert attempts == []


# ---------------------------------------------------------------- the folder


def test_bad_files_are_skipped_with_reasons(tmp_path: Path) -> None:
    shutil.copy(SEED, tmp_path / "good.txt")
    write(tmp_path, "empty.txt", b"")
    write(tmp_path, "blank.md", "  \n\n")
    write(tmp_path, "binary.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    noise = random.Random(7)
    write(tmp_path, "noise.txt", bytes(noise.randrange(1, 256) for _ in range(2000)))  # no NUL, no encoding
    write(tmp_path, "big.txt", "大文件\n" + "正文。" * 4000)
    lines = [
        json.dumps({"id": "ok", "title": "好的", "date": "2023-07-01", "text": "正文。"}, ensure_ascii=False),
        '{"id": "broken", "text": ',
        "[1, 2]",
        json.dumps({"id": "no-text"}),
        json.dumps({"id": "ok", "title": "重复编号", "text": "别的正文。"}, ensure_ascii=False),
    ]
    write(tmp_path, "feed.jsonl", "\n".join(lines) + "\n")
    # Silently ignored: other suffixes and hidden folders; a hidden article file is named as skipped.
    write(tmp_path, "photo.jpg", b"\xff\xd8\xff\xe0\x00\x10JFIF")
    write(tmp_path, "notes.pdf", b"%PDF-1.7")
    write(tmp_path, ".draft.txt", "草稿\n正文。\n")
    write(tmp_path, ".git/HEAD.txt", "ref\n")

    articles, skipped = load_corpus(tmp_path, Config(max_file_bytes=15_000))
    assert [a.doc_id for a in articles] == ["feed#ok", "good"]
    reasons = {}
    for s in skipped:
        reasons.setdefault(s.path, []).append(s.reason)
    assert set(reasons) == {"big.txt", "binary.txt", "blank.md", "empty.txt", "feed.jsonl", "noise.txt", ".draft.txt"}
    assert reasons[".draft.txt"][0].startswith("hidden file")
    assert reasons["empty.txt"] == ["empty file"]
    assert reasons["blank.md"] == ["empty file"]
    assert reasons["binary.txt"] == ["binary file (contains NUL bytes)"]
    assert reasons["noise.txt"][0].startswith("undecodable")
    assert reasons["big.txt"][0].startswith("too large:") and "15000" in reasons["big.txt"][0]
    feed = reasons["feed.jsonl"]
    assert len(feed) == 4
    assert feed[0].startswith("line 2: invalid JSON")
    assert feed[1] == "line 3: not a JSON object"
    assert feed[2] == "line 4: 'text' must be a non-empty string"
    assert feed[3] == "line 5: id ok repeats an earlier line"
    assert all("\n" not in s.reason for s in skipped)
    assert [s.path for s in skipped] == sorted(s.path for s in skipped)  # reported in walk order


def test_missing_corpus_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(CorpusError, match="nowhere") as info:
        load_corpus(missing, Config())
    assert "create it" in str(info.value) and "\n" not in str(info.value)
    a_file = write(tmp_path, "file.txt", "标题\n")
    with pytest.raises(CorpusError, match="not a folder"):
        load_corpus(a_file, Config())


def test_empty_folder_loads_nothing(tmp_path: Path) -> None:
    assert load_corpus(tmp_path, Config()) == ([], [])


def test_duplicates_are_kept_once(seed: Article, tmp_path: Path) -> None:
    shutil.copy(SEED, tmp_path / "a.txt")
    write(tmp_path, "b/copy.txt", seed.text.encode("gb18030"))  # same text once decoded
    write(tmp_path, "c.txt", seed.text.replace("2214", "2215"))
    records = [{"id": n, "title": "简讯", "text": "同一段正文。"} for n in (1, 2)]
    write(tmp_path, "d.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in records))
    articles, skipped = load_corpus(tmp_path, Config())
    assert [a.doc_id for a in articles] == ["a", "c", "d#1"]
    assert skipped == [
        Skipped("b/copy.txt", "duplicate of a"),
        Skipped("d.jsonl", "duplicate of d#1 (record d#2)"),
    ]


def test_sorted_walk_and_doc_ids(tmp_path: Path) -> None:
    for name in ("b.txt", "a.txt", "a/z.txt", "sub/deeper/x.md", "A.TXT"):
        write(tmp_path, name, f"{name}\n正文:{name}\n")
    articles, skipped = load_corpus(tmp_path, Config())
    assert skipped == []
    assert [(a.doc_id, a.path) for a in articles] == [
        ("A", "A.TXT"),
        ("a/z", "a/z.txt"),
        ("a", "a.txt"),
        ("b", "b.txt"),
        ("sub/deeper/x", "sub/deeper/x.md"),
    ]


def test_same_doc_id_from_two_suffixes(tmp_path: Path) -> None:
    write(tmp_path, "x.md", "# 标题一\n正文一。\n")
    write(tmp_path, "x.txt", "标题二\n正文二。\n")
    articles, skipped = load_corpus(tmp_path, Config())
    assert [(a.doc_id, a.path) for a in articles] == [("x", "x.md")]
    assert skipped == [Skipped("x.txt", "doc_id x is already used by x.md")]


def test_spans_stay_sound_on_scrambled_documents() -> None:
    pieces = [
        "学校新闻", "\n", "\r\n", "\r", "  ", "\xa0", "\u3000", "\ufeff", "(张三/摄影)", "（编辑：李四）",
        "2023年07月04日19时40分", "阅读:12", "a.jpg", "---", "\n---\n", "# 标题", "## ", "#", "title: x",
        "date: 2023-01-01", "author: 张三", "。", "/", "：", "![x](y.png)", "正文,内容。", "(", ")", "张三 李四/摄影",
    ]  # fmt: skip
    rnd = random.Random(3)
    for _ in range(3000):
        text = "".join(rnd.choice(pieces) for _ in range(rnd.randrange(1, 16)))
        for path in ("x.txt", "x.md"):
            try:
                article = parse_article(text, path, "x")
            except CorpusError:
                continue
            assert_spans_sound(article)


def test_records_are_frozen(seed: Article) -> None:
    with pytest.raises(AttributeError):
        seed.title = "x"  # type: ignore[misc]
    with pytest.raises(ValueError):
        Span(5, 2)


@pytest.mark.parametrize("module", [rag.decoding, rag.layout, rag.readers], ids=lambda m: m.__name__)
def test_docstring_examples(module) -> None:
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


def test_corpus_errors_are_rag_errors() -> None:
    # The CLI and the chat print any RagError as one line; decoding, readers and corpus raise one class.
    assert issubclass(CorpusError, RagError)
    assert rag.corpus.CorpusError is rag.decoding.CorpusError is rag.readers.CorpusError
