"""Article files uploaded by operators: checked, parsed for a preview, then added to the corpus folder.

Nothing is written until `add_uploads`; a file that fails any check is reported and never written.
"""
from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from .chunking import chunk_article
from .config import Config
from .corpus import load_corpus
from .errors import RagError

ALLOWED_SUFFIXES = (".txt", ".md", ".jsonl", ".html", ".htm", ".docx")
MAX_UPLOAD_BYTES = 5 * 2**20  # one news report is a few KB; 5 MB leaves room for a JSONL batch. Binary MB,
# as browsers and Gradio count them, so the label, the refusal and the limit all say "5 MB".
# The 163 articles of corpus/ and /work/shared/eval/news_corpus make 7 to 25 passages each; an article
# eight times the largest is a scrape of a whole site or a book, worth a second look before it is added.
LARGE_ARTICLE_PASSAGES = 200


class UploadError(RagError, ValueError):
    """An uploaded file that cannot be added; the message says why, in Chinese."""


@dataclass(frozen=True)
class ArticlePreview:
    doc_id: str
    title: str
    date: str | None
    speakers: tuple[str, ...]
    segments: int  # chunks the article becomes in the index
    warning: str | None = None  # added all the same, but the operator should look (an unusually large article)


@dataclass(frozen=True)
class Upload:
    original: str  # the file name as uploaded
    name: str  # the name it gets in the corpus folder ("" when the name itself was refused)
    data: bytes  # what will be written: the file as uploaded
    articles: tuple[ArticlePreview, ...] = ()
    error: str | None = None  # why it will not be added

    @property
    def ok(self) -> bool:
        return self.error is None


def safe_name(name: str) -> str:
    """A file name that stays inside the corpus folder: no folders, no leading dot, plain characters.

    safe_name("../../etc/报告 (1).TXT") -> "报告_1.txt"
    """
    base = re.split(r"[\\/]", unicodedata.normalize("NFKC", name or ""))[-1]
    stem, dot, suffix = base.rpartition(".")
    suffix = "." + suffix.lower() if dot else ""
    if suffix not in ALLOWED_SUFFIXES:
        shown = suffix or "（无扩展名）"
        raise UploadError(f"不支持的文件类型 {shown}：只接受 {'、'.join(ALLOWED_SUFFIXES)} 文件。")
    # \w is Unicode-aware, so Chinese names survive; dots go too, so ".." and hidden files cannot arise.
    stem = re.sub(r"[^\w-]+", "_", stem).strip("_-")[:80]
    if not stem:
        raise UploadError(f"文件名「{name}」无效：请用字母、数字或汉字命名。")
    return stem + suffix


def inspect_upload(original: str, data: bytes, corpus_dir: Path, config: Config,
                   known: dict[str, str] | None = None, max_bytes: int = MAX_UPLOAD_BYTES) -> Upload:
    """Check one uploaded file and parse it as the index build will; never writes to `corpus_dir`.

    `known` maps content hashes of articles already indexed to their titles, to refuse duplicates.
    """
    try:
        name = safe_name(original)
    except UploadError as e:
        return Upload(original, "", b"", error=str(e))
    if not data:
        return Upload(original, name, b"", error="文件是空的。")
    if len(data) > max_bytes:
        return Upload(original, name, b"",
                      error=f"文件太大（{len(data) / 1e6:.1f} MB，上限 {max_bytes / 1e6:.1f} MB）。")
    if (Path(corpus_dir) / name).exists():
        return Upload(original, name, data, error=f"语料库中已有同名文件 {name}：请改名后再上传。")

    with tempfile.TemporaryDirectory(prefix="rag-upload-") as tmp:
        (Path(tmp) / name).write_bytes(data)
        # The build's own reader, so the preview shows exactly what the index will contain.
        articles, skipped = load_corpus(Path(tmp), config)
    if skipped:
        reasons = "；".join(s.reason for s in skipped[:3])
        return Upload(original, name, data, error=f"无法解析这个文件（{reasons}），未做任何改动。")
    if not articles:
        return Upload(original, name, data, error="这个文件里没有找到文章。")
    known = known or {}
    previews = []
    for article in articles:
        if article.content_hash in known:
            return Upload(original, name, data, error=f"与已收录的文章「{known[article.content_hash]}」内容相同。")
        chunks = chunk_article(article, config)
        speakers = tuple(dict.fromkeys(c.speaker for c in chunks if c.speaker))
        warning = None
        if len(chunks) > LARGE_ARTICLE_PASSAGES:
            warning = (f"这篇文章异常大：{len(chunks)} 个段落（一般新闻只有几十个），会拖慢重建、"
                       f"挤占回答的来源，请确认确实要添加。")
        previews.append(ArticlePreview(article.doc_id, article.title, article.date, speakers, len(chunks), warning))
    return Upload(original, name, data, tuple(previews))


def add_uploads(uploads: list[Upload], corpus_dir: Path) -> list[Path]:
    """Write the accepted uploads into `corpus_dir`; never overwrites a file. Returns the paths written."""
    corpus_dir = Path(corpus_dir)
    corpus_dir.mkdir(parents=True, exist_ok=True)
    mode = corpus_mode(corpus_dir)
    written = []
    for up in uploads:
        if not up.ok:
            continue
        final = corpus_dir / up.name
        if final.resolve().parent != corpus_dir.resolve():
            raise UploadError(f"文件名 {up.name} 不在语料库文件夹内。")  # safe_name makes this impossible
        # Hidden temp name (the corpus reader skips dot files), then a hard link: the file appears
        # complete or not at all, and an existing file of that name is never replaced.
        fd, tmp = tempfile.mkstemp(prefix=".upload-", dir=corpus_dir)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(up.data)
                os.fchmod(fh.fileno(), mode)  # mkstemp makes it 0600; the corpus's other files are readable
            try:
                os.link(tmp, final)
            except FileExistsError:
                raise UploadError(f"语料库中已有同名文件 {up.name}：请改名后再上传。") from None
        finally:
            os.unlink(tmp)
        written.append(final)
    return written


def corpus_mode(corpus_dir: Path) -> int:
    """The permission bits an added file gets: those of the corpus's newest article, or 0666 less the umask."""
    files = [p for p in Path(corpus_dir).iterdir() if p.is_file() and not p.name.startswith(".")]
    if files:
        return stat.S_IMODE(max(files, key=lambda p: p.stat().st_mtime).stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def fresh_upload_dir(path: Path) -> Path:
    """Empty `path` (files left by a server that was killed) and make it private to this user."""
    path = Path(path)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, mode=0o700)
    return path


class UploadQuota:
    """What one client may send to the upload route within `window` seconds: `max_requests` uploads and
    `max_bytes` in all, each request at most `max_request_bytes`. Refusals are messages in Chinese.

    Uploads reach the server before anyone logs in (the browser sends a file as soon as it is picked), so
    this bounds what an anonymous client can make the server store, not who may add articles.
    """

    def __init__(self, max_request_bytes: int, max_requests: int = 30, max_bytes: int | None = None,
                 window: float = 3600.0, clock=time.monotonic):
        self.max_request_bytes, self.max_requests, self.window = max_request_bytes, max_requests, window
        self.max_bytes = max_bytes if max_bytes is not None else 4 * max_request_bytes
        self.clock = clock
        self._seen: dict[str, list[tuple[float, int]]] = {}  # client -> (time, bytes) of its recent uploads

    def admit(self, client: str, size: int | None) -> str | None:
        """None, counting the upload against `client`; or why it is refused. `size`: the request's length."""
        now = self.clock()
        for key in [k for k, v in self._seen.items() if v[-1][0] <= now - self.window]:
            del self._seen[key]  # forget clients whose uploads are all old, so the table stays small
        if size is None:
            return "上传被拒绝：请求没有注明大小。"
        if size > self.max_request_bytes:
            return f"上传被拒绝：一次最多上传 {self.max_request_bytes / 2**20:.0f} MB。"
        recent = [(t, n) for t, n in self._seen.get(client, []) if t > now - self.window]
        wait = -int((now - recent[0][0] - self.window) // 1) if recent else 0  # until the oldest one expires
        if len(recent) >= self.max_requests:
            return f"上传次数太多，请 {_minutes(wait)}后再试。"
        if sum(n for _, n in recent) + size > self.max_bytes:
            return f"上传的文件总量太大，请 {_minutes(wait)}后再试。"
        self._seen[client] = recent + [(now, size)]
        return None


def _minutes(seconds: int) -> str:
    """_minutes(30) -> "30 秒"; _minutes(125) -> "3 分钟" """
    return f"{seconds} 秒" if seconds < 60 else f"{-(-seconds // 60)} 分钟"
