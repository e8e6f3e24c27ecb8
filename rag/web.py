"""The web chat's page (Gradio): layout and wiring over rag.chat, the page's guards, and `serve`.

The one module under rag/ that uses Gradio, imported only inside the functions that need it, so `rag --help`
stays instant. Per-session state (a rag.chat.Session, the operators' login) lives in gr.State; everything shared
between sessions (the index, the model, the feedback file) is read-only here or owns its own locking.

Over 400 lines because the page's guards belong with it: the CSS and the script that puts Gradio's own texts
into Chinese (~90 lines of text, not logic) and the two ASGI middlewares that bound uploads and inject it.
"""

import functools
import html
import os
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

from .answering import LiveQA
from .chat import Chat, Session, question_html
from .corpus import CorpusError
from .feedback import FeedbackStore
from .index import IndexFault
from .operators import LoginGuard, Operators, preview_html
from .serving import Rebuilder, describe, ensure_index, index_status
from .settings import Settings
from .uploads import ALLOWED_SUFFIXES, MAX_UPLOAD_BYTES, UploadQuota, fresh_upload_dir

TITLE = "学校新闻问答"
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



def create_app(live: LiveQA, rebuilder: Rebuilder, feedback: FeedbackStore, *,
               admin_password: str | None = None, max_upload_bytes: int = MAX_UPLOAD_BYTES,
               upload_dir: Path = UPLOAD_DIR):
    """The page; serve() adds the queue and launches it.

    Launching it (by whoever) bounds uploads per client into `upload_dir`, emptied at start-up, and
    shows Gradio's own texts in Chinese (see _page_class).
    """
    chat = Chat(live, rebuilder)
    # No analytics: a university server has no business phoning home, and may be offline.
    # delete_cache: uploaded files are gone within two hours; the rest at the next start-up.
    with _page_class()(title=TITLE, analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        ui = _layout(admin=bool(admin_password), max_upload_bytes=max_upload_bytes)
        page_info = _wire_chat(demo, ui, chat, feedback)
        if admin_password:
            _wire_operators(ui, LoginGuard(admin_password), Operators(chat, max_upload_bytes=max_upload_bytes),
                            page_info)
    demo.upload_dir, demo.max_upload_bytes = Path(upload_dir), max_upload_bytes
    qa, _ = chat.current()
    if qa is not None:  # start-up: check the example questions now, not when the first page asks
        chat.examples_ready(qa)
    return demo


def _layout(admin: bool, max_upload_bytes: int) -> SimpleNamespace:
    """The page's components, by name (created inside the page's `with` block)."""
    import gradio as gr

    ui = SimpleNamespace()
    gr.Markdown(f"## {TITLE}\n根据学校新闻报道回答问题，并给出每个回答的出处。")
    ui.status_line = gr.Markdown(elem_id="index-status")
    ui.session = gr.State(Session())
    ui.shown = gr.State(None)  # (index version, examples checked) this page shows; see Chat.page
    with gr.Tabs():
        with gr.Tab("问答", id="chat"):
            with gr.Row():
                with gr.Column(scale=4):
                    # No floating label: it covered the first line of the answer scrolled into view.
                    ui.chatbot = gr.Chatbot(label="对话", show_label=False, height=560, elem_id="chatbot",
                                            feedback_options=("Like", "Dislike"), group_consecutive_messages=False,
                                            placeholder="在下方输入问题，例如「报告会在哪里举行？」")
                    with gr.Row():
                        ui.question = gr.Textbox(placeholder="请输入问题，按回车发送", show_label=False, scale=5,
                                                 elem_id="question", max_lines=4)
                        ui.send = gr.Button("发送", variant="primary", scale=1, elem_id="send")
                    ui.examples = gr.Dataset(components=[ui.question], samples=[], label="示例问题（点击即可提问）",
                                             elem_id="examples")
                    ui.clear = gr.Button("清空对话", elem_id="clear")
                with gr.Column(scale=1, min_width=220):
                    gr.Markdown("### 筛选")
                    ui.speakers = gr.Dropdown(label="发言人", multiselect=True, choices=[], elem_id="speakers")
                    ui.date_from = gr.Textbox(label="起始日期", elem_id="date-from")
                    ui.date_to = gr.Textbox(label="截止日期", elem_id="date-to")
        if admin:  # without a password there is no operators' tab at all, not a hidden one
            with gr.Tab("管理", id="admin"):
                _admin_layout(ui, max_upload_bytes)
    return ui


def _admin_layout(ui: SimpleNamespace, max_upload_bytes: int) -> None:
    import gradio as gr

    with gr.Column(visible=True) as ui.login_box:
        ui.password = gr.Textbox(label="管理密码", type="password", elem_id="admin-password")
        ui.login_button = gr.Button("登录", elem_id="admin-login")
        ui.login_message = gr.HTML(elem_id="admin-login-message")
    with gr.Column(visible=False) as ui.admin_box:
        ui.status = gr.Markdown(elem_id="admin-status")
        with gr.Row():
            ui.refresh = gr.Button("刷新状态")
            ui.logout_button = gr.Button("退出登录", elem_id="admin-logout")
        # No file_types: Gradio would refuse a whole batch in English; the preview refuses
        # each unsupported file by itself, in Chinese.
        ui.files = gr.File(label=f"上传文章（{'、'.join(ALLOWED_SUFFIXES)}，每个不超过 "
                                 f"{max_upload_bytes / 2**20:.0f} MB）", file_count="multiple",
                           type="filepath", elem_id="upload")
        ui.previews = gr.HTML(elem_id="upload-preview")
        with gr.Row():
            ui.add = gr.Button("添加到语料库并重建索引", variant="primary", elem_id="add-rebuild")
            ui.rebuild = gr.Button("仅重建索引", elem_id="rebuild")
        ui.progress = gr.Textbox(label="重建进度", lines=8, interactive=False, elem_id="rebuild-progress")


def _wire_chat(demo, ui: SimpleNamespace, chat: Chat, feedback):
    """The chat's handlers; returns page_info, which the operators' tab runs again after a rebuild."""
    import gradio as gr

    def respond(question, history, session, speakers, date_from, date_to):
        history = [*(history or []), {"role": "user", "content": question_html(question)}]
        for reply in chat.turn(question, session, speakers, date_from, date_to, at=len(history)):
            yield "", [*history, {"role": "assistant", "content": reply.html}], reply.session

    def chat_api(question: str, speaker: str = "", date_from: str = "", date_to: str = "") -> str:
        """Answer one question; the answer and its sources as text. `speaker`: names separated by commas."""
        return chat.answer_text(question, speaker, date_from, date_to)

    def rate(session, data: gr.LikeData):
        thanks = chat.rate(feedback, session, data.index if isinstance(data.index, int) else data.index[0], data.liked)
        if thanks is not None:
            gr.Info(thanks, title="提示")

    def page_info(shown=None):
        """Header, filters and examples for the index now served; all skipped when `shown` already matches."""
        info = chat.page(shown)
        if info is None:
            return (gr.skip(),) * 6
        return (gr.update(choices=info.speakers), gr.update(placeholder=info.date_from_hint),
                gr.update(placeholder=info.date_to_hint), gr.update(samples=[[q] for q in info.examples]),
                info.headline, info.shown)

    def fresh_session():
        return Session()

    chat_inputs = [ui.question, ui.chatbot, ui.session, ui.speakers, ui.date_from, ui.date_to]
    chat_outputs = [ui.question, ui.chatbot, ui.session]
    for trigger in (ui.question.submit, ui.send.click):
        trigger(respond, chat_inputs, chat_outputs, concurrency_id="answer", api_visibility="private").then(
            None, js=SHOW_ANSWER_JS)
    ui.examples.click(lambda sample: sample[0], ui.examples, ui.question, api_visibility="private").then(
        respond, chat_inputs, chat_outputs, concurrency_id="answer", api_visibility="private").then(
        None, js=SHOW_ANSWER_JS)
    ui.clear.click(lambda: ([], Session()), None, [ui.chatbot, ui.session], api_visibility="private")
    ui.chatbot.clear(fresh_session, None, ui.session, api_visibility="private")
    ui.chatbot.like(rate, ui.session, None, api_visibility="private")
    gr.api(chat_api, api_name="chat", concurrency_id="answer")
    ui.info_outputs = [ui.speakers, ui.date_from, ui.date_to, ui.examples, ui.status_line, ui.shown]
    ui.info_meta = {"api_visibility": "private", "concurrency_id": "page-info", "concurrency_limit": None,
                    "show_progress": "hidden"}
    demo.load(page_info, None, ui.info_outputs, **ui.info_meta)
    # Every open page picks up a rebuild (new counts, speakers, examples) without a reload.
    gr.Timer(REFRESH_SECONDS).tick(page_info, ui.shown, ui.info_outputs, **ui.info_meta)
    return page_info


def _wire_operators(ui: SimpleNamespace, guard: LoginGuard, ops: Operators, page_info) -> None:
    """The operators' handlers; each checks the session's login (gr.State), not just the hidden layout."""
    import gradio as gr

    def require(ok):
        if not ok:
            raise gr.Error("请先输入管理密码。", title="错误")

    def login(password, _ok, request: gr.Request):
        ok, message = guard.attempt(_client(request), password)
        if ok:
            return True, gr.update(visible=False), gr.update(visible=True), "", ops.status(), gr.update(value="")
        return (False, gr.update(), gr.update(), f'<div class="rag-login-error" role="alert">{html.escape(message)}</div>',
                "", gr.update(value=""))

    def logout():
        return False, gr.update(visible=True), gr.update(visible=False), "", "", [], None, ""

    def refreshed_status(ok):
        require(ok)
        return ops.status()

    def preview(paths, ok):
        require(ok)
        uploads = ops.preview(paths)
        return uploads, preview_html(uploads)

    def add_and_rebuild(uploads, ok):
        require(ok)
        for step in ops.add_and_rebuild(uploads):
            if step.preview is None:  # refused: the uploads and their preview stay as they are
                yield uploads, gr.update(), gr.update(), step.text, step.status
            else:
                yield [], None, step.preview, step.text, step.status

    def rebuild_only(ok):
        require(ok)
        for step in ops.rebuild():
            yield step.text, step.status

    admin_ok = gr.State(False)  # this session logged in; checked by every operators' handler
    staged = gr.State([])  # the checked uploads waiting for "添加"
    private = {"api_visibility": "private", "concurrency_id": "admin", "concurrency_limit": 2}
    login_outputs = [admin_ok, ui.login_box, ui.admin_box, ui.login_message, ui.status, ui.password]
    # Logins have their own queue: a rebuild being watched, or a guesser, never delays one.
    quick = {"api_visibility": "private", "concurrency_id": "login", "concurrency_limit": None}
    ui.login_button.click(login, [ui.password, admin_ok], login_outputs, **quick)
    ui.password.submit(login, [ui.password, admin_ok], login_outputs, **quick)
    ui.logout_button.click(logout, None, [admin_ok, ui.login_box, ui.admin_box, ui.login_message, ui.status, staged,
                                          ui.files, ui.previews], **quick)
    ui.refresh.click(refreshed_status, admin_ok, ui.status, **private)
    ui.files.upload(preview, [ui.files, admin_ok], [staged, ui.previews], **private)
    ui.files.clear(lambda: ([], ""), None, [staged, ui.previews], **private)
    ui.add.click(add_and_rebuild, [staged, admin_ok], [staged, ui.files, ui.previews, ui.progress, ui.status],
                 **private).then(page_info, None, ui.info_outputs, **ui.info_meta)
    ui.rebuild.click(rebuild_only, admin_ok, [ui.progress, ui.status], **private).then(
        page_info, None, ui.info_outputs, **ui.info_meta)


def _client(request) -> str:
    """Who is asking, for per-client limits: the peer address (behind a proxy, every client shares one)."""
    return getattr(getattr(request, "client", None), "host", None) or "unknown"


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
            # the check that a file was uploaded), so the folder is named there, for this process. It configures
            # Gradio, not us: the one variable written under rag/ (rag.settings reads ours).
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


def _feedback_or_off(path: Path):
    """The feedback store and how the start-up line describes it; a file that cannot be used (not SQLite,
    another schema, not writable) turns ratings off instead of stopping the chat, and each 👍/👎 says so."""
    import gradio as gr

    from .feedback import DisabledFeedback, FeedbackError

    try:
        return FeedbackStore(path), str(path)
    except FeedbackError as e:
        problem = " ".join(str(e).split())
        print(f"warning: feedback disabled: {problem}", file=sys.stderr, flush=True)

    class Off(DisabledFeedback):
        def add(self, **_rating) -> int:
            raise gr.Error("反馈功能暂时关闭（反馈数据库无法使用），回答不受影响。请联系管理员。", title="提示")

    return Off(path, problem), f"OFF ({problem})"


def serve(settings: Settings, max_upload_bytes: int = MAX_UPLOAD_BYTES) -> None:
    """Build the index if missing or stale, then serve the chat until interrupted, as `settings` say (its
    config, server, feedback_db, and generator: None for extractive answers)."""
    config, server, generator = settings.config, settings.server, settings.generator
    host, port, admin_password = server.host, server.port, server.admin_password
    from .embedding import load_embedder

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    embedder = load_embedder(config)
    try:
        ensure_index(config, embedder, say)
    except (IndexFault, CorpusError) as e:
        say(f"warning: {e}\nserving without an index: the chat says so until one is built")
    prepare = None
    if generator is not None:
        from .generation import make_generator, use_generator

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
    feedback, feedback_note = _feedback_or_off(settings.feedback_db)
    demo = create_app(live, rebuilder, feedback, admin_password=admin_password, max_upload_bytes=max_upload_bytes)
    # Answers are CPU-bound and the model encodes one query at a time, so a few workers keep the
    # cores busy; more only queue inside the process instead of in Gradio's visible queue.
    demo.queue(default_concurrency_limit=server.concurrency)
    _, url, _ = demo.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=True,
                            max_file_size=max_upload_bytes, css=CSS, footer_links=["api"])
    url = url or f"http://{host}:{port}/"
    print(f"serving {url} — {served}", flush=True)
    print(f"feedback: {feedback_note}; operators' tab: {'on' if admin_password else 'off (set RAG_ADMIN_PASSWORD)'}",
          flush=True)
    demo.block_thread()
