"""Is each generated sentence supported by the passages? Numbers, titles, quotes and names must be there, bound right.

Reads the model's text (sentences and their [n] markers), scores each sentence against the passages it
cites and the others (words, and meaning where an embedder is given), and names the passage sentence
that supports it. Knows nothing of models or prompts beyond `passage_fields`, the header both share.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

from .answering import Citation
from .spans import ROLE_WORDS
from .chunking import Chunk, find_names, split_sentences
from .retrieval import Hit
from .text import CLAUSE_BREAK, SENTENCE_ENDS, fold, nfkc

# [1], [1,2], [1][2], 【1】, ［1］ and the like, as small models write them.
_MARKER = re.compile(r"[\[【［]\s*(?:资料|段落)?\s*(\d{1,2}(?:\s*[,，、]\s*\d{1,2})*)\s*[\]】］]")
_LEADING_MARKERS = re.compile(r"^\s*(?:" + _MARKER.pattern + r"\s*)+")
_DECLINES = re.compile(r"没有提到|没有提及|未提及|未提到|没有相关|无法回答|不知道|没有说明|没有涉及")
_DIGITS = re.compile(r"\d+")
_QUOTED = re.compile(r"[《“「『\"]([^《》“”「」『』\"]{1,80})[》”」』\"]")
# Sentences addressed to a model rather than to readers: they never count as support for a claim,
# so an answer dictated by an injected passage has nothing to stand on even if the model obeys it.
INSTRUCTION_LIKE = re.compile(
    r"忽略.{0,12}(?:指令|指示|提示|要求|规则|内容)|无视.{0,12}(?:指令|指示|要求|规则)|(?:系统|system)\s*(?:提示|prompt)"
    r"|ignore\s+(?:all\s+|any\s+)?(?:the\s+)?(?:previous|above|prior|earlier|preceding)"
    r"|disregard\s+.{0,40}instructions|you\s+are\s+now\b|new\s+instructions",
    re.IGNORECASE,
)
# Tokens that are (part of) a role: they stand beside names and say nothing about what a person did.
_ROLE_TOKEN = re.compile(f"{ROLE_WORDS.pattern}|委员|常委")


@dataclass(frozen=True)
class CheckedSentence:
    text: str  # the sentence without its citation markers
    cited: tuple[int, ...]  # passage numbers (1-based) the model cited
    support: float  # best support found among the passages, 0..1
    supporting: tuple[int, ...]  # passage indices (0-based) that support it, best first; empty when unsupported
    spans: tuple[Citation, ...] = ()  # the supporting sentence of each supporting passage
    decline: bool = False  # the sentence says the articles do not answer

    @property
    def supported(self) -> bool:
        return bool(self.supporting)


def split_generated(text: str) -> list[tuple[str, tuple[int, ...]]]:
    """Generated text -> [(sentence without markers, cited numbers)]; markers after a full stop go with it.

    split_generated("在乐之厅举行[1]。由徐惠钢主持。[2]") -> [("在乐之厅举行。", (1,)), ("由徐惠钢主持。", (2,))]
    """
    out: list[tuple[str, list[int]]] = []
    for span in split_sentences(text):
        piece = text[span.start : span.end]
        lead = _LEADING_MARKERS.match(piece)
        if lead and out:
            out[-1][1].extend(_numbers(lead.group(0)))
            piece = piece[lead.end() :]
        cited = _numbers(piece)
        clean = _MARKER.sub("", piece).strip()
        if clean.strip(SENTENCE_ENDS + "，,、 "):
            out.append((clean, cited))
        elif cited and out:
            out[-1][1].extend(cited)
    return [(s, tuple(dict.fromkeys(c))) for s, c in out]


def _numbers(text: str) -> list[int]:
    return [int(n) for m in _MARKER.finditer(text) for n in re.findall(r"\d+", m.group(1))]


def passage_fields(chunk: Chunk) -> tuple[str, str]:
    """(header, body) of a passage as the model sees it and as sentences are checked against.

    The header names the article, date, speaker, role and report title; metadata and credit segments
    also get their description in words ("照片由王保红拍摄（摄影）"), as the index has them.
    """
    parts = [f"文章：《{chunk.title}》"]
    if chunk.date:
        parts.append(f"日期：{chunk.date[:10]}")
    if chunk.speaker:
        parts.append(f"发言人：{chunk.speaker}" + (f"（{chunk.role}）" if chunk.role else ""))
    if chunk.report_title:
        parts.append(f"报告题目：《{chunk.report_title}》")
    if chunk.kind in ("meta", "credits"):
        header = chunk.search_text[: max(0, len(chunk.search_text) - len(nfkc(chunk.text)))]
        parts += [line.strip() for line in header.splitlines() if line.strip() and not line.startswith("文章：")]
    return "；".join(parts), chunk.text


def complete_prefix(text: str, done: int) -> int:
    """End of the last complete sentence of `text` after offset `done` (`done` if none is complete yet).

    A sentence is complete once something other than its citation markers follows its end mark:
    complete_prefix("在乐之厅举行。[1]由", 0) -> 10 (the marker stays with its sentence);
    complete_prefix("在乐之厅举行。[1", 0) -> 0 (the marker may go on).
    """
    cut = done
    for m in re.finditer(f"[{SENTENCE_ENDS}]+", text):
        if m.end() <= done:
            continue
        rest = text[m.end() :]
        after = _LEADING_MARKERS.sub("", rest).lstrip()
        if after and after[0] not in "[【［":
            cut = len(text) - len(after)
    return cut


class SupportChecker:
    """How well a passage supports a generated sentence: lexical, and by meaning when an embedder is given.

    Lexical support is the share of the sentence's content tokens (the index tokenizer's) found in the
    passage's text and header, weighted by length; words the question already contains weigh half,
    and a sentence that adds nothing to the question has no support. A number, a 《title》 or a
    “quoted phrase”, or a name or long word the question did not bring, that the passage lacks
    means no support. With an embedder, the cosine between the
    sentence and the passage's closest sentence is mapped to 0..1 between `dense_floor` and
    `dense_full` and averaged in with weight `dense_weight`, where the words alone leave it open.
    """

    def __init__(self, tokenizer, embedder=None, dense_floor: float = 0.80, dense_full: float = 0.90,
                 dense_weight: float = 0.25):
        self.tokenizer, self.embedder = tokenizer, embedder
        self.dense_floor, self.dense_full, self.dense_weight = dense_floor, dense_full, dense_weight

    def evidence(self, chunk: Chunk, doc_text: str) -> list[tuple[int, int]]:
        """Sentence spans of the chunk (offsets into the document) that may support a claim."""
        spans = []
        for s in split_sentences(chunk.text, chunk.start):
            start = s.start
            while start < s.end and doc_text[start].isspace():
                start += 1
            if start < s.end and not INSTRUCTION_LIKE.search(doc_text[start : s.end]):
                spans.append((start, s.end))
        return spans

    def lexical(self, sentence: str, question: str, passage: str) -> float:
        """lexical("报告会在慎行楼乐之厅举行。", "报告会在哪里举行？", "7月4日,学校在慎行楼乐之厅举行…") -> 1.0"""
        passage = fold(passage)
        claim = fold(sentence)
        # Numbers, titles and quoted words are facts a passage states exactly, or not at all; a number is a
        # whole number there ("0" is not in "2023", "214" is not in "2214").
        numbers = set(_DIGITS.findall(passage))
        if any(n not in numbers for n in _DIGITS.findall(claim)) or any(
                q.strip() not in passage for q in _QUOTED.findall(claim)):
            return 0.0
        asked = set(self.tokenizer.tokenize(question))
        tokens = list(dict.fromkeys(self.tokenizer.tokenize(sentence)))
        if not any(t not in asked for t in tokens):
            return 0.0  # repeats the question and says nothing else
        # So are names and long terms the question did not bring: one the passage lacks is invented.
        names = _names(sentence)
        if any(t not in asked and (len(t) >= 3 or t in names) and t not in passage for t in tokens):
            return 0.0
        weights = {t: len(t) * (0.5 if t in asked else 1.0) for t in tokens}
        found = sum(w for t, w in weights.items() if t in passage)
        return found / sum(weights.values())

    def binds(self, sentence: str, question: str, passage: str, speaker: str | None = None, said: str = "") -> bool:
        """Does every person the sentence names (and the question does not) stand in the passage in a clause
        that shares a word with the rest of the claim?

        Words alone cannot see a claim that joins a name to the wrong predicate: "上午的会议由张根华主持" has all
        its words in "…副校长张根华、王任分别作专题报告,党委常委、副校长徐惠钢主持会议", but 张根华's clause says
        nothing of 主持 or 会议. A clause that ends with the name ("校党委副书记李俊峰,") is an item of a list
        and takes its words from the clause that follows. The chunk's own `speaker` is bound to what the chunk
        has them say (`said`), not to the header that names them.
        """
        asked = fold(question)
        own = fold(speaker or "")
        names = [n for n in _names(sentence) if n not in asked]
        if not names:
            return True
        claim = [t for t in self.tokenizer.tokenize(sentence) if t not in names and not _ROLE_TOKEN.search(t)]
        if not claim:
            return True
        clauses = [c for c in CLAUSE_BREAK.split(fold(passage)) if c.strip()]

        def listed(clause: str) -> bool:  # "校党委副书记李俊峰": a role and a name, the name last
            body = clause.strip().rstrip("、 ")
            return any(body.endswith(n) for n in _names(clause))

        for name in names:
            windows = [fold(said)] if own and name == own else []
            for i, clause in enumerate(clauses):
                if name in clause:
                    j = i
                    while listed(clauses[j]) and j + 1 < len(clauses) and j - i < 3:
                        j += 1
                    windows.append("".join(clauses[i : j + 1]))
            if not any(t in w for w in windows for t in claim):
                return False
        return True

    def meaning(self, cosine: float) -> float:
        return min(1.0, max(0.0, (cosine - self.dense_floor) / (self.dense_full - self.dense_floor)))

    def check(self, sentence: str, cited: tuple[int, ...], question: str, passages: Sequence[Hit],
              documents: Mapping[str, dict], threshold: float) -> CheckedSentence:
        """Support of `sentence` by the passages it cites, then by the others; citations point at the best span."""
        if _DECLINES.search(sentence):
            return CheckedSentence(sentence, cited, 0.0, (), (), decline=True)
        texts, bodies, candidates = [], [], []  # per passage: the text a claim may rest on, its evidence, its spans
        for hit in passages:
            doc_text = documents[hit.chunk.doc_id]["text"]
            spans = self.evidence(hit.chunk, doc_text)
            header, _ = passage_fields(hit.chunk)
            bodies.append("".join(doc_text[a:b] for a, b in spans))
            texts.append(header + "\n" + bodies[-1])
            candidates.append(spans)
        lexical = [self.lexical(sentence, question, t) if self.binds(sentence, question, t, h.chunk.speaker, body)
                   else 0.0 for t, body, h in zip(texts, bodies, passages)]
        scores = list(lexical)
        w = self.dense_weight
        # Meaning is weighed in only where the words leave the decision open: it costs an embedding pass.
        open_ = [i for i, lex in enumerate(lexical) if lex > 0 and (1 - w) * lex < threshold <= (1 - w) * lex + w]
        if self.embedder is not None and open_:
            flat = [(i, a, b) for i in open_ for a, b in candidates[i]]
            vectors = self.embedder.encode_queries(
                [sentence] + [documents[passages[i].chunk.doc_id]["text"][a:b] for i, a, b in flat]
            )
            best = dict.fromkeys(open_, 0.0)
            for (i, _, _), c in zip(flat, (vectors[1:] @ vectors[0]).tolist()):
                best[i] = max(best[i], c)
            for i in open_:
                scores[i] = (1 - w) * lexical[i] + w * self.meaning(best[i])
        valid = [n - 1 for n in cited if 1 <= n <= len(passages)]
        order = sorted(valid, key=lambda i: -scores[i]) + sorted(
            (i for i in range(len(passages)) if i not in valid), key=lambda i: -scores[i])
        supporting: list[int] = []
        support = max(scores, default=0.0)
        if order and scores[order[0]] >= threshold and order[0] in valid:
            supporting = [order[0]]  # the model's own citation holds
        elif valid and len(valid) > 1:
            # A sentence may join facts from several cited passages ("上午李俊峰、张根华作报告[1][2]").
            joint = self.lexical(sentence, question, "\n".join(texts[i] for i in valid))
            if joint >= threshold:
                supporting, support = sorted(valid, key=lambda i: -lexical[i]), max(support, joint)
        if not supporting:
            best_any = max(range(len(passages)), key=lambda i: scores[i], default=None)
            if best_any is not None and scores[best_any] >= threshold:
                supporting = [best_any]  # the model cited the wrong passage, or none: cite the one that supports it
        spans = tuple(self._citation(sentence, question, passages[i].chunk, candidates[i], documents, threshold)
                      for i in supporting)
        spans = tuple(s for s in spans if s is not None)
        if not spans:
            supporting = []
        return CheckedSentence(sentence, cited, support, tuple(supporting), spans)

    def _citation(self, sentence, question, chunk: Chunk, spans, documents, threshold: float) -> Citation | None:
        """The sentence that best covers the claim: doc["text"][start:end] == text.

        Looked for in the supporting chunk first. When the chunk supports the claim only through its
        header (a report title or role stated elsewhere in the article), the article's sentence that
        states it is cited instead, found the same way.
        """
        doc_text = documents[chunk.doc_id]["text"]

        def best(candidates):
            return max(candidates, key=lambda ab: (self.lexical(sentence, question, doc_text[ab[0] : ab[1]]), -ab[0]),
                       default=None)

        span = best(spans)
        if span is None or self.lexical(sentence, question, doc_text[span[0] : span[1]]) < threshold:
            doc = documents[chunk.doc_id]
            paragraphs = doc.get("paragraphs") or [(0, len(doc_text))]
            other = best([ab for a, b in paragraphs for ab in self.evidence(
                dataclasses.replace(chunk, start=a, end=b, text=doc_text[a:b]), doc_text)])
            if other is not None and (span is None or self.lexical(sentence, question, doc_text[other[0] : other[1]])
                                      > self.lexical(sentence, question, doc_text[span[0] : span[1]])):
                # The sentence is still the chunk speaker's when it lies in the same paragraph.
                same = _same_paragraph(documents[chunk.doc_id], chunk.start, other[0])
                return Citation(chunk.doc_id, chunk.title, chunk.speaker if same else None,
                                other[0], other[1], doc_text[other[0] : other[1]])
        if span is None:
            return None
        return Citation(chunk.doc_id, chunk.title, chunk.speaker, span[0], span[1], doc_text[span[0] : span[1]])


@functools.lru_cache(maxsize=1024)
def _names(sentence: str) -> frozenset[str]:
    return frozenset(n.lower() for n in find_names(nfkc(sentence)))


def _same_paragraph(doc: Mapping, a: int, b: int) -> bool:
    """Do offsets `a` and `b` of the document lie in one of its paragraphs (doc["paragraphs"], [start, end] pairs)?"""
    return any(start <= a < end and start <= b < end for start, end in doc.get("paragraphs") or ())

