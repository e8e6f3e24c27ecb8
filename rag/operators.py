"""The operators' tab without any UI: its login, index status and kept versions, upload previews, adding
articles and rebuilding in the background. rag/web.py wires it to Gradio."""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import hmac
import html
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator

from .chat import Chat
from .index import IndexFault
from .serving import index_status
from .stores import list_versions
from .uploads import MAX_UPLOAD_BYTES, Upload, UploadError, add_uploads, inspect_upload

ICON_OK, ICON_BAD, ICON_WARN = ('<span class="rag-icon rag-icon-ok"></span>', '<span class="rag-icon rag-icon-bad"></span>',
                                '<span class="rag-icon rag-icon-warn"></span>')


@dataclasses.dataclass(frozen=True)
class Progress:
    """One step of adding or rebuilding: the progress text and index status; `preview`: the upload table to
    show once files were added (None: nothing was added, the uploads stay as they are)."""

    text: str
    status: str
    preview: str | None = None


def local_time(stamp: str | None) -> str:
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


def preview_html(uploads: list[Upload], added: bool = False) -> str:
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


class Operators:
    """The operators' tab without its login: index status, upload previews, adding articles, rebuilding.

    The caller checks that the session logged in (LoginGuard) before calling any of these.
    """

    def __init__(self, chat: Chat, *, max_upload_bytes: int = MAX_UPLOAD_BYTES, poll: float = 0.5):
        self.chat, self.max_upload_bytes, self.poll = chat, max_upload_bytes, poll
        self.rebuilder, self.live = chat.rebuilder, chat.live
        self.config = self.rebuilder.config

    def status(self) -> str:
        """The served index and every kept version, as Markdown."""
        qa, problem = self.chat.current()
        if qa is None:
            out = f"**索引状态：** {problem}"
        else:
            s = index_status(qa.index)
            out = (f"| 文章数 | 段落数 | 嵌入模型 | 构建时间 | 版本 |\n|---|---|---|---|---|\n"
                   f"| {s['documents']} | {s['chunks']} | {s['model']} | {local_time(s['built_at'])} | {s['version']} |")
        return out + self._versions()

    def _versions(self) -> str:
        """Every kept version and its state (a damaged one says why), and why another than `current` serves."""
        problems = "".join(f"\n\n**注意：** {html.escape(p)}" for p in self.live.problems)
        rows = [f"| {v['version']} | {local_time(v['built_at']) if v.get('built_at') else '?'} | "
                f"{v['documents'] if v.get('documents') is not None else '?'} | "
                f"{'是' if v['current'] else ''} | {'正常' if v['problem'] is None else html.escape(v['problem'])} |"
                for v in reversed(self._listed())]
        table = "\n\n| 保留的版本 | 构建时间 | 文章数 | current | 状态 |\n|---|---|---|---|---|\n" + "\n".join(rows) if rows else ""
        return problems + table

    def _listed(self) -> list[dict]:
        try:
            return list_versions(self.live.config)
        except IndexFault:  # the store is unreachable: the status above says so
            return []

    def preview(self, paths: Iterable[str | Path] | None) -> list[Upload]:
        """Each uploaded file checked as the build would read it (nothing is written); see preview_html."""
        qa, _ = self.chat.current()
        known = {d["content_hash"]: d["title"] for d in qa.index.manifest["documents"]} if qa else {}
        uploads = []
        for path in paths or []:
            path = Path(path)
            try:
                data = path.read_bytes()
            except OSError as e:
                uploads.append(Upload(path.name, "", b"", error=f"无法读取上传的文件（{e.strerror or e}）。"))
                continue
            uploads.append(inspect_upload(path.name, data, self.config.corpus_dir, self.config, known,
                                          self.max_upload_bytes))
        return uploads

    def add_and_rebuild(self, uploads: list[Upload] | None) -> Iterator[Progress]:
        """Write the accepted uploads into the corpus and rebuild, following the rebuild until it ends."""
        accepted = [u for u in uploads or [] if u.ok]
        if not accepted:
            yield Progress("没有可以添加的文件：请先上传并检查预览中的结果。", self.status())
            return
        if self.rebuilder.running:
            yield Progress("已有一次重建正在进行，请等它完成后再添加。", self.status())
            return
        try:
            written = add_uploads(accepted, self.config.corpus_dir)
        except UploadError as e:
            yield Progress(str(e), self.status())
            return
        added = "、".join(p.name for p in written)
        shown = preview_html(uploads, added=True)  # what was added stays listed, marked as added
        self.rebuilder.start()
        for step in self._watch(prefix=f"已添加：{added}\n"):
            yield dataclasses.replace(step, preview=shown)

    def rebuild(self) -> Iterator[Progress]:
        """Rebuild from the corpus as it is (or follow the rebuild already running)."""
        self.rebuilder.start()
        yield from self._watch(prefix="")

    def _watch(self, prefix: str) -> Iterator[Progress]:
        rebuilder = self.rebuilder
        while rebuilder.running:
            yield Progress(prefix + "\n".join(rebuilder.lines[-12:]), self.status())
            time.sleep(self.poll)
        if rebuilder.error:
            done = f"重建失败：{rebuilder.error}\n聊天继续使用原来的索引。"
        elif rebuilder.report is not None:
            m = rebuilder.report.manifest
            done = f"重建完成：版本 {m['version']}，{m['counts']['documents']} 篇文章、{m['counts']['chunks']} 个段落。"
        else:
            done = "重建没有完成，详情见服务器日志；聊天继续使用原来的索引。"
        yield Progress(prefix + "\n".join(rebuilder.lines[-12:]) + "\n" + done, self.status())
