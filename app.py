"""The web chat staff use (Gradio): a thin shell over rag/. `python app.py` is `rag serve`.

Per-session state (the conversation's focus and the answers that can be rated) lives in gr.State;
everything shared between sessions (the index, the model, the feedback file) is read-only here or
owns its own locking.
"""

import dataclasses
import datetime as dt
import functools
import hmac
import html
import re
import sys
import time
from pathlib import Path

from rag.answering import Answer, LiveQA
from rag.config import Config
from rag.conversation import example_questions, next_focus, rewrite
from rag.corpus import CorpusError
from rag.feedback import FeedbackStore
from rag.generation import GenerationError, Retry
from rag.index import IndexError_
from rag.rendering import answer_html, answer_text, message_html, writing_html
from rag.retrieval import Filters
from rag.serving import Rebuilder, describe, ensure_index, index_status
from rag.uploads import ALLOWED_SUFFIXES, MAX_UPLOAD_BYTES, Upload, UploadError, add_uploads, inspect_upload

TITLE = "学校新闻问答"
NO_INDEX = "还没有可用的索引，暂时无法回答。请管理员在「管理」标签页上传文章并重建索引，或在服务器上运行 `rag build`。"
FIRST_BUILD = "索引正在构建中，请稍候一两分钟再提问。"
GENERATION_FAILED = "生成回答时出错：{error}。请稍后再试，或请管理员检查语言模型（不设 RAG_GENERATOR 即用抽取式回答）。"
REBUILDING = "索引正在更新：本回答来自当前版本 {version}，更新完成后将自动使用新版本。"
TYPING_STEPS = 8  # pieces an answer is typed out in
TYPING_DELAY = 0.03  # seconds between pieces
SHOWN_QUESTION_CHARS = 300  # a very long question is shown shortened in the chat

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
"""


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


def _shown_question(question: str) -> str:
    if len(question) <= SHOWN_QUESTION_CHARS:
        return question
    return f"{question[:SHOWN_QUESTION_CHARS]}…（共 {len(question)} 个字符）"


def _dates(qa) -> tuple[str, str]:
    days = sorted(c.date[:10] for c in qa.index.chunks if c.date)
    return (days[0], days[-1]) if days else ("", "")


def create_app(live: LiveQA, rebuilder: Rebuilder, feedback: FeedbackStore, *,
               admin_password: str | None = None, max_upload_bytes: int = MAX_UPLOAD_BYTES):
    """The page; serve() adds the queue and launches it."""
    import gradio as gr

    config = rebuilder.config

    def current_qa():
        """(qa, None), or (None, message) when there is no index to answer from."""
        try:
            return live.get(), None
        except (IndexError_, OSError, ValueError):  # missing, or unreadable (a corrupt manifest is a ValueError)
            return None, FIRST_BUILD if rebuilder.running else NO_INDEX

    def note_for(qa) -> str | None:
        return REBUILDING.format(version=qa.index.version) if rebuilder.running else None

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
        gr.Info("谢谢，反馈已记录。" if rating != "none" else "已撤回反馈。")

    def on_load():
        qa, problem = current_qa()
        if qa is None:
            return (gr.update(choices=[]), gr.update(placeholder=""), gr.update(placeholder=""),
                    gr.update(samples=[]), f"⚠️ {problem}")
        first, last = _dates(qa)
        status = index_status(qa.index)
        return (gr.update(choices=sorted(qa.index.speakers)),
                gr.update(placeholder=f"最早 {first}" if first else "YYYY-MM-DD"),
                gr.update(placeholder=f"最新 {last}" if last else "YYYY-MM-DD"),
                gr.update(samples=[[q] for q in example_questions(qa.index.chunks)]),
                f"当前索引：{status['documents']} 篇文章、{status['chunks']} 个段落（版本 {status['version']}）")

    # ------------------------------------------------------------------ operators

    def admin_status() -> str:
        qa, problem = current_qa()
        if qa is None:
            return f"**索引状态：** {problem}"
        s = index_status(qa.index)
        return (f"| 文章数 | 段落数 | 嵌入模型 | 构建时间 | 版本 |\n|---|---|---|---|---|\n"
                f"| {s['documents']} | {s['chunks']} | {s['model']} | {s['built_at']} | {s['version']} |")

    def login(password, _ok):
        if admin_password and hmac.compare_digest((password or "").encode(), admin_password.encode()):
            return True, gr.update(visible=False), gr.update(visible=True), "", admin_status()
        time.sleep(1)  # slows down guessing
        return False, gr.update(), gr.update(), "密码不正确。", ""

    def require(ok):
        # Every operators' handler checks the session's login, not just the hidden layout.
        if not ok:
            raise gr.Error("请先输入管理密码。")

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
            yield uploads, gr.update(), "没有可以添加的文件：请先上传并检查预览中的结果。", admin_status()
            return
        if rebuilder.running:
            yield uploads, gr.update(), "已有一次重建正在进行，请等它完成后再添加。", admin_status()
            return
        try:
            written = add_uploads(accepted, config.corpus_dir)
        except UploadError as e:
            yield uploads, gr.update(), str(e), admin_status()
            return
        added = "、".join(p.name for p in written)
        rebuilder.start()
        for progress, status in watch_rebuild(prefix=f"已添加：{added}\n"):
            yield [], None, progress, status

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
    # delete_cache: uploaded files (in Gradio's temp folder) are gone within two hours.
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(f"## {TITLE}\n根据学校新闻报道回答问题，并给出每个回答的出处。")
        status_line = gr.Markdown(elem_id="index-status")
        session = gr.State(_fresh_session())
        with gr.Tabs():
            with gr.Tab("问答", id="chat"):
                with gr.Row():
                    with gr.Column(scale=4):
                        chatbot = gr.Chatbot(label="对话", height=560, elem_id="chatbot",
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
                        login_message = gr.Markdown()
                    with gr.Column(visible=False) as admin_box:
                        status = gr.Markdown(elem_id="admin-status")
                        refresh = gr.Button("刷新状态")
                        files = gr.File(label=f"上传文章（{'、'.join(ALLOWED_SUFFIXES)}，每个不超过 "
                                              f"{max_upload_bytes / 1e6:.0f} MB）", file_count="multiple",
                                        file_types=list(ALLOWED_SUFFIXES), type="filepath", elem_id="upload")
                        previews = gr.HTML(elem_id="upload-preview")
                        with gr.Row():
                            add = gr.Button("添加到语料库并重建索引", variant="primary", elem_id="add-rebuild")
                            rebuild = gr.Button("仅重建索引", elem_id="rebuild")
                        progress = gr.Textbox(label="重建进度", lines=8, interactive=False, elem_id="rebuild-progress")

        chat_inputs = [question, chatbot, session, speakers, date_from, date_to]
        chat_outputs = [question, chatbot, session]
        for trigger in (question.submit, send.click):
            trigger(respond, chat_inputs, chat_outputs, concurrency_id="answer", api_visibility="private")
        examples.click(lambda sample: sample[0], examples, question, api_visibility="private").then(
            respond, chat_inputs, chat_outputs, concurrency_id="answer", api_visibility="private")
        clear.click(lambda: ([], _fresh_session()), None, [chatbot, session], api_visibility="private")
        chatbot.clear(_fresh_session, None, session, api_visibility="private")
        chatbot.like(rate, session, None, api_visibility="private")
        gr.api(chat, api_name="chat", concurrency_id="answer")
        demo.load(on_load, None, [speakers, date_from, date_to, examples, status_line], api_visibility="private")

        if admin_password:
            admin_ok = gr.State(False)  # this session logged in; checked by every operators' handler
            staged = gr.State([])  # the checked uploads waiting for "添加"
            private = {"api_visibility": "private", "concurrency_id": "admin", "concurrency_limit": 2}
            login_outputs = [admin_ok, login_box, admin_box, login_message, status]
            login_button.click(login, [password, admin_ok], login_outputs, **private)
            password.submit(login, [password, admin_ok], login_outputs, **private)
            refresh.click(refreshed_status, admin_ok, status, **private)
            files.upload(preview, [files, admin_ok], [staged, previews], **private)
            files.clear(lambda: ([], ""), None, [staged, previews], **private)
            add.click(add_and_rebuild, [staged, admin_ok], [staged, files, progress, status], **private)
            rebuild.click(rebuild_only, admin_ok, [progress, status], **private)
    return demo


def _preview_html(uploads) -> str:
    e = html.escape
    rows = []
    for u in uploads:
        if not u.ok:
            rows.append(f'<tr class="upload-bad"><td>{e(u.original)}</td><td colspan="5">❌ {e(u.error)}</td></tr>')
            continue
        for a in u.articles:
            rows.append(f'<tr class="upload-ok"><td>{e(u.original)} → {e(u.name)}</td><td>{e(a.title)}</td>'
                        f'<td>{e(a.date or "（无日期）")}</td><td>{e("、".join(a.speakers) or "（无）")}</td>'
                        f'<td>{a.segments}</td><td>✅ 可以添加</td></tr>')
    head = "<tr><th>文件</th><th>标题</th><th>日期</th><th>发言人</th><th>段落数</th><th>结果</th></tr>"
    return f'<table class="upload-table">{head}{"".join(rows)}</table>' if rows else ""


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
    except (IndexError_, CorpusError) as e:
        say(f"warning: {e}\nserving without an index: the chat says so until one is built")
    prepare = None
    if generator is not None:
        from rag.generation import make_generator, use_generator

        llm = make_generator(generator, config.cache_dir)
        if hasattr(llm, "warm_up"):
            llm.warm_up(background=True)  # the first answers wait for the model only if it is still loading
        prepare = functools.partial(use_generator, gen=generator, generator=llm)
        say(f"answers written by the {generator.kind} generator ({llm!r}), every sentence checked against the passages")
    live = LiveQA(config, embedder, prepare)
    try:
        served = describe(index_status(live.get().index))
    except IndexError_ as e:
        served = f"no index ({e})"
    rebuilder = Rebuilder(config, embedder, on_done=live.get)
    demo = create_app(live, rebuilder, FeedbackStore(feedback_db), admin_password=admin_password,
                      max_upload_bytes=max_upload_bytes)
    # Answers are CPU-bound and the model encodes one query at a time, so a few workers keep the
    # cores busy; more only queue inside the process instead of in Gradio's visible queue.
    demo.queue(default_concurrency_limit=concurrency)
    _, url, _ = demo.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=True,
                            max_file_size=max_upload_bytes, css=CSS, footer_links=["api"])
    url = url or f"http://{host}:{port}/"
    print(f"serving {url} — {served}", flush=True)
    print(f"feedback: {feedback_db}; operators' tab: {'on' if admin_password else 'off (set RAG_ADMIN_PASSWORD)'}",
          flush=True)
    demo.block_thread()


if __name__ == "__main__":
    from rag.cli import main

    sys.exit(main(["serve", *sys.argv[1:]]))
