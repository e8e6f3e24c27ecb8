from rag.chunking import chunk_article, pack_sentences, roles_from_overview, split_sentences
from rag.config import Config
from rag.corpus import load_corpus

from .conftest import SEED_ID


def seed_chunks(seed_corpus, **cfg):
    config = Config(**cfg)
    articles, _ = load_corpus(seed_corpus, config)
    return articles[0], chunk_article(articles[0], config)


def test_split_sentences_keeps_closing_quotes_and_offsets():
    text = "他说：“好。”她走了！还有；最后"
    spans = split_sentences(text, start=10)
    assert [text[s.start - 10 : s.end - 10] for s in spans] == ["他说：“好。”", "她走了！", "还有；", "最后"]


def test_pack_sentences_respects_size_and_overlap():
    text = "甲甲甲。乙乙乙。丙丙丙。丁丁丁。"
    spans = pack_sentences(text, split_sentences(text), size=8, overlap=4)
    pieces = [text[s.start : s.end] for s in spans]
    assert pieces == ["甲甲甲。乙乙乙。", "乙乙乙。丙丙丙。", "丙丙丙。丁丁丁。"]
    assert all(len(p) <= 8 for p in pieces)


def test_pack_sentences_never_cuts_a_sentence_that_fits():
    text = "一二三四五六。七八九。十一二三四五六七八九，五六七八九十。"
    spans = pack_sentences(text, split_sentences(text), size=12, overlap=0)
    pieces = [text[s.start : s.end] for s in spans]
    assert pieces[0] == "一二三四五六。七八九。"
    # The last sentence alone is over the limit, so it is cut at its comma, not mid-clause.
    assert pieces[1:] == ["十一二三四五六七八九，", "五六七八九十。"]


def test_roles_from_overview_shares_role_across_a_list():
    roles = roles_from_overview("上午,校党委副书记李俊峰,党委常委、副校长张根华、王任分别作专题报告。",
                                ["李俊峰", "张根华", "王任"])
    assert roles == {"李俊峰": "校党委副书记", "张根华": "党委常委、副校长", "王任": "党委常委、副校长"}


def test_seed_speech_segments_know_speaker_role_and_title(seed_corpus):
    article, chunks = seed_chunks(seed_corpus)
    speech = [c for c in chunks if c.kind == "speech"]
    assert {c.speaker for c in speech} == {"李俊峰", "张根华", "王任", "王继元", "张振宇"}
    by_speaker = {c.speaker: c for c in speech}
    assert by_speaker["李俊峰"].role == "校党委副书记"
    assert by_speaker["王任"].role == "党委常委、副校长"
    assert by_speaker["王继元"].role == "校党委常委、副校长"
    assert by_speaker["张振宇"].role == "苏州大学党校常务副校长、党委组织部副部长、考核办副主任"
    assert by_speaker["张根华"].report_title == "识变与求变"
    assert by_speaker["李俊峰"].report_title == "学校高质量发展综合考核工作的思考"
    assert all(c.doc_id == SEED_ID and c.date == "2023-07-04 19:40" for c in chunks)


def test_every_chunk_offset_points_into_the_document(seed_corpus):
    article, chunks = seed_chunks(seed_corpus)
    for c in chunks:
        assert article.text[c.start : c.end] == c.text
        assert ".jpg" not in c.text
    kinds = {c.kind for c in chunks}
    assert {"meta", "credits", "overview", "speech"} <= kinds
    credits = next(c for c in chunks if c.kind == "credits")
    assert "王保红/摄影" in credits.text and "摄影" in credits.search_text
    meta = next(c for c in chunks if c.kind == "meta")
    assert "阅读:2214" in meta.text


def test_chunk_size_bounds_segments(seed_corpus):
    for size in (80, 160, 300):
        _, chunks = seed_chunks(seed_corpus, chunk_size=size, chunk_overlap=20)
        body = [c for c in chunks if c.kind in ("speech", "overview")]
        assert all(len(c.text) <= size for c in body)
        # Every speech chunk ends at a sentence end unless a single sentence was over the limit.
        ends = [c for c in body if c.text[-1] in "。！？；;!?”"]
        assert len(ends) >= len(body) * 0.7
