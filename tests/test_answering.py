"""Unit tests of the extractive answerer's pieces: question checks, word matching, answer kinds."""
import pytest

from rag.answering import QuestionError, _has_kind, _matches, check_question
from rag.config import Config
from rag.lexical import ChineseTokenizer


def test_check_question_cleans_and_refuses_with_reasons():
    config = Config()
    assert check_question("  王任讲了什么？🙂 ", config) == "王任讲了什么？"
    for bad, fragment in [("", "请输入"), (" \n ", "请输入"), ("好" * 501, "太长"), ("What is this?", "中文"),
                          ("👍👍", "中文")]:
        with pytest.raises(QuestionError, match=fragment):
            check_question(bad, config)


@pytest.mark.parametrize("word, passage, expected", [
    ("主持", "党委常委、副校长徐惠钢主持会议", True),      # a word that starts a longer passage word
    ("校长", "党委常委、副校长徐惠钢主持会议", False),     # not one that ends it: 校长 is not 副校长
    ("讲", "他指出,后勤工作是学校管理的重要组成部分", True),  # the class of speech verbs
    ("讲", "被自称校长的男子带去就诊", False),             # "称" alone does not make 自称 a speech verb
    ("会上", "学校举行系列专题报告会", True),             # a meeting word answers "at the meeting"
    ("科研经费", "为教学服务、为科研服务", False),
])
def test_question_words_match_passage_words(word, passage, expected):
    tokens = set(ChineseTokenizer().tokenize(passage))
    assert _matches(word, tokens) is expected


@pytest.mark.parametrize("kind, question, span, expected", [
    ("where", "报告会在哪里举行？", "学校在慎行楼乐之厅举行报告会。", True),
    ("where", "报告会在哪里举行？", "系统阐述了图书馆转型发展。", False),
    ("when", "哪一天举行的？", "7月4日,学校举行报告会。", True),
    ("number", "一共有多少人参加？", "7月4日,学校举行报告会。", False),
    ("number", "一共有多少人参加？", "共有300余人参加。", True),
    ("who", "谁主持会议？", "党委常委、副校长徐惠钢主持会议。", True),
    ("role", "张振宇是哪个单位的？", "苏州大学党校常务副校长张振宇", True),
    ("title", "报告的题目是什么？", "王任就如何推进高质量学工体系建设作《通达学情》专题报告。", True),
    ("title", "报告的题目是什么？", "她指出,“领”字,要突出思想引领。", False),
])
def test_answer_kinds(kind, question, span, expected):
    assert _has_kind(kind, question, span) is expected
