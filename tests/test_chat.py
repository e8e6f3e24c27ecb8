"""A chat turn and the operators' actions without a browser or Gradio (rag/chat.py): the real seed article and
model where answers matter, fakes only for plumbing (a rebuild in progress, an LLM's stream)."""
import datetime as dt
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from rag.answering import Answer, Citation, LiveQA, StreamEvent
from rag.building import build
from rag.chat import (FIRST_BUILD, GENERATION_FAILED, NO_INDEX, REBUILDING, TYPING_DELAY, Chat, Rated, Session,
                      filter_problem, parse_filters, question_html)
from rag.operators import LoginGuard, Operators, local_time, preview_html
from rag.chunking import chunk_article
from rag.config import Config
from rag.corpus import load_corpus
from rag.feedback import FeedbackStore
from rag.llm import GenerationError
from rag.support import CheckedSentence
from rag.rendering import answer_html, answer_text, message_html, writing_html
from rag.retrieval import Filters
from rag.serving import Rebuilder
from rag.uploads import LARGE_ARTICLE_PASSAGES, inspect_upload

from .conftest import ROOT, SEED, corpus_in

DATA = Path(__file__).parent / "data"
READING_DAY = DATA / "samples" / "reading-day.md"
XSS = DATA / "xss_article.txt"
WHERE = "报告会在哪里举行？"


class Running:
    """A Rebuilder stand-in that is always mid-rebuild (plumbing: the chat only asks whether one runs)."""

    running = True


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture(scope="module")
def seed_index(tmp_path_factory, real_embedder) -> Config:
    root = tmp_path_factory.mktemp("chat")
    config = Config(corpus_dir=corpus_in(root), index_dir=root / "index")
    build(config, real_embedder)
    return config


@pytest.fixture
def chat(seed_index, real_embedder):
    sleeps = []
    chat = Chat(LiveQA(seed_index, real_embedder), Rebuilder(seed_index, real_embedder), sleep=sleeps.append)
    chat.sleeps = sleeps
    return chat


def run(chat, question, session=Session(), *filters, at=1):
    return list(chat.turn(question, session, *filters, at=at))


# ---------------------------------------------------------------- no UI in the chat, no cycle


def test_the_chat_needs_no_gradio_and_rag_never_imports_app():
    code = ("import sys; import rag.chat; assert 'gradio' not in sys.modules, 'rag.chat imported gradio'; "
            "import rag.cli, rag.web; assert 'app' not in sys.modules, 'rag imported the top-level app'")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "tests", capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------- a chat turn


def test_a_turn_shows_a_placeholder_types_the_answer_and_keeps_it_for_rating(chat):
    session = Session()
    replies = run(chat, WHERE, session, at=5)
    answer = chat.live.get().ask(WHERE)
    assert replies[0].html == message_html("…")
    typed = [r.html for r in replies[1:-1]]
    assert typed and all("▍" in t for t in typed) and len(typed) == len(chat.sleeps)
    assert chat.sleeps == [TYPING_DELAY] * len(typed)
    assert replies[-1].html == answer_html(answer, WHERE, Filters(), None)
    assert "慎行楼" in replies[-1].html and "理解为：报告会在哪里举行？" in replies[-1].html
    rated = replies[-1].session.turns[5]
    assert rated == Rated(WHERE, WHERE, answer.answer, True, rated.citations, chat.live.get().index.version)
    assert rated.citations and rated.citations[0]["doc_id"] == answer.citations[0].doc_id
    assert all(r.session is session for r in replies[:-1]) and session.turns == {}  # the old session is untouched


def test_a_follow_up_is_understood_through_the_focus(chat):
    first = run(chat, "王继元讲了什么？")[-1].session
    assert first.focus == "王继元"
    follow = run(chat, "他提到了哪些后勤理念？", first, at=3)[-1]
    assert "理解为：王继元提到了哪些后勤理念？" in follow.html
    assert follow.session.turns[3].understood == "王继元提到了哪些后勤理念？"
    assert follow.session.turns[3].question == "他提到了哪些后勤理念？"
    assert set(follow.session.turns) == {1, 3}


def test_filters_narrow_the_turn_or_say_why_nothing_passes(chat):
    final = run(chat, "报告的题目是什么？", Session(), ["王任"], "", "")[-1].html
    assert "筛选：发言人：王任" in final and "王任（党委常委、副校长）" in final
    chat.sleeps.clear()
    for problem, filters in [("格式不对", ([], "2023/07/04", "")), ("晚于截止日期", ([], "2023-08-01", "2023-07-01")),
                             ("没有发言人「王沪宁」", (["王沪宁"], "", "")),
                             ("没有文章符合筛选条件（日期：最早 至 2023-07-03）", ([], "", "2023-07-03"))]:
        (notice,) = run(chat, WHERE, Session(), *filters)  # said at once, with nothing to rate
        assert problem in notice.html and 'class="rag-notice"' in notice.html and not notice.session.turns
    assert not chat.sleeps


def test_an_empty_or_overlong_question_gets_its_message_and_no_rating(chat):
    (*_, final) = run(chat, "")
    assert "请输入一个问题" in final.html and final.session.turns == {}
    assert "问题太长" in run(chat, "问" * 10_000)[-1].html
    assert question_html("") == message_html("（空问题）")
    assert question_html("问" * 301) == message_html("问" * 300 + "…（共 301 个字符）")


def test_without_an_index_the_chat_says_so(tmp_path, fake_embedder):
    config = Config(corpus_dir=corpus_in(tmp_path), index_dir=tmp_path / "index")
    live = LiveQA(config, fake_embedder)
    idle = Chat(live, Rebuilder(config, fake_embedder))
    (reply,) = run(idle, WHERE)
    assert reply.html == message_html(NO_INDEX, "rag-notice")
    assert idle.answer_text(WHERE) == NO_INDEX
    assert Chat(live, Running()).answer_text(WHERE) == FIRST_BUILD
    page = idle.page()
    assert page.headline == f"**注意：** {NO_INDEX}" and page.speakers == [] and page.shown == (None, False)
    assert idle.page(page.shown) is None  # nothing changed: the page is left as it is


def test_the_api_answers_as_text_with_comma_separated_speakers(chat):
    text = chat.answer_text("报告的题目是什么？", "王任，李俊峰")
    assert "筛选：发言人：王任、李俊峰" in text
    assert text == answer_text(chat.live.get().ask("报告的题目是什么？", Filters(("王任", "李俊峰"))), "报告的题目是什么？",
                               Filters(("王任", "李俊峰")))
    during = Chat(chat.live, Running()).answer_text(WHERE)
    assert REBUILDING.format(version=chat.live.get().index.version) in during


def writer(qa, items, fail: Exception | None = None):
    """The QA with its answerer replaced by a scripted LLM stream (plumbing: what a generator yields)."""
    def stream(question, filters=None):
        yield from items
        if fail is not None:
            raise fail
        yield StreamEvent("answer", answer=Answer(question, "报告会在慎行楼乐之厅举行。", True, ()))

    return SimpleNamespace(index=qa.index, stream=stream)


def test_a_generated_answer_shows_as_written_and_a_retry_clears_it(chat):
    qa = chat.live.get()
    cited = Citation("d", "学校举行报告会", "王任", 0, 4, "乐之厅")
    sentence = CheckedSentence("报告会在乐之厅。", (1,), 0.9, (0,), (cited,))
    chat.live = SimpleNamespace(get=lambda: writer(qa, [
        StreamEvent("text", "报告"), StreamEvent("text", "会"), StreamEvent("retry", "unsupported"),
        StreamEvent("text", "报告会"), StreamEvent("sentence", sentence=sentence)]))
    shown = [r.html for r in run(chat, WHERE)]
    assert shown[1:5] == [writing_html("报告", []), writing_html("报告会", []), writing_html("", []),
                          writing_html("报告会", [])]
    assert shown[5] == writing_html("报告会", [cited])
    assert "报告会在慎行楼乐之厅举行。" in shown[-1] and not chat.sleeps  # written, so not typed out again


def test_a_failing_llm_ends_the_turn_with_a_notice(chat):
    qa = chat.live.get()
    chat.live = SimpleNamespace(get=lambda: writer(qa, [StreamEvent("text", "报告")], GenerationError("server down")))
    replies = run(chat, WHERE)
    assert replies[-1].html == message_html(GENERATION_FAILED.format(error="server down"), "rag-notice")
    assert replies[-1].session.turns == {}


def test_ratings_are_recorded_for_answers_only(chat, tmp_path):
    store = FeedbackStore(tmp_path / "f.sqlite3")
    session = run(chat, WHERE, at=1)[-1].session
    assert chat.rate(store, session, 1, True) == "谢谢，反馈已记录。"
    assert chat.rate(store, session, 1, None) == "已撤回反馈。"
    assert chat.rate(store, session, 3, False) is None  # a notice, or a message of the user's
    rows = store.rows()
    assert [r["rating"] for r in rows] == ["up", "none"] and rows[0]["question"] == WHERE
    assert rows[0]["index_version"] == chat.live.get().index.version


def test_the_page_shows_the_index_its_speakers_dates_and_checked_examples(chat):
    qa = chat.live.get()
    chat._check_examples(qa)  # what examples_ready starts in the background
    page = chat.page()
    assert page.speakers == sorted(["李俊峰", "张根华", "王任", "王继元", "张振宇"])
    assert (page.date_from_hint, page.date_to_hint) == ("最早 2023-07-04", "最新 2023-07-04")
    assert page.examples and all(q.endswith("？") for q in page.examples)
    assert page.headline.startswith("当前索引：1 篇文章") and page.shown == (qa.index.version, True)
    assert chat.page(page.shown) is None


# ---------------------------------------------------------------- filters and small texts


def test_filters_come_from_the_form():
    assert parse_filters(["王任"], " 2023-07-01 ", "") == Filters(("王任",), "2023-07-01", None)
    assert not parse_filters(None, None, None)
    with pytest.raises(ValueError, match="截止日期「7月4日」格式不对"):
        parse_filters([], "", "7月4日")


def test_filters_that_match_nothing_say_so(tmp_path):
    shutil.copy(XSS, tmp_path / XSS.name)
    (article,), _ = load_corpus(tmp_path, Config())
    chunks = chunk_article(article, Config())
    assert filter_problem(Filters(), chunks) is None
    assert filter_problem(Filters(speakers=("刘洋",)), chunks) is None
    assert "晚于截止日期" in filter_problem(Filters(date_from="2023-10-01", date_to="2023-09-01"), chunks)
    assert filter_problem(Filters(speakers=("王沪宁",)), chunks) == "索引中没有发言人「王沪宁」，请从发言人列表中选择。"
    assert filter_problem(Filters(speakers=("王沪宁", "刘洋")), chunks) is None  # one of them is known
    late = filter_problem(Filters(date_from="2024-01-01"), chunks)
    assert late == "没有文章符合筛选条件（日期：2024-01-01 至 最新）（已收录的文章在 2023-09-12 至 2023-09-12 之间），请放宽筛选后再问。"


def test_times_are_shown_local_and_readable():
    utc = dt.datetime(2024, 5, 1, 8, 30, tzinfo=dt.timezone.utc)
    assert local_time(utc.isoformat()) == utc.astimezone().strftime("%Y-%m-%d %H:%M")
    assert local_time("2024-05-01T08:30:00.123456") == "2024-05-01 08:30"
    assert local_time(None) == "（未知）" and local_time("garbage") == "garbage"


# ---------------------------------------------------------------- the operators


def test_wrong_passwords_back_off_then_lock_out_one_client_only():
    clock = Clock()
    guard = LoginGuard("secret", lock_after=5, lockout=900, clock=clock)
    assert guard.attempt("guesser", "a") == (False, "密码不正确。请 1 秒后再试。")
    # Too early: refused without looking at the password, the right one included.
    assert guard.attempt("guesser", "secret") == (False, "尝试太频繁，请 1 秒后再试。")
    assert guard.attempt("staff", "secret") == (True, "")  # another client logs in at once
    waits = []
    for _ in range(3):
        clock.now += 60
        ok, message = guard.attempt("guesser", "b")
        waits.append(message)
    assert waits == ["密码不正确。请 2 秒后再试。", "密码不正确。请 4 秒后再试。", "密码不正确。请 8 秒后再试。"]
    clock.now += 60
    assert guard.attempt("guesser", "c") == (False, "密码不正确。错误次数过多，已锁定，请 15 分钟后再试。")
    clock.now += 600
    assert guard.attempt("guesser", "secret") == (False, "尝试太频繁，请 5 分钟后再试。")
    assert guard.attempt("staff", "secret")[0] and guard.attempt("other", "x")[1] == "密码不正确。请 1 秒后再试。"
    clock.now += 301
    assert guard.attempt("guesser", "secret") == (True, "")
    assert guard.attempt("guesser", "wrong")[1] == "密码不正确。请 1 秒后再试。"  # a success starts afresh


def test_large_articles_are_flagged_in_the_preview(tmp_path):
    paragraphs = "\n\n".join(f"第{i}段。" + "学校召开了工作会议，会议研究部署了下一阶段的重点任务。" * 6
                               for i in range(LARGE_ARTICLE_PASSAGES * 2))
    text = "学校召开工作会议\n发布时间：2023-09-01\n\n" + paragraphs
    big = inspect_upload("big.txt", text.encode(), tmp_path, Config())
    assert big.ok and big.articles[0].segments > LARGE_ARTICLE_PASSAGES
    assert "异常大" in big.articles[0].warning
    normal = inspect_upload(SEED.name, SEED.read_bytes(), tmp_path, Config())
    assert normal.articles[0].warning is None
    table = preview_html([big, normal])
    assert table.count("异常大") == 1 and table.count("可以添加") == 2 and "已添加" not in table
    added = preview_html([big, normal], added=True)
    assert "可以添加" not in added and added.count("已添加") == 2
    assert not any(ord(ch) > 0x2600 and ord(ch) < 0x2800 or ord(ch) >= 0x1F000 for ch in table + added)  # no emoji


@pytest.fixture
def operators(tmp_path, fake_embedder):
    config = Config(corpus_dir=corpus_in(tmp_path), index_dir=tmp_path / "index", model=fake_embedder.name)
    live = LiveQA(config, fake_embedder)
    return Operators(Chat(live, Rebuilder(config, fake_embedder, on_done=live.get)), poll=0.01)


def test_operators_preview_add_and_rebuild(operators, tmp_path):
    corpus = operators.config.corpus_dir
    assert operators.status().startswith(f"**索引状态：** {NO_INDEX}")
    (*_, first) = operators.rebuild()
    assert "重建完成：版本" in first.text and "1 篇文章" in first.text and first.preview is None
    assert "| 文章数 |" in first.status and "保留的版本" in first.status
    copy = tmp_path / "copy.txt"
    shutil.copy(SEED, copy)
    uploads = operators.preview([READING_DAY, copy, tmp_path / "gone.txt"])
    assert [u.ok for u in uploads] == [True, False, False]
    assert "内容相同" in uploads[1].error and "无法读取上传的文件" in uploads[2].error
    assert list(corpus.iterdir()) == [corpus / SEED.name]  # previewing writes nothing
    steps = list(operators.add_and_rebuild(uploads))
    assert all(s.preview == preview_html(uploads, added=True) for s in steps)
    assert steps[-1].text.startswith("已添加：reading-day.md\n") and "2 篇文章" in steps[-1].text
    assert (corpus / READING_DAY.name).exists() and len(operators.live.get().index.documents) == 2


def test_operators_are_told_why_nothing_was_added(operators):
    (refused,) = operators.add_and_rebuild([])
    assert refused.text == "没有可以添加的文件：请先上传并检查预览中的结果。" and refused.preview is None
    uploads = operators.preview([READING_DAY])
    operators.rebuilder = Running()
    (busy,) = operators.add_and_rebuild(uploads)
    assert busy.text == "已有一次重建正在进行，请等它完成后再添加。" and busy.preview is None
    assert not (operators.config.corpus_dir / READING_DAY.name).exists()


def test_a_failed_rebuild_says_the_chat_keeps_the_old_index(tmp_path, fake_embedder):
    (tmp_path / "corpus").mkdir()
    config = Config(corpus_dir=tmp_path / "corpus", index_dir=tmp_path / "index")
    ops = Operators(Chat(LiveQA(config, fake_embedder), Rebuilder(config, fake_embedder)), poll=0.01)
    (*_, last) = ops.rebuild()
    assert "重建失败：" in last.text and last.text.endswith("聊天继续使用原来的索引。")
