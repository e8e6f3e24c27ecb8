"""Follow-up rewriting and example questions, on the seed article's real speakers and chunks."""
import pytest

from rag.chunking import chunk_article
from rag.config import Config
from rag.conversation import checked_examples, example_questions, mentioned, next_focus, rewrite, well_answered
from rag.corpus import load_corpus

SPEAKERS = ["李俊峰", "张根华", "王任", "王继元", "张振宇"]


@pytest.fixture(scope="module")
def seed_chunks():
    from .conftest import SEED

    articles, _ = load_corpus(SEED.parent, Config())
    return [c for a in articles for c in chunk_article(a, Config())]


@pytest.mark.parametrize("question, focus, expected", [
    ("他提到了哪些后勤理念？", "王继元", "王继元提到了哪些后勤理念？"),
    ("她强调了什么？", "王任", "王任强调了什么？"),
    ("这个报告的题目是什么？", "张根华", "张根华的报告的题目是什么？"),
    ("该报告讲了哪三个方面？", "张根华", "张根华的报告讲了哪三个方面？"),
    ("这篇报告是关于什么的？", "李俊峰", "李俊峰的报告是关于什么的？"),
    ("该领导的职务是什么？", "张振宇", "张振宇的职务是什么？"),
    ("其报告题目是什么？", "王任", "王任报告题目是什么？"),
    ("他的报告叫什么名字？", "张根华", "张根华的报告叫什么名字？"),
])
def test_references_name_the_focus(question, focus, expected):
    assert rewrite(question, focus, SPEAKERS) == expected


@pytest.mark.parametrize("question", [
    "其他领导讲了什么？",  # 其他 is "the others", not a person
    "他们都提到了什么？",  # plural: not one speaker
    "尤其强调了哪些方面？",
    "王任讲了什么？",  # names someone already
    "报告会在哪里举行？",  # refers to nobody
])
def test_questions_without_a_reference_stay_as_asked(question):
    assert rewrite(question, "王继元", SPEAKERS) == question


def test_no_focus_no_rewrite():
    assert rewrite("他提到了哪些后勤理念？", None, SPEAKERS) == "他提到了哪些后勤理念？"


def test_a_name_put_in_is_not_rewritten_again():
    # One pass: the 其 inside a name inserted for 该报告 stays.
    assert rewrite("该报告中他提到了什么？", "李其", ["李其"]) == "李其的报告中李其提到了什么？"


def test_mentioned_in_order_longest_name_first():
    assert mentioned("张振宇和王任都讲了", SPEAKERS) == ["张振宇", "王任"]
    assert mentioned("王继元讲了什么", ["王继", "王继元"]) == ["王继元"]


def test_focus_follows_the_question_then_the_citation():
    assert next_focus("王继元讲了什么？", ["王继元"], "…", SPEAKERS, None) == "王继元"
    # A question about a speaker whose answer cites an overview passage keeps that speaker.
    assert next_focus("张振宇是哪个单位的？", [None], "苏州大学…张振宇…", SPEAKERS, "王任") == "张振宇"
    # A "who" question is about whom the answer cites.
    assert next_focus("哪位领导的报告是关于后勤工作的？", ["王继元"], "…", SPEAKERS, "王任") == "王继元"
    assert next_focus("谁提到了“六个坚持”？", [None], "张根华解读了…", SPEAKERS, None) == "张根华"
    # Nobody named or cited: the focus stays.
    assert next_focus("报告会在哪里举行？", [None], "慎行楼乐之厅", SPEAKERS, "王任") == "王任"


def test_example_questions_come_from_the_index(seed_chunks):
    questions = example_questions(seed_chunks, limit=6)
    assert len(questions) == 6
    assert questions[0] == "李俊峰讲了什么？"  # the first speaker in the article
    assert "《识变与求变》是谁作的报告？" in questions
    assert any(q.startswith("「学校举行高质量发展中层干部学习研讨班系列专题报告会」") for q in questions)
    for q in questions:  # every name or title in an example is really in the article
        assert any(s in q for s in SPEAKERS) or "《" in q or "「" in q


def _answer(question, text, found=True, speaker=None):
    from rag.answering import Answer, Citation

    cites = (Citation("d", "标题", speaker, 0, len(text), text),) if found else ()
    return Answer(question, text, found, cites, support=0.9 if found else 0.1)


@pytest.mark.parametrize("question, answer, speaker, good", [
    ("王沪宁讲了什么？", "王沪宁、栗战书、杨洁篪出席。", None, False),  # names him, is not his words
    ("王继元讲了什么？", "要坚持以师生为中心。", "王继元", True),
    ("王继元讲了什么？", "要坚持以师生为中心。", "王任", False),
    ("《识变与求变》是谁作的报告？", "张根华作了题为《识变与求变》的报告。", None, True),
    ("《识变与求变》是谁作的报告？", "报告会在慎行楼举行。", None, False),
    ("「学校召开会议」是哪天发布的？", "7月4日下午，学校召开会议。", None, True),
    ("「学校召开会议」是哪天发布的？", "学校召开会议。", None, False),
])
def test_an_example_is_kept_only_when_its_answer_gives_what_it_asks(question, answer, speaker, good):
    assert well_answered(question, _answer(question, answer, speaker=speaker), SPEAKERS) is good


def test_a_declined_example_is_dropped():
    assert not well_answered("王任讲了什么？", _answer("王任讲了什么？", "文章中没有提到「王任」。", found=False), SPEAKERS)


def test_examples_are_checked_against_the_index(seed_chunks, tmp_path, real_embedder):
    """The seed index, the real model: every example offered is answered, found and well supported."""
    from rag.answering import QA
    from rag.building import build

    from .conftest import corpus_in

    config = Config(corpus_dir=corpus_in(tmp_path), index_dir=tmp_path / "index")
    build(config, real_embedder)
    qa = QA.open(config, real_embedder)
    asked = []

    def ask(question):
        asked.append(question)
        return qa.ask(question)

    examples = checked_examples(qa.index.chunks, ask, qa.index.speakers, limit=6, tries=12)
    assert examples and set(examples) <= set(asked) and len(asked) <= 12
    for question in examples:
        answer = qa.ask(question)
        assert answer.found and well_answered(question, answer, qa.index.speakers), (question, answer.answer)
    rejected = [q for q in asked if q not in examples]
    assert all(not well_answered(q, qa.ask(q), qa.index.speakers) for q in rejected)
