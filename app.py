"""The web chat staff use (Gradio): a thin shell over rag/. `python app.py` is `rag serve`.

Per-session state (the conversation's focus and the answers that can be rated) lives in gr.State;
everything shared between sessions (the index, the model, the feedback file) is read-only here or
owns its own locking.
"""

import dataclasses
import datetime as dt
import functools
import hashlib
import hmac
import html
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

from rag.answering import QA, Answer, LiveQA
from rag.config import Config
from rag.conversation import checked_examples, next_focus, rewrite
from rag.corpus import CorpusError
from rag.feedback import FeedbackStore
from rag.generation import GenerationError, Retry
from rag.index import IndexFault, list_versions
from rag.rendering import answer_html, answer_text, message_html, writing_html
from rag.retrieval import Filters
from rag.serving import Rebuilder, describe, ensure_index, index_status
from rag.uploads import (ALLOWED_SUFFIXES, MAX_UPLOAD_BYTES, Upload, UploadError, UploadQuota, add_uploads,
                         fresh_upload_dir, inspect_upload)

TITLE = "学校新闻问答"
NO_INDEX = "还没有可用的索引，暂时无法回答。请管理员在「管理」标签页上传文章并重建索引，或在服务器上运行 `rag build`。"
FIRST_BUILD = "索引正在构建中，请稍候一两分钟再提问。"
GENERATION_FAILED = "生成回答时出错：{error}。请稍后再试，或请管理员检查语言模型（不设 RAG_GENERATOR 即用抽取式回答）。"
REBUILDING = "索引正在更新：本回答来自当前版本 {version}，更新完成后将自动使用新版本。"
TYPING_STEPS = 8  # pieces an answer is typed out in
TYPING_DELAY = 0.03  # seconds between pieces
SHOWN_QUESTION_CHARS = 300  # a very long question is shown shortened in the chat
REFRESH_SECONDS = 5  # how often an open page checks whether a rebuild changed the index
UPLOAD_DIR = Path(tempfile.gettempdir()) / "rag-uploads"  # ours alone, emptied at start-up

CSS = """
.rag-answer-text { font-size: 1.02em; }
.rag-note { color: #92400e; background: #fef3c7; padding: 4px 8px; border-radius: 4px; margin-top: 6px; }
.rag-sources { margin-top: 10px; border-top: 1px solid #e5e7eb; padding-top: 6px; font-size: 0.92em; }
.rag-understood, .rag-filters { color: #4b5563; }
.rag-sources-title, .rag-declined { font-weight: 600; margin-top: 4px; }
.rag-source { margin: 6px 0; padding: 6px 8px; background: #f9fafb; border-radius: 6px; }
.rag-title { color: #1f2937; }
.rag-excerpt { margin: 4px 0; }
.rag-source mark { background: #fde68a; padding: 0 2px; }
.rag-full summary { cursor: pointer; color: #2563eb; }
.rag-login-error { color: #b91c1c; background: #fef2f2; border: 1px solid #fecaca; font-weight: 600;
                   padding: 6px 10px; border-radius: 6px; white-space: normal; overflow-wrap: anywhere; }
.upload-table td, .upload-table th { padding: 4px 8px; vertical-align: top; }
.upload-warn { color: #92400e; }
/* Icons drawn with CSS: emoji fonts are often missing on office machines, and ✅ shows as an empty box. */
.rag-icon { display: inline-block; vertical-align: -0.1em; margin-right: 0.35em; }
.rag-icon-ok { width: 0.35em; height: 0.7em; border: solid #16a34a; border-width: 0 0.16em 0.16em 0;
               transform: rotate(45deg); margin-left: 0.15em; }
.rag-icon-bad, .rag-icon-warn { width: 1.1em; height: 1.1em; border-radius: 50%; color: #fff; font-weight: 700;
                                font-size: 0.8em; line-height: 1.1em; text-align: center; }
.rag-icon-bad { background: #dc2626; }
.rag-icon-bad::before { content: "×"; }
.rag-icon-warn { background: #d97706; }
.rag-icon-warn::before { content: "!"; }
"""
ICON_OK, ICON_BAD, ICON_WARN = ('<span class="rag-icon rag-icon-ok"></span>', '<span class="rag-icon rag-icon-bad"></span>',
                                '<span class="rag-icon rag-icon-warn"></span>')
# After an answer, show its first line: Gradio scrolls the chat to the bottom, where the sources end.
SHOW_ANSWER_JS = """() => {
  const show = () => {
    const replies = document.querySelectorAll('#chatbot .rag-answer, #chatbot .rag-notice');
    const last = replies[replies.length - 1];
    if (!last) return;
    let box = last.parentElement;
    while (box && box !== document.body && box.scrollHeight <= box.clientHeight + 1) box = box.parentElement;
    if (!box || box === document.body) return;
    box.scrollTop += last.getBoundingClientRect().top - box.getBoundingClientRect().top - 8;
  };
  for (const ms of [0, 150, 500]) setTimeout(show, ms);
}"""


def _fresh_session() -> dict:
    # focus: the speaker follow-ups refer to; turns: message index -> what a 👍/👎 on it records
    return {"focus": None, "turns": {}}


def _filters(speakers, date_from: str, date_to: str) -> Filters:
    """Filters from the form; ValueError with a message in Chinese for a malformed date."""
    days = []
    for label, value in (("起始日期", date_from), ("截止日期", date_to)):
        value = (value or "").strip()
        if value:
            try:
                dt.date.fromisoformat(value)
            except ValueError:
                raise ValueError(f"{label}「{value}」格式不对，请写成 2023-07-04 这样的形式。") from None
        days.append(value or None)
    return Filters(speakers=tuple(speakers or ()), date_from=days[0], date_to=days[1])


def _filter_problem(filters: Filters, chunks) -> str | None:
    """Why no passage can pass `filters`, in Chinese; None when some can (or there are no filters).

    Said instead of answering, so that "文章中没有提到" is never the filter's fault.
    """
    if not filters:
        return None
    if filters.date_from and filters.date_to and filters.date_from > filters.date_to:
        return f"起始日期 {filters.date_from} 晚于截止日期 {filters.date_to}，没有文章能同时满足，请调整日期。"
    known = {c.speaker for c in chunks if c.speaker}
    unknown = [s for s in filters.speakers if s not in known]
    if unknown and len(unknown) == len(filters.speakers):
        return f"索引中没有发言人「{'、'.join(unknown)}」，请从发言人列表中选择。"
    if any(filters.allows(c) for c in chunks):
        return None
    days = sorted(c.date[:10] for c in chunks if c.date)
    span = f"（已收录的文章在 {days[0]} 至 {days[-1]} 之间）" if days else ""
    return f"没有文章符合筛选条件（{_describe_filters(filters)}）{span}，请放宽筛选后再问。"


def _describe_filters(filters: Filters) -> str:
    parts = []
    if filters.speakers:
        parts.append("发言人：" + "、".join(filters.speakers))
    if filters.date_from or filters.date_to:
        parts.append(f"日期：{filters.date_from or '最早'} 至 {filters.date_to or '最新'}")
    return "；".join(parts)


def _local_time(stamp: str | None) -> str:
    """An ISO time as the server's local, readable time: "2024-05-01T08:30:00+00:00" -> "2024-05-01 16:30" in +08."""
    try:
        moment = dt.datetime.fromisoformat(stamp or "")
    except ValueError:
        return stamp or "（未知）"
    if moment.tzinfo is not None:
        moment = moment.astimezone()
    return moment.strftime("%Y-%m-%d %H:%M")


class LoginGuard:
    """The operators' password, checked in constant time, with a per-client back-off and lockout.

    After a wrong password a client waits 1 s, then 2, 4, 8 … before it may try again; after
    `lock_after` wrong passwords in a row it is locked out for `lockout` seconds. Nothing sleeps:
    an early try is refused at once with how long to wait, so a guesser never ties up a worker and
    never slows another client's login. A right password clears the client's record.
    """

    def __init__(self, password: str, *, lock_after: int = 5, lockout: float = 900.0, clock=time.monotonic):
        self._digest = hashlib.sha256(password.encode()).digest()
        self.lock_after, self.lockout, self.clock = lock_after, lockout, clock
        self._failures: dict[str, tuple[int, float]] = {}  # client -> (wrong passwords in a row, may try again at)
        self._lock = threading.Lock()

    def attempt(self, client: str, password: str | None) -> tuple[bool, str]:
        """(True, "") for the right password; else (False, a message in Chinese saying what to do)."""
        now = self.clock()
        with self._lock:
            failures, until = self._failures.get(client, (0, 0.0))
            if now < until:
                return False, f"尝试太频繁，请 {_wait_text(until - now)}后再试。"
            # Digests have one length, so compare_digest's time does not depend on the guess either.
            if hmac.compare_digest(hashlib.sha256((password or "").encode()).digest(), self._digest):
                self._failures.pop(client, None)
                return True, ""
            failures += 1
            if failures >= self.lock_after:
                self._failures[client] = (0, now + self.lockout)
                return False, f"密码不正确。错误次数过多，已锁定，请 {_wait_text(self.lockout)}后再试。"
            self._failures[client] = (failures, now + 2.0 ** (failures - 1))
            return False, f"密码不正确。请 {_wait_text(2.0 ** (failures - 1))}后再试。"


def _wait_text(seconds: float) -> str:
    """_wait_text(0.2) -> "1 秒"; _wait_text(900) -> "15 分钟" """
    seconds = max(1, int(-(-seconds // 1)))
    return f"{seconds} 秒" if seconds < 60 else f"{-(-seconds // 60)} 分钟"


def _client(request) -> str:
    """Who is asking, for per-client limits: the peer address (behind a proxy, every client shares one)."""
    return getattr(getattr(request, "client", None), "host", None) or "unknown"


def _shown_question(question: str) -> str:
    if len(question) <= SHOWN_QUESTION_CHARS:
        return question
    return f"{question[:SHOWN_QUESTION_CHARS]}…（共 {len(question)} 个字符）"


def _dates(qa) -> tuple[str, str]:
    days = sorted(c.date[:10] for c in qa.index.chunks if c.date)
    return (days[0], days[-1]) if days else ("", "")


def create_app(live: LiveQA, rebuilder: Rebuilder, feedback: FeedbackStore, *,
               admin_password: str | None = None, max_upload_bytes: int = MAX_UPLOAD_BYTES,
               upload_dir: Path = UPLOAD_DIR):
    """The page; serve() adds the queue and launches it.

    Launching it (by whoever) bounds uploads per client into `upload_dir`, emptied at start-up, and
    shows Gradio's own texts in Chinese (see _page_class).
    """
    import gradio as gr

    config = rebuilder.config
    guard = LoginGuard(admin_password) if admin_password else None
    examples_by_version: dict[str, list[str]] = {}  # index version -> example questions checked against it
    examples_lock = threading.Lock()

    def current_qa():
        """(qa, None), or (None, message) when there is no index to answer from."""
        try:
            return live.get(), None
        except (IndexFault, OSError, ValueError):  # missing, or unreadable (a corrupt manifest is a ValueError)
            return None, FIRST_BUILD if rebuilder.running else NO_INDEX

    def note_for(qa) -> str | None:
        return REBUILDING.format(version=qa.index.version) if rebuilder.running else None

    def check_examples(qa) -> list[str]:
        """The example questions for qa's index, each answered well by the extractive answerer (once per version)."""
        with examples_lock:
            version = qa.index.version
            if version not in examples_by_version:
                # Extractive even when an LLM writes the chat's answers: a quick check of what the passages support.
                checker = QA.over(qa.index, qa.retriever.embedder, qa.config)
                examples_by_version[version] = checked_examples(qa.index.chunks, checker.ask, qa.index.speakers)
            return examples_by_version[version]

    def examples_ready(qa) -> list[str] | None:
        """The checked examples if done; else None, with the check started in the background."""
        found = examples_by_version.get(qa.index.version)
        if found is None and not examples_lock.locked():
            threading.Thread(target=check_examples, args=(qa,), daemon=True).start()
        return found

    # ------------------------------------------------------------------ chat

    def respond(question, history, session, speakers, date_from, date_to):
        question = question or ""
        history = list(history or []) + [
            {"role": "user", "content": message_html(_shown_question(question) or "（空问题）")},
        ]
        session = {"focus": session["focus"], "turns": dict(session["turns"])}
        qa, problem = current_qa()
        if problem is None:
            try:
                filters = _filters(speakers, date_from, date_to)
            except ValueError as e:
                problem = str(e)
            else:
                problem = _filter_problem(filters, qa.index.chunks)
        if problem is not None:
            history.append({"role": "assistant", "content": message_html(problem, "rag-notice")})
            yield "", history, session
            return
        history.append({"role": "assistant", "content": message_html("…")})
        yield "", history, session  # the question shows at once, with a placeholder for the answer
        understood = rewrite(question.strip(), session["focus"], qa.index.speakers)
        written, sources = "", []
        try:
            for item in qa.stream(understood, filters=filters):
                if isinstance(item, Answer):
                    answer = item
                    continue
                if isinstance(item, str):  # a generator's tokens, as they come
                    written += item
                elif isinstance(item, Retry):  # nothing it wrote had support: it writes again
                    written, sources = "", []
                else:  # a sentence checked against the passages: its sources show while the rest is written
                    sources += [c for c in item.spans if c not in sources]
                history[-1] = {"role": "assistant", "content": writing_html(written, sources)}
                yield "", history, session
        except GenerationError as e:  # the LLM failed (server down, model missing): say so, keep the chat going
            history[-1] = {"role": "assistant", "content": message_html(GENERATION_FAILED.format(error=e), "rag-notice")}
            yield "", history, session
            return
        note = note_for(qa)
        if not written:
            # The extractive answer is ready at once; typing it out keeps the chat's familiar rhythm.
            step = max(1, -(-len(answer.answer) // TYPING_STEPS))
            for end in range(step, len(answer.answer), step):
                history[-1] = {"role": "assistant", "content": message_html(answer.answer[:end] + "▍")}
                yield "", history, session
                time.sleep(TYPING_DELAY)
        history[-1] = {"role": "assistant", "content": answer_html(answer, understood, filters, note)}
        if answer.error is None:
            session["turns"][len(history) - 1] = {
                "question": question, "understood": understood, "answer": answer.answer, "found": answer.found,
                "citations": [dataclasses.asdict(c) for c in answer.citations], "index_version": qa.index.version,
            }
            session["focus"] = next_focus(understood, [c.speaker for c in answer.citations], answer.answer,
                                          qa.index.speakers, session["focus"])
        yield "", history, session

    def chat(question: str, speaker: str = "", date_from: str = "", date_to: str = "") -> str:
        """Answer one question; the answer and its sources as text. `speaker`: names separated by commas."""
        qa, problem = current_qa()
        if problem is not None:
            return problem
        try:
            filters = _filters([s for s in re.split(r"[,，、\s]+", speaker or "") if s], date_from, date_to)
        except ValueError as e:
            return str(e)
        if (problem := _filter_problem(filters, qa.index.chunks)) is not None:
            return problem
        question = question or ""
        try:
            answer = qa.ask(question, filters=filters)
        except GenerationError as e:
            return GENERATION_FAILED.format(error=e)
        return answer_text(answer, question, filters, note_for(qa))

    def rate(session, data: gr.LikeData):
        turn = session["turns"].get(data.index if isinstance(data.index, int) else data.index[0])
        if turn is None:
            return  # a notice, not an answer: nothing to rate
        rating = {True: "up", False: "down"}.get(data.liked, "none")
        feedback.add(rating=rating, **turn)
        gr.Info("谢谢，反馈已记录。" if rating != "none" else "已撤回反馈。", title="提示")

    def page_info(shown=None):
        """Header, filters and examples for the index now served; all skipped when `shown` already matches.

        `shown`: what this page shows, (version, whether its examples are the checked ones).
        """
        qa, problem = current_qa()
        if qa is None:
            now = (None, False)
            if now == shown:
                return (gr.skip(),) * 6
            return (gr.update(choices=[]), gr.update(placeholder=""), gr.update(placeholder=""),
                    gr.update(samples=[]), f"**注意：** {problem}", now)
        examples = examples_ready(qa)
        now = (qa.index.version, examples is not None)
        if now == shown:
            return (gr.skip(),) * 6
        first, last = _dates(qa)
        status = index_status(qa.index)
        return (gr.update(choices=sorted(qa.index.speakers)),
                gr.update(placeholder=f"最早 {first}" if first else "YYYY-MM-DD"),
                gr.update(placeholder=f"最新 {last}" if last else "YYYY-MM-DD"),
                gr.update(samples=[[q] for q in examples or []]),
                f"当前索引：{status['documents']} 篇文章、{status['chunks']} 个段落（版本 {status['version']}）",
                now)

    # ------------------------------------------------------------------ operators

    def admin_status() -> str:
        qa, problem = current_qa()
        if qa is None:
            out = f"**索引状态：** {problem}"
        else:
            s = index_status(qa.index)
            out = (f"| 文章数 | 段落数 | 嵌入模型 | 构建时间 | 版本 |\n|---|---|---|---|---|\n"
                   f"| {s['documents']} | {s['chunks']} | {s['model']} | {_local_time(s['built_at'])} | {s['version']} |")
        return out + versions_status()

    def versions_status() -> str:
        """Every kept version and its state (a damaged one says why), and why another than `current` serves."""
        problems = "".join(f"\n\n**注意：** {html.escape(p)}" for p in live.problems)
        rows = [f"| {v['version']} | {_local_time(v['built_at']) if v.get('built_at') else '?'} | "
                f"{v['documents'] if v.get('documents') is not None else '?'} | "
                f"{'是' if v['current'] else ''} | {'正常' if v['problem'] is None else html.escape(v['problem'])} |"
                for v in reversed(list_versions(live.config.index_dir))]
        table = "\n\n| 保留的版本 | 构建时间 | 文章数 | current | 状态 |\n|---|---|---|---|---|\n" + "\n".join(rows) if rows else ""
        return problems + table

    def login(password, _ok, request: gr.Request):
        ok, message = guard.attempt(_client(request), password)
        if ok:
            return True, gr.update(visible=False), gr.update(visible=True), "", admin_status(), gr.update(value="")
        return (False, gr.update(), gr.update(), f'<div class="rag-login-error" role="alert">{html.escape(message)}</div>',
                "", gr.update(value=""))

    def logout():
        return False, gr.update(visible=True), gr.update(visible=False), "", "", [], None, ""

    def require(ok):
        # Every operators' handler checks the session's login, not just the hidden layout.
        if not ok:
            raise gr.Error("请先输入管理密码。", title="错误")

    def refreshed_status(ok):
        require(ok)
        return admin_status()

    def preview(paths, ok):
        require(ok)
        qa, _ = current_qa()
        known = {d["content_hash"]: d["title"] for d in qa.index.manifest["documents"]} if qa else {}
        uploads = []
        for path in paths or []:
            path = Path(path)
            try:
                data = path.read_bytes()
            except OSError as e:
                uploads.append(Upload(path.name, "", b"", error=f"无法读取上传的文件（{e.strerror or e}）。"))
                continue
            uploads.append(inspect_upload(path.name, data, config.corpus_dir, config, known, max_upload_bytes))
        return uploads, _preview_html(uploads)

    def add_and_rebuild(uploads, ok):
        require(ok)
        accepted = [u for u in uploads or [] if u.ok]
        if not accepted:
            yield uploads, gr.update(), gr.update(), "没有可以添加的文件：请先上传并检查预览中的结果。", admin_status()
            return
        if rebuilder.running:
            yield uploads, gr.update(), gr.update(), "已有一次重建正在进行，请等它完成后再添加。", admin_status()
            return
        try:
            written = add_uploads(accepted, config.corpus_dir)
        except UploadError as e:
            yield uploads, gr.update(), gr.update(), str(e), admin_status()
            return
        added = "、".join(p.name for p in written)
        shown = _preview_html(uploads, added=True)  # what was added stays listed, marked as added
        rebuilder.start()
        for progress, status in watch_rebuild(prefix=f"已添加：{added}\n"):
            yield [], None, shown, progress, status

    def rebuild_only(ok):
        require(ok)
        rebuilder.start()  # or watch the one already running
        yield from watch_rebuild(prefix="")

    def watch_rebuild(prefix: str):
        while rebuilder.running:
            yield prefix + "\n".join(rebuilder.lines[-12:]), admin_status()
            time.sleep(0.5)
        if rebuilder.error:
            done = f"重建失败：{rebuilder.error}\n聊天继续使用原来的索引。"
        elif rebuilder.report is not None:
            m = rebuilder.report.manifest
            done = f"重建完成：版本 {m['version']}，{m['counts']['documents']} 篇文章、{m['counts']['chunks']} 个段落。"
        else:
            done = "重建没有完成，详情见服务器日志；聊天继续使用原来的索引。"
        yield prefix + "\n".join(rebuilder.lines[-12:]) + "\n" + done, admin_status()

    # ------------------------------------------------------------------ layout

    # No analytics: a university server has no business phoning home, and may be offline.
    # delete_cache: uploaded files are gone within two hours; the rest at the next start-up.
    with _page_class()(title=TITLE, analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(f"## {TITLE}\n根据学校新闻报道回答问题，并给出每个回答的出处。")
        status_line = gr.Markdown(elem_id="index-status")
        session = gr.State(_fresh_session())
        shown = gr.State(None)  # (index version, examples checked) this page shows; see page_info
        with gr.Tabs():
            with gr.Tab("问答", id="chat"):
                with gr.Row():
                    with gr.Column(scale=4):
                        # No floating label: it covered the first line of the answer scrolled into view.
                        chatbot = gr.Chatbot(label="对话", show_label=False, height=560, elem_id="chatbot",
                                             feedback_options=("Like", "Dislike"), group_consecutive_messages=False,
                                             placeholder="在下方输入问题，例如「报告会在哪里举行？」")
                        with gr.Row():
                            question = gr.Textbox(placeholder="请输入问题，按回车发送", show_label=False, scale=5,
                                                  elem_id="question", max_lines=4)
                            send = gr.Button("发送", variant="primary", scale=1, elem_id="send")
                        examples = gr.Dataset(components=[question], samples=[], label="示例问题（点击即可提问）",
                                              elem_id="examples")
                        clear = gr.Button("清空对话", elem_id="clear")
                    with gr.Column(scale=1, min_width=220):
                        gr.Markdown("### 筛选")
                        speakers = gr.Dropdown(label="发言人", multiselect=True, choices=[], elem_id="speakers")
                        date_from = gr.Textbox(label="起始日期", elem_id="date-from")
                        date_to = gr.Textbox(label="截止日期", elem_id="date-to")
            if admin_password:  # without a password there is no operators' tab at all, not a hidden one
                with gr.Tab("管理", id="admin"):
                    with gr.Column(visible=True) as login_box:
                        password = gr.Textbox(label="管理密码", type="password", elem_id="admin-password")
                        login_button = gr.Button("登录", elem_id="admin-login")
                        login_message = gr.HTML(elem_id="admin-login-message")
                    with gr.Column(visible=False) as admin_box:
                        status = gr.Markdown(elem_id="admin-status")
                        with gr.Row():
                            refresh = gr.Button("刷新状态")
                            logout_button = gr.Button("退出登录", elem_id="admin-logout")
                        # No file_types: Gradio would refuse a whole batch in English; the preview refuses
                        # each unsupported file by itself, in Chinese.
                        files = gr.File(label=f"上传文章（{'、'.join(ALLOWED_SUFFIXES)}，每个不超过 "
                                              f"{max_upload_bytes / 2**20:.0f} MB）", file_count="multiple",
                                        type="filepath", elem_id="upload")
                        previews = gr.HTML(elem_id="upload-preview")
                        with gr.Row():
                            add = gr.Button("添加到语料库并重建索引", variant="primary", elem_id="add-rebuild")
                            rebuild = gr.Button("仅重建索引", elem_id="rebuild")
                        progress = gr.Textbox(label="重建进度", lines=8, interactive=False, elem_id="rebuild-progress")

        chat_inputs = [question, chatbot, session, speakers, date_from, date_to]
        chat_outputs = [question, chatbot, session]
        for trigger in (question.submit, send.click):
            trigger(respond, chat_inputs, chat_outputs, concurrency_id="answer", api_visibility="private").then(
                None, js=SHOW_ANSWER_JS)
        examples.click(lambda sample: sample[0], examples, question, api_visibility="private").then(
            respond, chat_inputs, chat_outputs, concurrency_id="answer", api_visibility="private").then(
            None, js=SHOW_ANSWER_JS)
        clear.click(lambda: ([], _fresh_session()), None, [chatbot, session], api_visibility="private")
        chatbot.clear(_fresh_session, None, session, api_visibility="private")
        chatbot.like(rate, session, None, api_visibility="private")
        gr.api(chat, api_name="chat", concurrency_id="answer")
        info_outputs = [speakers, date_from, date_to, examples, status_line, shown]
        meta = {"api_visibility": "private", "concurrency_id": "page-info", "concurrency_limit": None,
                "show_progress": "hidden"}
        demo.load(page_info, None, info_outputs, **meta)
        # Every open page picks up a rebuild (new counts, speakers, examples) without a reload.
        gr.Timer(REFRESH_SECONDS).tick(page_info, shown, info_outputs, **meta)

        if admin_password:
            admin_ok = gr.State(False)  # this session logged in; checked by every operators' handler
            staged = gr.State([])  # the checked uploads waiting for "添加"
            private = {"api_visibility": "private", "concurrency_id": "admin", "concurrency_limit": 2}
            login_outputs = [admin_ok, login_box, admin_box, login_message, status, password]
            # Logins have their own queue: a rebuild being watched, or a guesser, never delays one.
            quick = {"api_visibility": "private", "concurrency_id": "login", "concurrency_limit": None}
            login_button.click(login, [password, admin_ok], login_outputs, **quick)
            password.submit(login, [password, admin_ok], login_outputs, **quick)
            logout_button.click(logout, None, [admin_ok, login_box, admin_box, login_message, status, staged,
                                               files, previews], **quick)
            refresh.click(refreshed_status, admin_ok, status, **private)
            files.upload(preview, [files, admin_ok], [staged, previews], **private)
            files.clear(lambda: ([], ""), None, [staged, previews], **private)
            add.click(add_and_rebuild, [staged, admin_ok], [staged, files, previews, progress, status],
                      **private).then(page_info, None, info_outputs, **meta)
            rebuild.click(rebuild_only, admin_ok, [progress, status], **private).then(
                page_info, None, info_outputs, **meta)
    demo.upload_dir, demo.max_upload_bytes = Path(upload_dir), max_upload_bytes
    qa, _ = current_qa()
    if qa is not None:  # start-up: check the example questions now, not when the first page asks
        examples_ready(qa)
    return demo


@functools.cache
def _page_class():
    """gr.Blocks that launches with the chat's guards, whoever launches it (serve(), a test):

    - uploads go to the page's own folder, emptied at start-up, bounded per client (UploadQuota) and
      per file (Gradio's max_file_size);
    - Gradio's own texts (buttons, toasts) are in Chinese whatever the browser's language.
    Arguments given to launch() win over these defaults.
    """
    import gradio as gr
    from starlette.middleware import Middleware

    class Page(gr.Blocks):
        upload_dir: Path = UPLOAD_DIR
        max_upload_bytes: int = MAX_UPLOAD_BYTES

        def launch(self, *args, **kwargs):
            limit = self.max_upload_bytes
            kwargs.setdefault("max_file_size", limit)
            kwargs.setdefault("css", CSS)
            app_kwargs = dict(kwargs.pop("app_kwargs", None) or {})
            # A batch of a few files per request; per client per hour, 30 requests and 8 files' worth.
            quota = UploadQuota(max_request_bytes=4 * limit + 2**16, max_requests=30, max_bytes=8 * limit)
            app_kwargs["middleware"] = [*app_kwargs.get("middleware", ()), Middleware(_ChineseUI, limit=limit),
                                        Middleware(_BoundedUploads, quota=quota)]
            # Gradio looks up its upload folder in GRADIO_TEMP_DIR wherever it needs it (the upload route,
            # the check that a file was uploaded), so the folder is named there, for this process.
            os.environ["GRADIO_TEMP_DIR"] = str(fresh_upload_dir(self.upload_dir))
            return super().launch(*args, app_kwargs=app_kwargs, **kwargs)

    return Page


def _header(scope, name: bytes) -> str | None:
    return next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k.lower() == name), None)


async def _plain(send, status: int, text: str) -> None:
    body = text.encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class _BoundedUploads:
    """ASGI middleware: each POST to Gradio's upload route is admitted by an UploadQuota first, by peer address."""

    def __init__(self, app, quota: UploadQuota):
        self.app, self.quota = app, quota

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].rstrip("/").endswith("/upload"):
            length = _header(scope, b"content-length")
            client = (scope.get("client") or ("unknown",))[0]
            refusal = self.quota.admit(client, int(length) if length and length.isdigit() else None)
            if refusal is not None:
                await _plain(send, 413 if "一次最多" in refusal or "大小" in refusal else 429, refusal)
                return
        await self.app(scope, receive, send)


# Runs before Gradio's scripts: its interface language follows navigator.language, so a staff member
# whose browser is set to English would see "Like", "Copy message", "Clear". Toast titles ("Error",
# "Info") and the upload size message are written in English by Gradio's scripts whatever the language:
# those are translated as they appear.
_CHINESE_UI_JS = r"""<script>(() => {
  for (const [name, value] of [["language", "zh-CN"], ["languages", ["zh-CN", "zh"]]])
    Object.defineProperty(Navigator.prototype, name, {get: () => value, configurable: true});
  const titles = {Error: "错误", Warning: "注意", Info: "提示", Success: "完成"};
  const messages = [
    [/^File\(s\) exceed the maximum allowed size of [^:]*: (.*)$/s,
     names => `文件超过 LIMIT MB 的上限，未上传：${names.replaceAll('"', "")}`],
    [/^Invalid file types?: (.*?)\. Only .* allowed\.?$/s, names => `不支持的文件类型：${names}`],
  ];
  // Tooltips Gradio writes in English in every language.
  const labels = {"Copy message": "复制消息", "Copy conversation": "复制对话", "More tabs": "更多标签页",
                  "Copied message": "已复制", "Copied conversation": "已复制", "Clear": "清除", "Share": "分享"};
  const translate = () => {
    scheduled = false;
    document.querySelectorAll(".toast-title").forEach(el => {
      const text = el.firstElementChild?.firstChild ?? el.firstChild;
      const word = text?.textContent?.trim();
      if (text && titles[word]) text.textContent = titles[word] + " ";
    });
    document.querySelectorAll(".toast-message-text").forEach(el => {
      for (const [pattern, chinese] of messages) {
        const m = el.textContent.trim().match(pattern);
        if (m) el.textContent = chinese(m[1]);
      }
    });
    document.querySelectorAll("[title], [aria-label]").forEach(el => {
      for (const name of ["title", "aria-label"]) {
        const chinese = labels[el.getAttribute(name)];
        if (chinese) el.setAttribute(name, chinese);
      }
    });
  };
  let scheduled = false;  // once per frame, however many changes a streamed answer makes
  new MutationObserver(() => { if (!scheduled) { scheduled = true; requestAnimationFrame(translate); } })
    .observe(document.documentElement, {subtree: true, childList: true, characterData: true, attributes: true,
                                        attributeFilter: ["title", "aria-label", "class"]});
})();</script>"""


class _ChineseUI:
    """ASGI middleware: the page's HTML gets `_CHINESE_UI_JS` at the top of <head> and lang="zh-CN"."""

    def __init__(self, app, limit: int):
        self.app = app
        self.script = _CHINESE_UI_JS.replace("LIMIT", f"{limit / 2**20:g}").encode()

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or scope["method"] != "GET" or not path.endswith("/") or "/gradio_api/" in path:
            return await self.app(scope, receive, send)
        start, chunks = None, []

        async def hold(message):
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                return
            if message["type"] != "http.response.body":
                return await send(message)
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = b"".join(chunks)
            headers = start["headers"]
            if (_header(start, b"content-type") or "").startswith("text/html") and b"<head>" in body:
                body = body.replace(b"<head>", b"<head>" + self.script, 1).replace(b'lang="en"', b'lang="zh-CN"', 1)
                headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
                headers.append((b"content-length", str(len(body)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, hold)


def _preview_html(uploads, added: bool = False) -> str:
    """The preview table; `added`: the accepted files are now in the corpus (said so instead of 可以添加)."""
    e = html.escape
    rows = []
    for u in uploads:
        if not u.ok:
            result = "未添加：" if added else ""
            rows.append(f'<tr class="upload-bad"><td>{e(u.original)}</td>'
                        f'<td colspan="5">{ICON_BAD}{result}{e(u.error)}</td></tr>')
            continue
        for a in u.articles:
            result = f"{ICON_OK}已添加" if added else f"{ICON_OK}可以添加"
            if a.warning:
                result += f'<div class="upload-warn">{ICON_WARN}{e(a.warning)}</div>'
            rows.append(f'<tr class="upload-ok{" upload-large" if a.warning else ""}">'
                        f'<td>{e(u.original)} → {e(u.name)}</td><td>{e(a.title)}</td>'
                        f'<td>{e(a.date or "（无日期）")}</td><td>{e("、".join(a.speakers) or "（无）")}</td>'
                        f'<td>{a.segments}</td><td>{result}</td></tr>')
    head = "<tr><th>文件</th><th>标题</th><th>日期</th><th>发言人</th><th>段落数</th><th>结果</th></tr>"
    return f'<table class="upload-table">{head}{"".join(rows)}</table>' if rows else ""


def _feedback_or_off(path: Path):
    """The feedback store and how the start-up line describes it; a file that cannot be used (not SQLite,
    another schema, not writable) turns ratings off instead of stopping the chat, and each 👍/👎 says so."""
    import gradio as gr

    from rag.feedback import DisabledFeedback, FeedbackError

    try:
        return FeedbackStore(path), str(path)
    except FeedbackError as e:
        problem = " ".join(str(e).split())
        print(f"warning: feedback disabled: {problem}", file=sys.stderr, flush=True)

    class Off(DisabledFeedback):
        def add(self, **_rating) -> int:
            raise gr.Error("反馈功能暂时关闭（反馈数据库无法使用），回答不受影响。请联系管理员。", title="提示")

    return Off(path, problem), f"OFF ({problem})"


def serve(config: Config, *, host: str, port: int, feedback_db: Path, admin_password: str | None = None,
          concurrency: int = 6, max_upload_bytes: int = MAX_UPLOAD_BYTES, generator=None) -> None:
    """Build the index if missing or stale, then serve the chat until interrupted.

    `generator`: a rag.generation.GeneratorConfig to write answers with an LLM (None: extractive answers).
    """
    from rag.embedding import load_embedder

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    embedder = load_embedder(config)
    try:
        ensure_index(config, embedder, say)
    except (IndexFault, CorpusError) as e:
        say(f"warning: {e}\nserving without an index: the chat says so until one is built")
    prepare = None
    if generator is not None:
        from rag.generation import make_generator, use_generator

        llm = make_generator(generator, config.cache_dir)
        if hasattr(llm, "warm_up"):
            llm.warm_up(background=True)  # the first answers wait for the model only if it is still loading
        prepare = functools.partial(use_generator, gen=generator, generator=llm)
        say(f"answers written by the {generator.kind} generator ({llm!r}), every sentence checked against the passages")
    live = LiveQA(config, embedder, prepare, say=lambda line: say(f"warning: {line}"))
    try:
        served = describe(index_status(live.get().index))
    except IndexFault as e:
        served = f"no index ({e})"
    rebuilder = Rebuilder(config, embedder, on_done=live.get)
    feedback, feedback_note = _feedback_or_off(feedback_db)
    demo = create_app(live, rebuilder, feedback, admin_password=admin_password, max_upload_bytes=max_upload_bytes)
    # Answers are CPU-bound and the model encodes one query at a time, so a few workers keep the
    # cores busy; more only queue inside the process instead of in Gradio's visible queue.
    demo.queue(default_concurrency_limit=concurrency)
    _, url, _ = demo.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=True,
                            max_file_size=max_upload_bytes, css=CSS, footer_links=["api"])
    url = url or f"http://{host}:{port}/"
    print(f"serving {url} — {served}", flush=True)
    print(f"feedback: {feedback_note}; operators' tab: {'on' if admin_password else 'off (set RAG_ADMIN_PASSWORD)'}",
          flush=True)
    demo.block_thread()


if __name__ == "__main__":
    from rag.cli import main

    sys.exit(main(["serve", *sys.argv[1:]]))
