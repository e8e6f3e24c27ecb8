"""Answer -> what a person reads: escaped HTML for the web chat, plain text for scripts.

Every piece of article or user text goes through `_e` (html.escape): an article that contains
"<script>" shows those characters and runs nothing. The HTML has no line breaks, so a Markdown
renderer takes it as one raw HTML block and leaves `*` and `_` in article text alone.
"""
from __future__ import annotations

import html

from .answering import Answer, Citation
from .retrieval import Filters, Hit

CONTEXT_CHARS = 40  # characters shown either side of the highlighted span before "展开"
CLOSEST = 3  # passages shown under a declined question


def _e(text: str | None) -> str:
    """_e("<b>\\n") -> "&lt;b&gt;<br>" """
    return html.escape(text or "", quote=True).replace("\n", "<br>")


def highlighted(text: str, start: int, end: int) -> str:
    """text with text[start:end] in <mark>, all escaped: highlighted("a<b>c", 1, 4) -> "a<mark>&lt;b&gt;</mark>c" """
    start, end = max(0, start), min(len(text), end)
    return f"{_e(text[:start])}<mark>{_e(text[start:end])}</mark>{_e(text[end:])}"


def cited_hit(answer: Answer, citation: Citation) -> Hit | None:
    """The retrieved passage that contains the citation."""
    for hit in answer.passages:
        c = hit.chunk
        if c.doc_id == citation.doc_id and c.start <= citation.start and citation.end <= c.end:
            return hit
    return None


def _who(hit: Hit) -> str:
    c = hit.chunk
    if not c.speaker:
        return ""
    return f"{c.speaker}（{c.role}）" if c.role else c.speaker


def _card(n: int, hit: Hit, citation: Citation | None) -> str:
    c = hit.chunk
    head = [f'<b class="rag-title">{_e(c.title)}</b>']
    if c.date:
        head.append(f'<span class="rag-date">{_e(c.date[:10])}</span>')
    if c.speaker:
        head.append(f'<span class="rag-speaker">{_e(_who(hit))}</span>')
    text = c.text
    if citation is not None:
        a, b = citation.start - c.start, citation.end - c.start
        lo, hi = max(0, a - CONTEXT_CHARS), min(len(text), b + CONTEXT_CHARS)
        excerpt = ("…" if lo else "") + highlighted(text[lo:hi], a - lo, b - lo) + ("…" if hi < len(text) else "")
        full = highlighted(text, a, b)
    else:
        excerpt = _e(text[: 2 * CONTEXT_CHARS]) + ("…" if len(text) > 2 * CONTEXT_CHARS else "")
        full = _e(text)
    return (f'<div class="rag-source"><span class="rag-n">[{n}]</span> {" · ".join(head)}'
            f'<blockquote class="rag-excerpt">{excerpt}</blockquote>'
            f'<details class="rag-full"><summary>展开完整段落</summary>'
            f'<div class="rag-passage">{full}</div></details></div>')


def filters_text(filters: Filters | None) -> str:
    """The filters as staff read them: "发言人：王任；日期：2023-01-01 至 最新"; "" for none."""
    if not filters:
        return ""
    parts = []
    if filters.speakers:
        parts.append("发言人：" + "、".join(filters.speakers))
    if filters.date_from or filters.date_to:
        parts.append(f"日期：{filters.date_from or '最早'} 至 {filters.date_to or '最新'}")
    return "；".join(parts)


def answer_html(answer: Answer, understood: str, filters: Filters | None = None, note: str | None = None) -> str:
    """The chat message for an answer: the answer, then its sources panel."""
    out = [f'<div class="rag-answer"><div class="rag-answer-text">{_e(answer.answer)}</div>']
    if note:
        out.append(f'<div class="rag-note">{_e(note)}</div>')
    if answer.error:
        return "".join(out) + "</div>"
    out.append(f'<div class="rag-sources"><div class="rag-understood">理解为：{_e(understood)}</div>')
    if (shown := filters_text(filters)):
        out.append(f'<div class="rag-filters">筛选：{_e(shown)}</div>')
    if answer.found:
        out.append('<div class="rag-sources-title">来源</div>')
        for n, citation in enumerate(answer.citations, start=1):
            hit = cited_hit(answer, citation)
            if hit is not None:
                out.append(_card(n, hit, citation))
    elif answer.passages:
        out.append('<div class="rag-declined">文章中没有找到这个问题的答案。以下是最接近的段落，供参考：</div>')
        for n, hit in enumerate(answer.passages[:CLOSEST], start=1):
            out.append(_card(n, hit, None))
    else:
        out.append('<div class="rag-declined">没有找到相关段落。</div>')
    return "".join(out) + "</div></div>"


def message_html(text: str, css_class: str = "rag-message") -> str:
    """A plain message (a question, a notice, an answer still being typed) as escaped HTML."""
    return f'<div class="{css_class}">{_e(text)}</div>'


def writing_html(text: str, citations: list[Citation]) -> str:
    """An answer still being written: its text so far, and the sources of the sentences already checked."""
    out = [f'<div class="rag-writing"><div class="rag-answer-text">{_e(text)}▍</div>']
    if citations:
        out.append('<div class="rag-sources"><div class="rag-sources-title">来源（已核对的句子）</div>')
        for n, c in enumerate(citations, start=1):
            who = f" · {_e(c.speaker)}" if c.speaker else ""
            out.append(f'<div class="rag-source"><span class="rag-n">[{n}]</span> <b class="rag-title">{_e(c.title)}</b>'
                       f'{who}<blockquote class="rag-excerpt"><mark>{_e(c.text)}</mark></blockquote></div>')
        out.append("</div>")
    return "".join(out) + "</div>"


def answer_text(answer: Answer, understood: str, filters: Filters | None = None, note: str | None = None) -> str:
    """The answer and its sources as plain text, for scripts (gradio_client) and logs."""
    lines = [answer.answer]
    if note:
        lines.append(f"（{note}）")
    if answer.error:
        return "\n".join(lines)
    lines.append(f"理解为：{understood}")
    if (shown := filters_text(filters)):
        lines.append(f"筛选：{shown}")
    if answer.found:
        lines.append("来源：")
        for n, c in enumerate(answer.citations, start=1):
            hit = cited_hit(answer, c)
            meta = [f"《{c.title}》"]
            if hit is not None and hit.chunk.date:
                meta.append(hit.chunk.date[:10])
            if hit is not None and hit.chunk.speaker:
                meta.append(_who(hit))
            lines.append(f"[{n}] {' · '.join(meta)}")
            lines.append(f"    「{c.text.strip()}」")
    elif answer.passages:
        lines.append("最接近的段落：")
        for n, hit in enumerate(answer.passages[:CLOSEST], start=1):
            ch = hit.chunk
            who = f" · {_who(hit)}" if ch.speaker else ""
            lines.append(f"[{n}] 《{ch.title}》{who}：{ch.text[: 2 * CONTEXT_CHARS]}…")
    return "\n".join(lines)
