"""The web chat's parts without a browser: escaping, uploads, index freshness, and the running app
(in-process, real model) answering through gradio_client while an index is missing or rebuilding.
A chat turn and the operators' actions without Gradio: tests/test_chat.py."""
import functools
import os
import shutil
import socket
import stat
import threading
import urllib.error
import urllib.request
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import pytest

from rag.answering import Answer, Citation, LiveQA
from rag.building import build
from rag.chat import FIRST_BUILD, NO_INDEX
from rag.chunking import chunk_article
from rag.cli import main
from rag.config import Config
from rag.corpus import load_corpus
from rag.feedback import FeedbackStore
from rag.rendering import answer_html, answer_text
from rag.retrieval import Filters, Hit
from rag.serving import Rebuilder, ensure_index, stale_reasons
from rag.uploads import (UploadError, UploadQuota, add_uploads, fresh_upload_dir,
                         inspect_upload, safe_name)

from .conftest import SEED, corpus_in

DATA = Path(__file__).parent / "data"
XSS = DATA / "xss_article.txt"
READING_DAY = DATA / "samples" / "reading-day.md"
XSS_QUESTION = "攻击者会在留言里插入什么样的脚本代码？"


# ---------------------------------------------------------------- escaping


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attrs = set(), set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.attrs.update(name for name, _ in attrs)


@pytest.fixture(scope="module")
def xss_chunks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("xss")
    shutil.copy(XSS, folder / XSS.name)
    (article,), _ = load_corpus(folder, Config())
    return article, chunk_article(article, Config())


def cite(article, chunks, needle: str, question: str) -> Answer:
    """A found Answer citing the sentence of `needle`, as the answerer would build it."""
    start = article.text.index(needle)
    end = article.text.index("。", start) + 1
    start = article.text.rfind("。", 0, start) + 1
    hit = next(c for c in chunks if c.start <= start and end <= c.end)
    citation = Citation(article.doc_id, article.title, hit.speaker, start, end, article.text[start:end])
    hits = [Hit(hit, 1.0, 0.9, 3.0)] + [Hit(c, 0.5, 0.5, None) for c in chunks if c is not hit]
    return Answer(question, citation.text, True, (citation,), tuple(hits), support=0.9)


def test_article_markup_is_shown_as_text(xss_chunks):
    answer = cite(*xss_chunks, "<script>", XSS_QUESTION)
    page = answer_html(answer, XSS_QUESTION)
    parsed = _Tags()
    parsed.feed(page)
    # Only the markup we write; the article's <script> and <img onerror> are text.
    assert parsed.tags <= {"div", "b", "span", "blockquote", "details", "summary", "mark", "br"}
    assert parsed.attrs <= {"class"}
    assert "<mark>攻击者会在留言里插入&lt;script&gt;alert(1)&lt;/script&gt;这样的脚本代码。</mark>" in page.replace(
        "他指出,跨站脚本攻击是校园网站最常见的漏洞之一,", "")
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "\n" not in page  # one raw HTML block for the Markdown renderer
    assert "理解为：" + XSS_QUESTION in page and "刘洋（信息化建设处处长）" in page and "2023-09-12" in page


def test_user_question_is_escaped_too(xss_chunks):
    question = "<img src=x onerror=alert(1)>是什么？"
    page = answer_html(cite(*xss_chunks, "<img", question), question)
    assert "<img" not in page and "理解为：&lt;img src=x onerror=alert(1)&gt;是什么？" in page


def test_declined_answer_shows_closest_passages(xss_chunks):
    article, chunks = xss_chunks
    hits = tuple(Hit(c, 0.1, 0.1, None) for c in chunks)
    answer = Answer("学校今年的科研经费是多少？", "文章中没有提到「学校今年的科研经费」。", False, (), hits)
    page = answer_html(answer, answer.question)
    assert "文章中没有提到" in page and "最接近的段落" in page and page.count('class="rag-source"') == 3
    assert "<mark>" not in page
    text = answer_text(answer, answer.question)
    assert text.startswith("文章中没有提到") and "最接近的段落：" in text


def test_text_answer_names_its_source(xss_chunks):
    answer = cite(*xss_chunks, "<script>", XSS_QUESTION)
    lines = answer_text(answer, XSS_QUESTION, Filters(speakers=("刘洋",))).splitlines()
    assert lines[0] == answer.answer
    assert lines[1:4] == ["理解为：" + XSS_QUESTION, "筛选：发言人：刘洋", "来源："]
    assert lines[4] == "[1] 《信息化建设处举办网络安全宣传周专题讲座》 · 2023-09-12 · 刘洋（信息化建设处处长）"
    assert lines[5].strip() == f"「{answer.answer}」"


def test_an_error_shows_only_its_message():
    answer = Answer("", "请输入一个问题，例如「报告会在哪里举行？」。", False, error="请输入一个问题")
    assert answer_text(answer, "") == answer.answer
    assert "rag-sources" not in answer_html(answer, "")


# ---------------------------------------------------------------- uploads


@pytest.mark.parametrize("name, expected", [
    ("../../etc/报告 (1).TXT", "报告_1.txt"),
    ("..\\..\\windows\\a.md", "a.md"),
    ("新闻.html", "新闻.html"),
    (".hidden.jsonl", "hidden.jsonl"),
    ("a..b.txt", "a_b.txt"),
])
def test_safe_names_stay_in_the_folder(name, expected):
    assert safe_name(name) == expected


@pytest.mark.parametrize("name", ["evil.exe", "noext", "../..", ".txt", "???.md"])
def test_unusable_names_are_refused(name):
    with pytest.raises(UploadError):
        safe_name(name)


def test_preview_shows_how_an_article_parses(tmp_path):
    config = Config()
    up = inspect_upload(SEED.name, SEED.read_bytes(), tmp_path, config)
    assert up.ok, up.error
    (article,) = up.articles
    assert article.title == "学校举行高质量发展中层干部学习研讨班系列专题报告会"
    assert article.date == "2023-07-04 19:40"
    assert article.speakers == ("李俊峰", "张根华", "王任", "王继元", "张振宇")
    articles, _ = load_corpus(SEED.parent, config)
    assert article.segments == len(chunk_article(articles[0], config))
    md = inspect_upload("reading-day.md", READING_DAY.read_bytes(), tmp_path, config)
    assert md.ok and md.articles[0].title == "图书馆开展“世界读书日”主题活动"
    jsonl = inspect_upload("news.jsonl", (DATA / "samples" / "news.jsonl").read_bytes(), tmp_path, config)
    assert jsonl.ok and [a.title for a in jsonl.articles][0] == "学校召开2023年招生工作会议"
    assert list(tmp_path.iterdir()) == []  # previewing writes nothing


def test_html_upload_is_kept_and_previewed_as_the_build_reads_it(tmp_path):
    page = ("<html><head><title>网页标题</title><script>alert(1)</script></head><body>"
            "<h1>信息化建设处举办网络安全宣传周专题讲座</h1><p>2023年09月12日10时00分 阅读:356</p>"
            "<p>9月12日,信息化建设处在图书馆报告厅举办讲座。</p><p>讲座介绍了&lt;script&gt;标签的风险。</p></body></html>")
    up = inspect_upload("讲座.html", page.encode("utf-8"), tmp_path, Config())
    assert up.ok, up.error
    assert up.name == "讲座.html" and up.data == page.encode("utf-8")
    assert up.articles[0].title == "信息化建设处举办网络安全宣传周专题讲座"
    assert up.articles[0].date == "2023-09-12 10:00"
    add_uploads([up], tmp_path)
    articles, _ = load_corpus(tmp_path, Config())
    assert "alert(1)" not in articles[0].text and "讲座介绍了<script>标签的风险。" in articles[0].text


@pytest.mark.parametrize("name, data, message", [
    ("virus.exe", b"MZ\x90\x00", "不支持的文件类型"),
    ("empty.txt", b"", "空"),
    ("big.txt", "学校".encode() * 600, "太大"),
    ("binary.txt", b"abc\x00\x01\x02", "无法解析"),
    ("broken.jsonl", b'{"id": 1, "text": "\xe5\xad\xa6\xe6\xa0\xa1"}\n{not json\n', "invalid JSON"),
    ("bad.html", b"<html><script>x()</script></html>", "无法解析"),
])
def test_bad_files_get_a_clear_message_and_change_nothing(tmp_path, name, data, message):
    up = inspect_upload(name, data, tmp_path, Config(), max_bytes=1000)
    assert not up.ok and message in up.error
    assert add_uploads([up], tmp_path) == []
    assert list(tmp_path.iterdir()) == []


def test_duplicates_are_refused(tmp_path):
    config = Config()
    (tmp_path / SEED.name).write_bytes(SEED.read_bytes())
    same_name = inspect_upload(SEED.name, READING_DAY.read_bytes(), tmp_path, config)
    assert "同名文件" in same_name.error
    articles, _ = load_corpus(tmp_path, config)
    known = {a.content_hash: a.title for a in articles}
    same_text = inspect_upload("copy.txt", SEED.read_bytes(), tmp_path, config, known)
    assert "内容相同" in same_text.error


def test_add_writes_only_good_files_and_never_overwrites(tmp_path):
    corpus = tmp_path / "corpus"
    good = inspect_upload("reading-day.md", READING_DAY.read_bytes(), corpus, Config())
    bad = inspect_upload("x.exe", b"MZ", corpus, Config())
    assert add_uploads([good, bad], corpus) == [corpus / "reading-day.md"]
    assert sorted(p.name for p in corpus.iterdir()) == ["reading-day.md"]  # no temp files left
    (corpus / "reading-day.md").write_text("改过的内容", encoding="utf-8")
    with pytest.raises(UploadError, match="同名文件"):
        add_uploads([good], corpus)
    assert (corpus / "reading-day.md").read_text(encoding="utf-8") == "改过的内容"


# ---------------------------------------------------------------- index freshness


def test_stale_index_is_detected_and_rebuilt(seed_corpus, tmp_path, fake_embedder):
    config = Config(corpus_dir=seed_corpus, index_dir=tmp_path / "index")
    assert stale_reasons(config, fake_embedder) == [f"no index at {config.index_dir}"]
    assert ensure_index(config, fake_embedder) is not None
    assert stale_reasons(config, fake_embedder) == []
    assert ensure_index(config, fake_embedder) is None  # current: nothing to do

    shutil.copy(READING_DAY, seed_corpus / READING_DAY.name)
    assert stale_reasons(config, fake_embedder) == ["corpus changed: 1 added, 0 changed, 0 removed"]
    ensure_index(config, fake_embedder)
    seed = seed_corpus / SEED.name
    seed.write_text(seed.read_text(encoding="utf-8") + "\n补充一段。\n", encoding="utf-8")
    (seed_corpus / READING_DAY.name).unlink()
    assert stale_reasons(config, fake_embedder) == ["corpus changed: 0 added, 1 changed, 1 removed"]
    ensure_index(config, fake_embedder)

    class OtherModel(type(fake_embedder)):
        name, fingerprint = "other-model", "other-v1"

    assert stale_reasons(config, OtherModel()) == ["built with the model 'fake-bigrams', serving 'other-model'"]
    assert "chunk_size 160 (now 200)" in stale_reasons(config.replace(chunk_size=200), fake_embedder)


def test_a_failed_rebuild_is_reported_and_keeps_nothing_half_done(tmp_path, fake_embedder):
    (tmp_path / "corpus").mkdir()
    config = Config(corpus_dir=tmp_path / "corpus", index_dir=tmp_path / "index")
    rebuilder = Rebuilder(config, fake_embedder)
    assert rebuilder.start()
    assert rebuilder.wait(30)
    assert rebuilder.report is None and "no articles found" in rebuilder.error
    assert "rebuild failed" in rebuilder.lines[-1]
    assert not (tmp_path / "index" / "current").exists()


# ---------------------------------------------------------------- the running app


class GatedEmbedder:
    """The real model, but embedding passages waits for `gate`: holds a rebuild mid-way, deterministically."""

    def __init__(self, embedder):
        self._embedder = embedder
        self.name, self.dim, self.fingerprint = embedder.name, embedder.dim, embedder.fingerprint
        self.gate, self.waiting = threading.Event(), threading.Event()

    def encode_queries(self, texts):
        return self._embedder.encode_queries(texts)

    def encode_passages(self, texts, batch_size=16, progress=None):
        self.waiting.set()
        assert self.gate.wait(120), "the test never opened the gate"
        return self._embedder.encode_passages(texts, batch_size=batch_size)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def launch(tmp_path):
    """launch(live, rebuilder) -> gradio_client.Client of the app served in this process."""
    from gradio_client import Client

    from rag.web import create_app

    demos = []

    def _launch(live, rebuilder, **kwargs):
        kwargs.setdefault("upload_dir", tmp_path / "uploads")
        demo = create_app(live, rebuilder, FeedbackStore(tmp_path / "feedback.sqlite3"), **kwargs)
        demo.queue(default_concurrency_limit=4)
        demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
        demos.append(demo)
        return Client(demo.local_url, verbose=False)

    yield _launch
    for demo in demos:
        demo.close()


def seed_config(tmp_path) -> Config:
    return Config(corpus_dir=corpus_in(tmp_path), index_dir=tmp_path / "index")


def test_only_the_chat_is_scriptable_and_bad_questions_get_messages(tmp_path, real_embedder, launch):
    config = seed_config(tmp_path)
    build(config, real_embedder)
    live = LiveQA(config, real_embedder)
    client = launch(live, Rebuilder(config, real_embedder), admin_password="secret")
    assert set(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == {"/chat"}
    question = "报告会在哪里举行？"
    answer = client.predict(question, api_name="/chat")
    assert answer == answer_text(live.get().ask(question), question)
    assert "理解为：报告会在哪里举行？" in answer and "《学校举行高质量发展中层干部学习研讨班系列专题报告会》" in answer
    assert "请输入一个问题" in client.predict("", api_name="/chat")
    assert "问题太长（10000 个字符" in client.predict("问" * 10_000, api_name="/chat")
    assert "格式不对" in client.predict(question, "", "2023/07/04", api_name="/chat")
    filtered = client.predict("报告的题目是什么？", "王任", api_name="/chat")
    assert "王任（党委常委、副校长）" in filtered and "筛选：发言人：王任" in filtered
    for other in ("李俊峰", "张根华", "王继元", "张振宇"):
        assert f"{other}（" not in filtered  # no other speaker's passage gets through the filter
    before = client.predict(question, "", "", "2023-07-03", api_name="/chat")  # before the only article
    assert before.startswith("没有文章符合筛选条件（日期：最早 至 2023-07-03）") and "2023-07-04" in before
    assert "文章中没有提到" not in before
    assert "晚于截止日期" in client.predict(question, "", "2023-08-01", "2023-07-01", api_name="/chat")
    assert "没有发言人「王沪宁」" in client.predict(question, "王沪宁", api_name="/chat")


def test_chats_answer_from_the_old_index_while_rebuilding_then_switch(tmp_path, real_embedder, launch):
    config = seed_config(tmp_path)
    build(config, real_embedder)
    live = LiveQA(config, real_embedder)
    gated = GatedEmbedder(real_embedder)
    rebuilder = Rebuilder(config, gated, on_done=live.get)
    client = launch(live, rebuilder)
    old_version = live.get().index.version

    shutil.copy(READING_DAY, config.corpus_dir / READING_DAY.name)
    assert rebuilder.start()
    assert gated.waiting.wait(60)  # the rebuild is embedding the new article, and held there
    new_article = "图书馆开展“世界读书日”主题活动"
    during = client.predict("世界读书日主题活动在哪里举办？", api_name="/chat")
    assert f"索引正在更新：本回答来自当前版本 {old_version}" in during
    assert "理解为：" in during and new_article not in during  # answered, from the old index
    assert not rebuilder.start()  # one rebuild at a time

    gated.gate.set()
    assert rebuilder.wait(120) and rebuilder.error is None
    after = client.predict("世界读书日主题活动在哪里举办？", api_name="/chat")
    assert new_article in after and "正在更新" not in after
    assert live.get().index.version != old_version


def test_a_question_during_the_first_build_says_to_wait(tmp_path, real_embedder, launch):
    config = seed_config(tmp_path)
    live = LiveQA(config, real_embedder)
    gated = GatedEmbedder(real_embedder)
    rebuilder = Rebuilder(config, gated, on_done=live.get)
    client = launch(live, rebuilder)
    assert client.predict("报告会在哪里举行？", api_name="/chat") == NO_INDEX
    rebuilder.start()
    assert gated.waiting.wait(60)
    assert client.predict("报告会在哪里举行？", api_name="/chat") == FIRST_BUILD
    gated.gate.set()
    assert rebuilder.wait(120)
    assert "理解为：报告会在哪里举行？" in client.predict("报告会在哪里举行？", api_name="/chat")


def test_serve_refuses_a_bad_port(capsys):
    assert main(["serve", "--port", "http"]) == 2  # bad usage
    assert "port must be a number" in capsys.readouterr().err


def test_operators_tab_exists_only_with_a_password_and_checks_the_login(tmp_path, fake_embedder):
    import gradio as gr

    from rag.web import create_app

    config = seed_config(tmp_path)
    live, rebuilder = LiveQA(config, fake_embedder), Rebuilder(config, fake_embedder)
    store = FeedbackStore(tmp_path / "f.sqlite3")

    def elem_ids(demo):
        return {c.get("props", {}).get("elem_id") for c in demo.get_config_file()["components"]}

    assert "admin-password" not in elem_ids(create_app(live, rebuilder, store))
    demo = create_app(live, rebuilder, store, admin_password="secret")
    assert {"admin-password", "upload", "add-rebuild"} <= elem_ids(demo)
    # The handlers behind the hidden layout refuse a session that has not logged in.
    handlers = {f.name: f.fn for f in demo.fns.values()}
    with pytest.raises(gr.Error, match="管理密码"):
        handlers["preview"]([str(READING_DAY)], False)
    with pytest.raises(gr.Error, match="管理密码"):
        list(handlers["add_and_rebuild"]([], False))
    with pytest.raises(gr.Error, match="管理密码"):
        list(handlers["rebuild_only"](False))
    assert not rebuilder.running and list((tmp_path / "corpus").iterdir()) == [tmp_path / "corpus" / SEED.name]
    ok, *_, status, _ = handlers["login"]("secret", False, SimpleNamespace(client=SimpleNamespace(host="10.0.0.1")))
    assert ok is True
    assert "索引状态" in status  # no index yet
    # Every kept version is listed with its state; a damaged one says why.
    broken = config.index_dir / "versions" / "20000101-000000-000000"
    broken.mkdir(parents=True)
    (broken / "manifest.json").write_text("{garbage", encoding="utf-8")
    status = handlers["refreshed_status"](True)
    assert "保留的版本" in status and "20000101-000000-000000" in status and "正常" not in status
    ok, login_box, admin_box, *_ = handlers["logout"]()
    assert ok is False and login_box["visible"] is True and admin_box["visible"] is False


# ---------------------------------------------------------------- operators' login (the guard: test_chat.py)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_a_guessing_client_does_not_slow_another_login(tmp_path, fake_embedder):
    import time

    from rag.web import create_app

    config = seed_config(tmp_path)
    demo = create_app(LiveQA(config, fake_embedder), Rebuilder(config, fake_embedder),
                      FeedbackStore(tmp_path / "f.sqlite3"), admin_password="secret")
    login = {f.name: f.fn for f in demo.fns.values()}["login"]
    guesser, staff = (SimpleNamespace(client=SimpleNamespace(host=h)) for h in ("10.0.0.66", "10.0.0.2"))
    started = time.monotonic()
    messages = [login(f"guess{i}", False, guesser)[3] for i in range(20)]
    ok, *_ = login("secret", False, staff)
    assert ok is True and time.monotonic() - started < 1.0  # nothing sleeps
    assert "密码不正确" in messages[0] and all("请" in m and "后再试" in m for m in messages[1:])
    assert 'class="rag-login-error"' in messages[0]
    fn = next(f for f in demo.fns.values() if f.name == "login")
    assert fn.concurrency_id == "login" and fn.concurrency_limit is None  # not queued behind a watched rebuild


# ---------------------------------------------------------------- upload bounds


def test_upload_quota_bounds_size_count_and_bytes_per_client():
    clock = Clock()
    mb = 2**20
    quota = UploadQuota(max_request_bytes=20 * mb, max_requests=3, max_bytes=50 * mb, window=3600, clock=clock)
    assert quota.admit("a", 20 * mb + 1) == "上传被拒绝：一次最多上传 20 MB。"
    assert quota.admit("a", None) == "上传被拒绝：请求没有注明大小。"
    assert [quota.admit("a", 20 * mb), quota.admit("a", 20 * mb)] == [None, None]
    clock.now += 3000
    assert quota.admit("a", 20 * mb) == "上传的文件总量太大，请 10 分钟后再试。"
    assert quota.admit("a", mb) is None
    clock.now += 570
    assert quota.admit("a", mb) == "上传次数太多，请 30 秒后再试。"
    assert quota.admit("b", 20 * mb) is None  # another client has its own allowance
    clock.now += 31
    assert quota.admit("a", 20 * mb) is None  # the oldest upload has left the window


def test_upload_folder_is_emptied_at_start_up(tmp_path):
    folder = tmp_path / "uploads"
    (folder / "abc").mkdir(parents=True)
    (folder / "abc" / "left-by-a-killed-server.bin").write_bytes(b"x" * 100)
    assert fresh_upload_dir(folder) == folder
    assert list(folder.iterdir()) == [] and stat.S_IMODE(folder.stat().st_mode) == 0o700


def post_file(url: str, name: str, data: bytes) -> tuple[int, str]:
    boundary = "----rag-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(url + "gradio_api/upload", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_anonymous_uploads_are_bounded_and_kept_in_our_own_folder(tmp_path, fake_embedder, launch):
    config = seed_config(tmp_path)
    folder = tmp_path / "uploads"
    folder.mkdir()
    (folder / "stale.txt").write_text("from before", encoding="utf-8")
    client = launch(LiveQA(config, fake_embedder), Rebuilder(config, fake_embedder), admin_password="secret",
                    max_upload_bytes=1000, upload_dir=folder)
    assert not (folder / "stale.txt").exists()  # emptied at start-up
    url = client.src.rstrip("/") + "/"
    status, text = post_file(url, "a.txt", b"x" * 500)
    assert status == 200 and str(folder) in text
    assert len(list(folder.rglob("a.txt"))) == 1
    assert post_file(url, "big.txt", b"x" * 5000)[0] == 413  # one file over max_upload_bytes
    statuses = [post_file(url, f"n{i}.txt", b"x" * 900)[0] for i in range(12)]
    assert statuses.count(200) < 12 and statuses[-1] == 429  # the client's hourly allowance is spent
    status, text = post_file(url, "more.txt", b"x")
    assert status == 429 and "后再试" in text


def test_the_page_is_served_in_chinese(tmp_path, fake_embedder, launch):
    config = seed_config(tmp_path)
    client = launch(LiveQA(config, fake_embedder), Rebuilder(config, fake_embedder))
    with urllib.request.urlopen(client.src.rstrip("/") + "/", timeout=30) as response:
        page = response.read().decode()
    assert '<html\n\tlang="zh-CN"' in page or 'lang="zh-CN"' in page
    assert page.index('"zh-CN"') < page.index("window.gradio_config")  # set before Gradio's scripts run


# ---------------------------------------------------------------- adding uploads


def test_added_files_keep_the_corpus_mode(tmp_path):
    corpus = corpus_in(tmp_path)
    os.chmod(corpus / SEED.name, 0o644)
    up = inspect_upload("reading-day.md", READING_DAY.read_bytes(), corpus, Config())
    (path,) = add_uploads([up], corpus)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_an_unreachable_llm_server_gets_a_clear_message_and_the_chat_goes_on(tmp_path, real_embedder, launch):
    from rag.generation import GeneratorConfig, use_generator

    config = seed_config(tmp_path)
    build(config, real_embedder)
    down = GeneratorConfig(kind="openai", base_url=f"http://127.0.0.1:{free_port()}/v1", retries=0, timeout=5)
    live = LiveQA(config, real_embedder, functools.partial(use_generator, gen=down))
    client = launch(live, Rebuilder(config, real_embedder))
    reply = client.predict("报告会在哪里举行？", api_name="/chat")
    assert reply.startswith("生成回答时出错") and "127.0.0.1" in reply, reply
    assert "请输入一个问题" in client.predict("", api_name="/chat")  # the chat still answers what needs no LLM
