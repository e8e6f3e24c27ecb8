"""Candidate answer spans of the retrieved passages, the signals that say whether one answers a question, and
the fitted model that weighs them (rag/models/answerer.json, made by training/fit_answerer.py).

Every signal is one that carries over between articles: how close in meaning the span and its passage are to
the question (mE5 cosines, cached per span at build time), how much of the question's wording and characters it
shares (idf-weighted, with the passage's context), whether it holds the kind of thing asked (a person, a time, a
place, a number, a title, an organisation, a role: jieba's part-of-speech tags and patterns), whether the names
and numbers of the question appear around it, and the retriever's scores and rank.
"""
from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .chunking import Chunk
from .questions import KINDS, asked_kinds, focus_words, is_english, simplified
from .text import nfkc

MODEL_PATH = Path(__file__).parent / "models" / "answerer.json"
MODEL_FORMAT = 1

# None of the Chinese patterns in this module was fitted to data: they are the numerals, measure words, time
# words, place/organisation suffixes and role titles of Chinese grammar and news usage, written down once before
# any evaluation. How much each one counts is fitted on training/qa.jsonl only (training/fit_answerer.py).
_NUM = r"[0-9０-９零〇一二两三四五六七八九十百千万亿]"
# What a span holds, by kind; person, place and organisation names also come from jieba's tags (see _tags).
_HOLDS = {
    "when": re.compile(rf"{_NUM}+\s*(?:年|月|日|号|时|点|分|点钟)|凌晨|上午|下午|晚上|中午|傍晚|今年|去年|近日|日前|星期|周[一二三四五六日末]|\d{{4}}-\d{{1,2}}"),
    "where": re.compile(r"在[^，,。；;]{1,20}?(?:举行|召开|举办|进行|开展|开幕|落幕)|[\u4e00-\u9fff]{1,10}(?:省|市|县|区|镇|乡|村|街道|路|楼|厅|室|馆|堂|场|中心|基地|园)"),
    "number": re.compile(rf"{_NUM}+\s*(?:多|余)?\s*(?:%|％|人|名|位|个|次|项|家|所|场|天|年|岁|届|支|条|辆|户|间|栋|批|类|种|元|万|亿|千|百|米|公里|平方|吨|小时|分钟|倍|件|台|套|部|篇|本)"),
    "title": re.compile(r"《[^》]{1,60}》|“[^”]{2,40}”|主题|题为"),
    "org": re.compile(r"[\u4e00-\u9fff]{2,}(?:公司|集团|局|委员会|委|院|大学|学院|学校|中学|小学|协会|学会|中心|部|厅|办公室|办|所|队|银行|医院|政府)"),
    "role": re.compile(r"书记|校长|院长|主任|部长|局长|处长|科长|主席|经理|董事长|总裁|教授|老师|委员|秘书长|县长|市长|省长|镇长|队长|会长|所长|厅长|司长|主任委员|负责人|专家|代表"),
}
ROLE_WORDS = _HOLDS["role"]
_CJK_RUN = re.compile(r"[\u4e00-\u9fff]+")


@functools.lru_cache(maxsize=65536)
def _names(text: str) -> tuple[tuple[str, str], ...]:
    """(tag, word) of the names in `text` by jieba's part-of-speech tags: nr person, ns place, nt organisation."""
    import jieba.posseg

    return tuple((flag, word) for word, flag in jieba.posseg.cut(text) if flag in ("nr", "ns", "nt") and len(word) >= 2)


_TAG = {"who": "nr", "where": "ns", "org": "nt"}


def holds(kind: str, text: str, question: str = "") -> bool:
    """Does `text` contain the kind of thing asked, other than what the question itself says?

    holds("when", "10月10日凌晨3时25分") -> True; holds("who", "王任作报告", "王任作了什么报告") -> False
    """
    tag = _TAG.get(kind)
    if tag and any(t == tag and w not in question for t, w in _names(text)):
        return True
    if kind == "who":
        return False
    return any(m.group() not in question for m in _HOLDS[kind].finditer(text))


@functools.lru_cache(maxsize=1)
def general_idf() -> dict[str, float]:
    """jieba's idf table for general Chinese (shipped in the wheel); "<median>" for unseen words."""
    import jieba.analyse

    table = dict(jieba.analyse.default_tfidf.idf_freq)
    table["<median>"] = float(np.median(list(table.values())))
    return table


def _bigrams(text: str) -> set[str]:
    return {run[i : i + 2] for run in _CJK_RUN.findall(text) for i in range(len(run) - 1)}


def _entities(question: str) -> list[str]:
    """Names, places, organisations, numbers and roles of a (simplified) question, which a span's
    passage must contain for the span to be about the same thing."""
    import jieba.posseg

    out = [w for w, f in jieba.posseg.cut(question) if len(w) >= 2 and f in ("nr", "ns", "nt", "nz")]
    out += re.findall(r"\d+", question)
    out += ROLE_WORDS.findall(question)
    return list(dict.fromkeys(out))


@dataclass(frozen=True)
class Candidate:
    """One answer span: a sentence (or a clause run of a long one) of a retrieved chunk."""

    hit_rank: int  # rank of its chunk among the retrieved hits (0 = best)
    chunk: Chunk
    start: int  # offsets into the document text
    end: int
    text: str
    span_row: int  # its row in the index's spans (and span embeddings)


FEATURES = (
    "span_cos", "span_cos_gap", "chunk_cos", "chunk_cos_gap", "fused_rel", "bm25_rel", "log_rank",
    "cover", "cover_ctx", "bigram", "bigram_ctx", "entity_missing", "entity_missing_span", "novelty", "log_len",
    "english", "english_span_cos", "english_chunk_cos", "speaker_segment", "meta_chunk", "asked_any",
    "unit_match", "neighbour_cos", "span_cos_rank", "cover_gap", "bigram_gap", "role_bound", "asks_role_person",
    "focus", "focus_chars", "focus_neighbour", "has_focus",
    *(f"has_{k}" for k in KINDS), *(f"miss_{k}" for k in KINDS),
)
# The question-level signals the decline gate weighs: the ranker's confidence and its chosen span's features.
GATE_FEATURES = ("top_prob", "top_score", "margin", "span_cos", "chunk_cos", "entity_missing",
                 "entity_missing_span", "cover", "cover_ctx", "bigram", "bigram_ctx", "english", "asked_any",
                 "miss_any", "fused_rel", "log_rank", "unit_match", "novelty", "role_bound", "asks_role_person",
                 "focus", "has_focus")
# "多少天" is answered by "5天", "多少钱" by "750万元": the measure word after a question number word.
_ASK_UNIT = re.compile(r"(?:多少|几)\s*([\u4e00-\u9fff])")
_MONEY = {"钱": "元|万|亿|美元"}
# The grain of time a question asks for ("几点" wants a clock time, "哪一年" a year).
_WHEN_GRAIN = ((re.compile(r"几点|几时|什么时间|what time"), r"\d+\s*(?:时|点)|[零一二两三四五六七八九十]+(?:时|点)"),
               (re.compile(r"哪天|哪一天|几号|几月几日|日期|什么时候|何时|which day|what date|\bwhen\b"), r"\d+\s*(?:日|号)|[一二三四五六七八九十]+(?:日|号)"),
               (re.compile(r"哪年|哪一年|which year"), r"\d{2,4}\s*年|[零〇一二三四五六七八九]{2,4}年"))


class Featurizer:
    """Feature rows for the candidates of one question (see FEATURES)."""

    features = FEATURES

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._tok = functools.lru_cache(maxsize=65536)(lambda text: frozenset(tokenizer.tokenize(text)))

    def _weights(self, question: str) -> dict[str, float]:
        idf = general_idf()
        return {t: idf.get(t, idf["<median>"]) for t in self._tok(question)}

    @staticmethod
    def _cover(weights: dict[str, float], tokens: frozenset[str]) -> float:
        """Share of question weight among `tokens`; a question word that starts a longer word counts."""
        total = sum(weights.values())
        if not total:
            return 0.0
        got = sum(w for t, w in weights.items() if t in tokens or any(p.startswith(t) for p in tokens))
        return got / total

    def rows(self, question: str, hits, candidates: list[Candidate], span_cos: np.ndarray) -> np.ndarray:
        """One row of FEATURES per candidate (~70 lines): every feature's definition stands in one table, next to
        the question-level values it uses, so that the list can be read against FEATURES."""
        q = simplified(nfkc(question)).lower()
        english = float(is_english(question))
        asked = asked_kinds(q)
        weights = self._weights(q)
        qbigrams = _bigrams(q)
        entities = _entities(q)
        top_score = max((h.score for h in hits), default=1.0) or 1.0
        top_bm25 = max((h.bm25_score or 0.0 for h in hits), default=0.0) or 1.0
        chunk_cos = np.array([hits[c.hit_rank].dense_score or 0.0 for c in candidates])
        unit = _ASK_UNIT.search(q)
        unit_re = re.compile(rf"{_NUM}+\s*(?:多|余)?\s*(?:{_MONEY.get(unit.group(1), re.escape(unit.group(1)))})") if unit else None
        grain = next((re.compile(g) for ask, g in _WHEN_GRAIN if ask.search(q)), None)
        unit_re = unit_re or grain
        # A role the question names ("园长", "司长") must stand next to a name in the span to answer "who is it".
        roles = ROLE_WORDS.findall(q)
        bound = re.compile("|".join(rf"{r}[\u4e00-\u9fff]{{2,3}}|[\u4e00-\u9fff]{{2,3}}{r}" for r in roles)) if roles else None
        cos_rank = np.argsort(np.argsort(-span_cos))
        idf = general_idf()
        focus = {w: idf.get(w, idf["<median>"]) for w in focus_words(q)}
        contexts: dict[int, str] = {}
        out = np.zeros((len(candidates), len(FEATURES)), dtype=np.float64)
        for n, c in enumerate(candidates):
            hit = hits[c.hit_rank]
            span = simplified(nfkc(c.text)).lower()
            if c.hit_rank not in contexts:
                contexts[c.hit_rank] = simplified(hit.chunk.search_text).lower()
            ctx = contexts[c.hit_rank]
            span_tokens, ctx_tokens = self._tok(span), self._tok(ctx)
            missing = [e for e in entities if e not in ctx]
            q_chars = set(q)
            row = {
                "span_cos": span_cos[n], "span_cos_gap": span_cos[n] - span_cos.max(),
                "chunk_cos": chunk_cos[n], "chunk_cos_gap": chunk_cos[n] - chunk_cos.max(),
                "fused_rel": hit.score / top_score, "bm25_rel": (hit.bm25_score or 0.0) / top_bm25,
                "log_rank": math.log1p(c.hit_rank),
                "cover": self._cover(weights, span_tokens), "cover_ctx": self._cover(weights, ctx_tokens),
                "bigram": len(qbigrams & _bigrams(span)) / max(len(qbigrams), 1),
                "bigram_ctx": len(qbigrams & _bigrams(ctx)) / max(len(qbigrams), 1),
                "entity_missing": len(missing) / len(entities) if entities else 0.0,
                "entity_missing_span": sum(e not in span for e in entities) / len(entities) if entities else 0.0,
                "novelty": sum(ch not in q_chars for ch in span) / max(len(span), 1),
                "log_len": math.log1p(len(span)), "english": english,
                "english_span_cos": english * span_cos[n], "english_chunk_cos": english * chunk_cos[n],
                "speaker_segment": float(bool(hit.chunk.speaker)),
                "meta_chunk": float(hit.chunk.kind in ("meta", "credits")), "asked_any": float(bool(asked)),
                "unit_match": float(bool(unit_re and unit_re.search(span))),
                "neighbour_cos": max([span_cos[m] for m in (n - 1, n + 1)
                                      if 0 <= m < len(candidates) and candidates[m].hit_rank == c.hit_rank],
                                     default=span_cos[n]),
                "span_cos_rank": math.log1p(cos_rank[n]), "cover_gap": 0.0, "bigram_gap": 0.0,
                "role_bound": float(bool(bound and any(m.group() not in q for m in bound.finditer(span)))),
                "asks_role_person": float(bool(roles) and ("who" in asked or english > 0)),
                "focus_neighbour": 0.0, "has_focus": float(bool(focus)), **self._focus(focus, span),
            }
            for kind in KINDS:
                if kind in asked:
                    has = holds(kind, span, q) or (kind == "who" and bool(hit.chunk.speaker) and hit.chunk.speaker not in q)
                    row[f"has_{kind}"], row[f"miss_{kind}"] = float(has), float(not has)
                else:
                    row[f"has_{kind}"] = row[f"miss_{kind}"] = 0.0
            out[n] = [row[f] for f in FEATURES]
        for name in ("cover", "bigram"):
            col = out[:, FEATURES.index(name)]
            out[:, FEATURES.index(name + "_gap")] = col - col.max()
        col = out[:, FEATURES.index("focus")]
        for n, c in enumerate(candidates):
            out[n, FEATURES.index("focus_neighbour")] = max(
                [col[m] for m in (n - 1, n + 1) if 0 <= m < len(candidates) and candidates[m].hit_rank == c.hit_rank],
                default=0.0)
        return out

    @staticmethod
    def _focus(focus: dict[str, float], span: str) -> dict[str, float]:
        """How much of the question's focus words (questions.focus_words, idf-weighted) the span says: whole
        words, and characters (a paraphrase often keeps one: 患儿 / 患者)."""
        total = sum(focus.values())
        if not total:
            return {"focus": 0.0, "focus_chars": 0.0}
        return {"focus": sum(v for w, v in focus.items() if w in span) / total,
                "focus_chars": sum(v * sum(ch in span for ch in w) / len(w) for w, v in focus.items()) / total}


@dataclass(frozen=True)
class Linear:
    """A linear score over standardised features."""

    features: tuple[str, ...]
    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    bias: float

    def score(self, rows: np.ndarray) -> np.ndarray:
        return ((rows - self.mean) / self.scale) @ self.weights + self.bias

    @classmethod
    def fit(cls, features, rows: np.ndarray, loss, l2: float) -> "Linear":
        """Minimise loss(scores) + l2/2 |w|^2 over standardised rows (the bias is not penalised)."""
        from scipy.optimize import minimize

        mean, scale = rows.mean(axis=0), rows.std(axis=0)
        scale[scale == 0] = 1.0
        x = (rows - mean) / scale

        def objective(wb):
            w, b = wb[:-1], wb[-1]
            value, grad_z = loss(x @ w + b)
            return value + 0.5 * l2 * w @ w, np.append(x.T @ grad_z + l2 * w, grad_z.sum())

        wb = minimize(objective, np.zeros(x.shape[1] + 1), jac=True, method="L-BFGS-B").x
        return cls(tuple(features), mean, scale, wb[:-1], float(wb[-1]))

    def to_json(self) -> dict:
        return {"bias": round(self.bias, 6), "weights": dict(zip(self.features, self.weights.round(6).tolist())),
                "mean": self.mean.round(6).tolist(), "scale": self.scale.round(6).tolist()}

    @classmethod
    def from_json(cls, obj: dict, features: tuple[str, ...]) -> "Linear":
        if tuple(obj["weights"]) != features:
            raise ValueError("the model's features differ from this version's")
        return cls(features, np.array(obj["mean"]), np.array(obj["scale"]),
                   np.array([obj["weights"][f] for f in features]), float(obj["bias"]))


def softmax_loss(groups: list[np.ndarray]):
    """Listwise loss: -log of the softmax probability of a question's positive spans, summed over questions
    (`groups`: each question's (start, stop, positive mask))."""
    def loss(z: np.ndarray):
        value, grad = 0.0, np.zeros_like(z)
        for start, stop, pos in groups:
            zz = z[start:stop]
            p = np.exp(zz - zz.max())
            p /= p.sum()
            value -= float(np.log((p * pos).sum() + 1e-12))
            # d/dz of -log sum_pos p = p - p*pos/sum(p*pos)
            grad[start:stop] = p - p * pos / max((p * pos).sum(), 1e-12)
        return value, grad
    return loss


def logistic_loss(labels: np.ndarray):
    def loss(z: np.ndarray):
        p = 1.0 / (1.0 + np.exp(-z))
        value = -float(np.sum(labels * np.log(p + 1e-12) + (1 - labels) * np.log(1 - p + 1e-12)))
        return value, p - labels
    return loss


def gate_row(rows: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """The gate's features for one question from its candidates' rows and ranker scores."""
    best = int(scores.argmax())
    p = np.exp(scores - scores.max())
    second = np.partition(scores, -2)[-2] if len(scores) > 1 else scores[best] - 10.0
    f = dict(zip(FEATURES, rows[best]))
    values = {"top_prob": float(p[best] / p.sum()), "top_score": float(scores[best]),
              "margin": float(scores[best] - second),
              "miss_any": sum(f[f"miss_{k}"] for k in KINDS)}
    return np.array([values[g] if g in values else f[g] for g in GATE_FEATURES])


@dataclass(frozen=True)
class SpanModel:
    """A listwise ranker that picks the span, and a logistic gate that says whether to answer with it."""

    ranker: Linear
    gate: Linear
    threshold: float  # decline when the gate's probability that the answer is right is below this
    info: dict

    def choose(self, rows: np.ndarray) -> tuple[int, float, np.ndarray]:
        """(best candidate, probability that answering with it is right, ranker scores)."""
        scores = self.ranker.score(rows)
        g = self.gate.score(gate_row(rows, scores)[None, :])[0]
        return int(scores.argmax()), float(1.0 / (1.0 + np.exp(-g))), scores

    def with_threshold(self, threshold: float, info: dict | None = None) -> "SpanModel":
        return SpanModel(self.ranker, self.gate, threshold, {**self.info, **(info or {})})

    def save(self, path: Path) -> None:
        obj = {"format": MODEL_FORMAT, "threshold": round(self.threshold, 6),
               "ranker": self.ranker.to_json(), "gate": self.gate.to_json(), "info": self.info}
        Path(path).write_text(json.dumps(obj, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path = MODEL_PATH) -> "SpanModel":
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
        if obj.get("format") != MODEL_FORMAT:
            raise ValueError(f"{path} has answer-model format {obj.get('format')}, this version reads {MODEL_FORMAT}; "
                             "run training/fit_answerer.py")
        try:
            ranker, gate = Linear.from_json(obj["ranker"], FEATURES), Linear.from_json(obj["gate"], GATE_FEATURES)
        except (KeyError, ValueError) as e:
            raise ValueError(f"{path} does not fit this version ({e}); run training/fit_answerer.py") from None
        return cls(ranker, gate, float(obj["threshold"]), obj.get("info", {}))
