"""Article -> Chunk records: speech segments that know their speaker, role, report title and offsets."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from .config import Config
from .corpus import Article, Span
from .text import PAUSE, SENTENCE_BREAK, nfkc

# rag.index and rag.retrieval import the matching form from here under its old name.
normalize = nfkc

CHUNKER_VERSION = "speech-segments-v1"

_REPORT_TITLE = re.compile(r"《([^《》]{2,60})》")
_VENUE = re.compile(r"在([\u4e00-\u9fff]{2,14}?)(?:隆重|顺利|成功)?(?:举行|召开|举办|开幕|开展)")
_PRONOUN_START = re.compile(r"^(?:他|她|其)")
_PHRASE_SPLIT = re.compile(r"[\s“”\"'‘’《》「」、，,：:；;。！？!?()（）]+")
_CJK_NAME = re.compile(r"^[\u4e00-\u9fff·]{2,4}$")

# Credits described the way users ask about them ("这篇报道的照片是谁拍的？").
CREDIT_PHRASES = {
    "photographer": "照片由{}拍摄（摄影）",
    "contributor": "稿件由{}提供（供稿）",
    "reviewer": "由{}审核",
    "editor": "由{}编辑",
    "writer": "文字由{}撰写（作者）",
    "reporter": "记者：{}",
    "correspondent": "通讯员：{}",
}


@dataclass(frozen=True)
class Chunk:
    chunk_id: str  # "<doc_id>:<n>", stable for a given article text and chunker version
    doc_id: str
    title: str  # the article's title
    date: str | None  # the article's publication date-time
    kind: str  # "speech" | "overview" | "paragraph" | "meta" | "credits"
    speaker: str | None  # who is speaking in this segment
    role: str | None  # the speaker's role as given in the overview paragraph
    report_title: str | None  # the 《…》 title of the speaker's report
    start: int  # offsets into Article.text: text == article.text[start:end]
    end: int
    text: str  # the original text, as shown to users
    search_text: str  # what is embedded and BM25-indexed: a context header + NFKC(text)

    def to_json(self) -> dict:
        return asdict(self)


def split_sentences(text: str, start: int = 0) -> list[Span]:
    """Sentence spans (offsets into `text` shifted by `start`), cut after 。！？； and closing quotes.

    split_sentences("他来了。她走了！") -> [Span(0, 4), Span(4, 8)]  ("他来了。", "她走了！")
    """
    spans, pos = [], 0
    for m in SENTENCE_BREAK.finditer(text):
        spans.append(Span(start + pos, start + m.end()))
        pos = m.end()
    if text[pos:].strip():
        spans.append(Span(start + pos, start + len(text)))
    return [s for s in spans if text[s.start - start : s.end - start].strip()]


def _split_long(text: str, span: Span, limit: int) -> list[Span]:
    """Cut one over-long sentence at pause marks (，、：), hard-cutting only a clause over the limit."""
    pieces, pos, base = [], 0, span.start
    body = text[span.start : span.end]
    cuts = [m.end() for m in PAUSE.finditer(body)] + [len(body)]
    piece_start = 0
    for cut in cuts:
        if cut - piece_start > limit and pos > piece_start:
            pieces.append((piece_start, pos))
            piece_start = pos
        pos = cut
    pieces.append((piece_start, len(body)))
    out = []
    for a, b in pieces:
        while b - a > limit:
            out.append(Span(base + a, base + a + limit))
            a += limit
        if b > a:
            out.append(Span(base + a, base + b))
    return out


def answer_units(chunk: "Chunk", limit: int) -> list[Span]:
    """A chunk's candidate answer spans (offsets into the article): its sentences, those over `limit`
    characters cut at clause marks, without leading blanks.

    answer_units(chunk with text "他来了。她走了！" at 10, 150) -> [Span(10, 14), Span(14, 18)]
    """
    out = []
    for s in split_sentences(chunk.text, chunk.start):
        local = Span(s.start - chunk.start, s.end - chunk.start)
        pieces = _split_long(chunk.text, local, limit) if s.end - s.start > limit else [local]
        for p in pieces:
            body = chunk.text[p.start : p.end]
            lead = len(body) - len(body.lstrip())
            if body.strip():
                out.append(Span(chunk.start + p.start + lead, chunk.start + p.end))
    return out


def pack_sentences(text: str, sentences: list[Span], size: int, overlap: int) -> list[Span]:
    """Group consecutive sentence spans into chunks of at most `size` characters.

    The next chunk starts with the trailing sentences of the previous one that fit in `overlap`
    characters, so a fact near a boundary is whole in at least one chunk. A sentence alone over
    `size` is cut at clause marks. pack_sentences("甲。乙。丙。", [...3 spans], size=4, overlap=0)
    -> [Span(0, 4), Span(4, 6)]
    """
    units: list[Span] = []
    for s in sentences:
        units.extend(_split_long(text, s, size) if s.end - s.start > size else [s])
    chunks: list[Span] = []
    i = 0
    while i < len(units):
        j = i
        while j < len(units) and units[j].end - units[i].start <= size:
            j += 1
        j = max(j, i + 1)
        chunks.append(Span(units[i].start, units[j - 1].end))
        if j >= len(units):
            break
        # Step back over trailing sentences that fit in the overlap, but always advance.
        k = j
        while k - 1 > i and units[j - 1].end - units[k - 1].start <= overlap:
            k -= 1
        i = k
    return chunks


def find_names(text: str) -> list[str]:
    """Person names in `text` (jieba's `nr` tags, adjacent pieces merged): "李俊峰以…" -> ["李俊峰"]."""
    import jieba.posseg  # jieba is light, but its dictionary loads on first use

    names, run = [], ""
    for word, flag in jieba.posseg.cut(text):
        if flag == "nr" and len(run + word) <= 4:
            run += word
            continue
        if _CJK_NAME.match(run):
            names.append(run)
        run = word if flag == "nr" else ""
    if _CJK_NAME.match(run):
        names.append(run)
    return list(dict.fromkeys(names))


def roles_from_overview(text: str, names: list[str]) -> dict[str, str]:
    """Map each name to the role written just before it in the overview paragraph.

    A name directly after another in a 、-list shares its role:
    roles_from_overview("上午,党委常委、副校长张根华、王任分别作报告。", ["张根华", "王任"])
    -> {"张根华": "党委常委、副校长", "王任": "党委常委、副校长"}
    """
    roles: dict[str, str] = {}
    if not names:
        return roles
    name_re = re.compile("|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)))
    for clause in re.split(r"[,，。;；:：]", text):
        prev_end, prev_role = 0, None
        for m in name_re.finditer(clause):
            between = clause[prev_end : m.start()].strip()
            between = re.sub(r"^(?:上午|下午|晚上|会上|会议由|由|并|和|及|与)", "", between)
            if between.strip("、 和及与"):
                role = between.strip("、 ")
            else:
                role = prev_role
            if role and m.group() not in roles:
                roles[m.group()] = role
            prev_end, prev_role = m.end(), role
    return roles


def _leading_speaker(paragraph: str, names: list[str]) -> str | None:
    for name in names:
        if paragraph.startswith(name):
            return name
    found = find_names(paragraph[:6])
    return found[0] if found and paragraph.startswith(found[0]) else None


def _header(article: Article, **fields: str | None) -> str:
    parts = [f"文章：{article.title}"]
    labels = {"speaker": "发言人", "role": "职务", "report_title": "报告题目"}
    parts += [f"{labels[k]}：{v}" for k, v in fields.items() if v]
    return "；".join(parts) + "\n"


def chunk_article(article: Article, config: Config) -> list[Chunk]:
    """Split one article into retrievable chunks: metadata, credits, overview, speech segments."""
    text = article.text
    chunks: list[Chunk] = []

    def add(kind: str, span: Span, speaker=None, role=None, report_title=None, extra: str = "") -> None:
        body = text[span.start : span.end]
        header = _header(article, speaker=speaker, role=role, report_title=report_title)
        chunks.append(
            Chunk(
                chunk_id=f"{article.doc_id}:{len(chunks)}",
                doc_id=article.doc_id, title=article.title, date=article.date, kind=kind,
                speaker=speaker, role=role, report_title=report_title,
                start=span.start, end=span.end, text=body,
                search_text=header + extra + nfkc(body),
            )
        )

    # Title + date/read-count line: "这篇新闻的阅读量是多少？" and "哪天发布的？" are answered here.
    meta_spans = [s for s in (article.title_span, article.meta_span) if s]
    if meta_spans:
        span = Span(min(s.start for s in meta_spans), max(s.end for s in meta_spans))
        facts = [f"这篇报道《{article.title}》"]
        if article.date:
            facts.append(f"发布于{article.date}")
        if article.read_count is not None:
            facts.append(f"阅读量（阅读次数）为{article.read_count}")
        add("meta", span, extra="，".join(facts) + "。\n")
    if article.credits_span:
        phrases = [CREDIT_PHRASES.get(role, role + "：{}").format(name) for role, name in article.credits]
        add("credits", article.credits_span, extra="这篇报道的" + "；".join(phrases) + "。\n")

    paragraphs = list(article.paragraphs)
    if not paragraphs:
        return chunks
    overview = text[paragraphs[0].start : paragraphs[0].end]
    names = find_names(overview)
    roles = roles_from_overview(overview, names)
    speaker = None
    for n, para in enumerate(paragraphs):
        body = text[para.start : para.end]
        if n == 0:
            kind, speaker, report_title = "overview", None, None
        else:
            lead = _leading_speaker(body, names)
            if lead:
                speaker = lead
            elif not _PRONOUN_START.match(body):
                speaker = None
            kind = "speech" if speaker else "paragraph"
            m = _REPORT_TITLE.search(body)
            report_title = m.group(1) if (m and speaker) else None
        sentences = split_sentences(body, para.start)
        for span in pack_sentences(text, sentences, config.chunk_size, config.chunk_overlap):
            add(kind, span, speaker, roles.get(speaker) if speaker else None, report_title)
    return chunks


def article_terms(article: Article, chunks: list[Chunk]) -> list[str]:
    """Words of one article the Chinese tokenizer must keep whole: speakers, roles, report titles, venues,
    names in the overview and the credits."""
    terms: set[str] = set()
    for c in chunks:
        for value in (c.speaker, c.report_title):
            if value:  # a title like "通达学情 融合推进 “五字诀”推进…" gives its phrases
                terms.update(_PHRASE_SPLIT.split(nfkc(value)))
        if c.role:
            terms.update(p for p in re.split(r"[、,，\s]", nfkc(c.role)) if len(p) >= 2)
    for p in article.paragraphs[:1]:
        overview = nfkc(article.text[p.start : p.end])
        terms.update(find_names(overview))
        terms.update(m.group(1) for m in _VENUE.finditer(overview))
    terms.update(nfkc(name) for _, name in article.credits)
    return sorted(t for t in terms if 2 <= len(t) <= 40)
