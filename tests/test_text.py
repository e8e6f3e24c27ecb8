"""rag.text: each Chinese primitive's examples, and the near-duplicates that must stay apart."""
import doctest
from types import SimpleNamespace

import rag.text
from rag.chunking import split_sentences
from rag.evaluation import answer_correct
from rag.lexical import ChineseTokenizer
from rag.text import (
    CLAUSE, CLAUSE_BREAK, CN_DATE, DATE_MENTION, FULL_STOP, PAUSE, SENTENCE_BREAK, compact, fold, nfkc,
)


def test_docstring_examples():
    result = doctest.testmod(rag.text)
    # Every pattern and normal form carries at least one example (the constants through __test__).
    assert result.failed == 0 and result.attempted >= 15


def test_semicolon_ends_a_sentence_but_not_a_dateline():
    # Chunks and citations cut at ；, but a dateline such as "来源：学工处；宣传部" is not prose.
    text = "他说：“好。”还有；最后"
    assert [text[s.start : s.end] for s in split_sentences(text)] == ["他说：“好。”", "还有；", "最后"]
    assert SENTENCE_BREAK.search("来源：学工处；宣传部") and not FULL_STOP.search("来源：学工处；宣传部")


def test_clause_ends_and_pause_marks_differ_at_the_list_comma_and_the_semicolon():
    # A clause keeps its 、-list whole ("张根华、王任" is one subject); a long sentence may be cut inside it.
    text = "张根华、王任作报告；徐惠钢主持"
    assert CLAUSE_BREAK.split(text) == ["张根华、王任作报告", "徐惠钢主持"]
    assert PAUSE.split(text) == ["张根华", "王任作报告；徐惠钢主持"]


def test_clause_keeps_fewer_closing_quotes_than_a_sentence():
    assert SENTENCE_BREAK.search("好。』").group() == "。』"
    assert [m.group() for m in CLAUSE.finditer("好。』")] == ["好。", "』"]


def test_normal_forms_differ_in_case_and_whitespace():
    text = "ＣＣＴＶ 7 月"
    assert (nfkc(text), fold(text), compact(text)) == ("CCTV 7 月", "cctv 7 月", "CCTV7月")


def test_eval_ignores_width_and_spaces_but_not_case():
    answer = SimpleNamespace(found=True, answer="ＣＣＴＶ于7月4日报道。")
    assert answer_correct({"answers_any": ["7 月 4 日"]}, answer)
    assert answer_correct({"answers_any": ["CCTV"]}, answer)
    assert not answer_correct({"answers_any": ["cctv"]}, answer)


def test_tokens_ignore_width_and_case():
    tok = ChineseTokenizer()
    assert tok.tokenize("ＣＣＴＶ报道") == tok.tokenize("cctv报道")


def test_date_patterns_parse_datelines_and_spot_mentions():
    assert CN_DATE.search("2023 年 7 月 4 日 19:40").groups() == ("2023", "7", "4", "19", "40")
    assert not CN_DATE.search("2023年举行") and DATE_MENTION.search("2023年举行")
