"""BM25 over Chinese tokens (jieba, with the corpus's own names, roles and titles as words)."""
from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .text import fold

# Function words and question words carry no evidence; dropping them keeps BM25 and the
# answerer's overlap scores about content ("谁拍的照片" -> ["拍", "照片"]).
STOPWORDS = frozenset(
    """的 了 是 在 和 与 及 等 这 那 这个 那个 这次 这篇 哪 哪里 哪儿 哪个 哪些 哪位 哪几位 哪种 哪一天 什么 谁 如何
    怎么 怎样 怎么样 多少 几 吗 呢 吧 啊 呀 有 有没有 要 对 把 被 为 由 将 以 从 向 于 其 之 也 都 就 而 并 又
    一 个 位 我 你 他 她 它 我们 你们 他们 她们 请问 请 一下 告诉 还 哪两个 哪三个 哪五个 哪五 哪三 哪两 具体 指
    一共 所 着 过 得 地 或 中 关于 有关 对于 几位 几个 多少 哪种 怎样的 哪方面 哪几个""".split()
)
_WORD = re.compile(r"[\w\u4e00-\u9fff]")
# Bump when tokenize() changes (stopwords, normalisation, jieba settings): tokens an index keeps for reuse are
# then redone by the next build.
TOKENIZER_VERSION = 1


@functools.lru_cache(maxsize=1)
def _jieba_dictionary() -> tuple[dict[str, int], int]:
    """jieba's word frequencies and their total, read once per process (1.3 s): every tokenizer starts from a copy."""
    import jieba

    base = jieba.Tokenizer()
    base.initialize()
    return base.FREQ, base.total


class ChineseTokenizer:
    """jieba tokens, NFKC-normalised and lower-cased, without punctuation and stopwords.

    ChineseTokenizer(["慎行楼乐之厅"]).tokenize("学校在慎行楼乐之厅举行") -> ["学校", "慎行楼乐之厅", "举行"]
    """

    def __init__(self, terms: list[str] = ()):  # type: ignore[assignment]
        import jieba

        jieba.setLogLevel(60)
        self.terms = sorted(set(terms))
        self._jieba = jieba.Tokenizer()  # our own dictionary, not jieba's global one
        freq, total = _jieba_dictionary()
        # A copy: add_word below changes the dictionary.
        self._jieba.FREQ, self._jieba.total, self._jieba.initialized = dict(freq), total, True
        for term in self.terms:
            # A high frequency makes jieba prefer the whole term over its parts.
            self._jieba.add_word(term, freq=max(1000, 200 * len(term)))
        # add_word raises the dictionary total, which every word's log-probability divides by. Keeping it fixed
        # means a text's tokens change only when it contains a term that was added or removed, so a build can
        # reuse the tokens of unchanged chunks whatever else changed in the lexicon (see may_change).
        self._jieba.total = total

    @staticmethod
    def may_change(text: str, terms) -> bool:
        """Whether adding or removing `terms` from the lexicon can change the tokens of `text`:
        jieba's word graph over a text only gains or loses a word where the text contains it."""
        norm = fold(text)
        return any(t in norm for t in terms)

    def tokenize(self, text: str, search: bool = False) -> list[str]:
        """Content tokens; `search=True` adds the words inside long words, for recall in BM25.

        With search=True, "主持会议" gives ["主持", "会议", "主持会议"], so "谁主持" finds it; the answerer
        uses search=False, where "副校长" stays one word and does not answer a question about "校长".
        """
        text = fold(text)
        words = self._jieba.cut_for_search(text) if search else self._jieba.cut(text)
        return [t for t in (w.strip() for w in words) if t and t not in STOPWORDS and _WORD.search(t)]


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest positive scores, best first (ties in index order)."""
    k = min(k, int((scores > 0).sum()))
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    top = np.argpartition(-scores, k - 1)[:k]
    return top[np.argsort(-scores[top], kind="stable")]


class Scored(NamedTuple):
    """What a search returns, best first: BM25.search for one query (1-D arrays), Index.search_dense per query (2-D)."""

    ids: np.ndarray  # chunk rows (faiss pads a short dense result with -1)
    scores: np.ndarray  # the matching scores, higher is better


class BM25:
    """Okapi BM25 (Robertson & Zaragoza 2009) with the Lucene idf, scores precomputed per (doc, term)."""

    def __init__(self, vocab: dict[str, int], idf: np.ndarray, matrix, k1: float = 1.2, b: float = 0.75):
        self.vocab, self.idf, self.matrix, self.k1, self.b = vocab, idf, matrix, k1, b

    @classmethod
    def build(cls, docs: list[list[str]], k1: float = 1.2, b: float = 0.75) -> "BM25":
        from scipy.sparse import csc_matrix

        vocab: dict[str, int] = {}
        rows, cols, tfs = [], [], []
        lengths = np.array([len(d) for d in docs], dtype=np.float32)
        for i, doc in enumerate(docs):
            counts: dict[int, int] = {}
            for tok in doc:
                j = vocab.setdefault(tok, len(vocab))
                counts[j] = counts.get(j, 0) + 1
            rows += [i] * len(counts)
            cols += list(counts)
            tfs += list(counts.values())
        n = len(docs)
        rows_a, cols_a = np.array(rows, dtype=np.int64), np.array(cols, dtype=np.int64)
        tf = np.array(tfs, dtype=np.float32)
        df = np.bincount(cols_a, minlength=len(vocab)).astype(np.float32)
        idf = np.log(1 + (n - df + 0.5) / (df + 0.5)).astype(np.float32)
        avgdl = float(lengths.mean()) if n else 1.0
        norm = k1 * (1 - b + b * lengths[rows_a] / max(avgdl, 1e-9))
        weights = idf[cols_a] * tf * (k1 + 1) / (tf + norm)
        matrix = csc_matrix((weights, (rows_a, cols_a)), shape=(n, len(vocab)), dtype=np.float32)
        return cls(vocab, idf, matrix, k1, b)

    def scores(self, query: list[str]) -> np.ndarray:
        """BM25 score of every document for the query tokens (repeated tokens count again)."""
        out = np.zeros(self.matrix.shape[0], dtype=np.float32)
        for tok in query:
            j = self.vocab.get(tok)
            if j is not None:
                col = self.matrix.getcol(j)
                out[col.indices] += col.data
        return out

    def search(self, query: list[str], k: int) -> Scored:
        """The top-k documents and their scores, best first; documents with score 0 are left out."""
        s = self.scores(query)
        top = top_k(s, k)
        return Scored(top, s[top])

    def idf_of(self, tok: str) -> float:
        """idf of a token; unseen tokens get the idf of a term in no document."""
        j = self.vocab.get(tok)
        n = self.matrix.shape[0]
        return float(self.idf[j]) if j is not None else math.log(1 + (n + 0.5) / 0.5)

    def save(self, folder: Path) -> None:
        from scipy.sparse import save_npz

        save_npz(folder / "bm25_matrix.npz", self.matrix.tocsc())
        np.save(folder / "bm25_idf.npy", self.idf)
        meta = {"k1": self.k1, "b": self.b, "vocab": self.vocab}
        (folder / "bm25_vocab.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, folder: Path) -> "BM25":
        from scipy.sparse import load_npz

        meta = json.loads((folder / "bm25_vocab.json").read_text(encoding="utf-8"))
        return cls(meta["vocab"], np.load(folder / "bm25_idf.npy"), load_npz(folder / "bm25_matrix.npz").tocsc(),
                   meta["k1"], meta["b"])
