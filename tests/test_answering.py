"""Unit tests of the answerer's pieces: question checks, what a question asks, what a span holds, the model file."""
import json

import numpy as np
import pytest

from rag.config import Config
from rag.questions import (QuestionError, asked_kinds, by_pinyin, check_question, focus_words, is_english,
                           pinyin_names, simplified)
from rag.spans import FEATURES, GATE_FEATURES, MODEL_PATH, Linear, SpanModel, holds, logistic_loss, softmax_loss


def test_check_question_cleans_and_refuses_with_reasons():
    config = Config()
    assert check_question("  王任讲了什么？🙂 ", config) == "王任讲了什么？"
    assert check_question("Who chaired the meeting?", config) == "Who chaired the meeting?"
    for bad, fragment in [("", "请输入"), (" \n ", "请输入"), ("好" * 501, "太长"), ("👍👍", "提问"), ("?? 1", "提问")]:
        with pytest.raises(QuestionError, match=fragment):
            check_question(bad, config)


def test_traditional_characters_are_matched_as_simplified():
    assert simplified("報告會在哪裡舉行？") == "报告会在哪里举行？"
    assert simplified("Who chaired it?") == "Who chaired it?"


@pytest.mark.parametrize("question, kinds", [
    ("报告会在哪里举行？", {"where"}),
    ("温州那栋楼几点塌的？", {"when"}),
    ("一共有多少人参加？", {"number"}),
    ("谁主持的会议？", {"who"}),
    ("张振宇担任什么职务？", {"role"}),
    ("报告的题目是什么？", {"title"}),
    ("How many people died in the collapse?", {"number"}),
    ("Where was the forum held?", {"where"}),
    ("Who gave the speech?", {"who"}),
])
def test_asked_kinds_in_chinese_and_english(question, kinds):
    assert kinds <= asked_kinds(question)


@pytest.mark.parametrize("question, focus", [
    ("洋河镇中心卫生院的院长叫什么名字？", ("卫生院", "院长", "名字")),
    ("开封五院划伤护士的患者汪某被带到新乡做了精神鉴定，鉴定结论是什么？", ("鉴定结论",)),  # the clause that asks
    ("卫生院给全镇多少个村子的育龄女性查了身体？", ("卫生院", "全镇", "村子", "育龄")),
    ("Who chaired the meeting?", ()),
    ("王任讲话", ()),  # no question word
])
def test_focus_words_are_the_words_next_to_the_question_word(question, focus):
    assert focus_words(question) == focus


def test_english_questions_find_the_chinese_names_they_spell_in_pinyin():
    spelled = by_pinyin(["上饶", "陈勇", "王任", "背景", "北京", "会议", "会", "A股"])
    assert spelled["shangrao"] == ("上饶",) and "hui" not in spelled and "agu" not in spelled
    assert pinyin_names("Who gave the main speech at the Shangrao meeting?", spelled) == ["上饶"]
    assert pinyin_names("Which academician, Chen Yong or Wang Ren, signed it?", spelled) == ["陈勇", "王任"]
    assert pinyin_names("What was the background of the Beijing final?", spelled) == ["北京"]  # capitalised only
    assert pinyin_names("上饶会议谁讲话？ Shangrao", spelled) == []  # a Chinese question names its words itself


def test_is_english():
    assert is_english("Who chaired the meeting in Suzhou?")
    assert not is_english("NBA中心在哪里？")


@pytest.mark.parametrize("kind, span, question, expected", [
    ("when", "10月10日凌晨3时25分，房屋倒塌。", "", True),
    ("when", "系统阐述了图书馆转型发展。", "", False),
    ("number", "共搜救出28人，其中确认死亡22人。", "", True),
    ("number", "学校举行报告会。", "", False),
    ("who", "党委常委、副校长徐惠钢主持会议。", "谁主持会议", True),
    ("who", "徐惠钢主持会议。", "徐惠钢主持了什么", False),  # the name the question already says is not an answer
    ("title", "作《识变与求变》专题报告。", "", True),
    ("org", "苏州大学党校常务副校长张振宇", "", True),
    ("role", "考核办副主任张振宇", "", True),
])
def test_what_a_span_holds(kind, span, question, expected):
    assert holds(kind, span, question) is expected


def test_the_shipped_model_loads_and_is_small_and_versioned():
    obj = json.loads(MODEL_PATH.read_text(encoding="utf-8"))
    assert MODEL_PATH.stat().st_size < 20_000
    assert obj["format"] == 1 and set(obj["ranker"]["weights"]) == set(FEATURES)
    assert "qa.jsonl" in obj["info"]["trained_on"] and obj["info"]["cv"]["questions"] >= 400
    model = SpanModel.load()
    assert 0.0 < model.threshold < 1.0
    rows = np.zeros((3, len(FEATURES)))
    rows[1, FEATURES.index("span_cos")] = 1.0  # closer in meaning: ranked first
    best, support, scores = model.choose(rows)
    assert best == 1 and 0.0 <= support <= 1.0 and scores.shape == (3,)


def test_a_model_file_of_another_version_is_refused(tmp_path):
    obj = json.loads(MODEL_PATH.read_text(encoding="utf-8"))
    obj["ranker"]["weights"]["a_feature_we_do_not_have"] = 1.0
    bad = tmp_path / "answerer.json"
    bad.write_text(json.dumps(obj), encoding="utf-8")
    with pytest.raises(ValueError, match="fit_answerer"):
        SpanModel.load(bad)
    obj["format"] = 99
    bad.write_text(json.dumps(obj), encoding="utf-8")
    with pytest.raises(ValueError, match="format 99"):
        SpanModel.load(bad)


def test_fitting_finds_the_signal():
    """The two fitters recover a feature that decides the label (synthetic data: plumbing only)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 3))
    y = (x[:, 1] > 0).astype(float)
    gate = Linear.fit(("a", "b", "c"), x, logistic_loss(y), l2=1.0)
    assert np.argmax(np.abs(gate.weights)) == 1 and gate.weights[1] > 0
    # 40 questions of 10 candidates each; the positive is the one with the largest column 2.
    groups = [(10 * q, 10 * q + 10, (x[10 * q : 10 * q + 10, 2] == x[10 * q : 10 * q + 10, 2].max()).astype(float))
              for q in range(40)]
    ranker = Linear.fit(("a", "b", "c"), x, softmax_loss(groups), l2=0.1)
    assert np.argmax(ranker.weights) == 2
    assert len(GATE_FEATURES) == len(set(GATE_FEATURES))
