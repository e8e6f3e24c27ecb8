"""Article files uploaded by operators: checked, parsed for a preview, then added to the corpus folder.

Nothing is written until `add_uploads`; a file that fails any check is reported and never written.
"""
from __future__ import annotations

import os
import re
import tempfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from .chunking import chunk_article
from .config import Config
from .corpus import load_corpus

ALLOWED_SUFFIXES = (".txt", ".md", ".jsonl", ".html", ".htm", ".docx")
MAX_UPLOAD_BYTES = 5_000_000  # one news report is a few KB; 5 MB leaves room for a JSONL batch


class UploadError(ValueError):
    """An uploaded file that cannot be added; the message says why, in Chinese."""


@dataclass(frozen=True)
class ArticlePreview:
    doc_id: str
    title: str
    date: str | None
    speakers: tuple[str, ...]
    segments: int  # chunks the article becomes in the index


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
        previews.append(ArticlePreview(article.doc_id, article.title, article.date, speakers, len(chunks)))
    return Upload(original, name, data, tuple(previews))


def add_uploads(uploads: list[Upload], corpus_dir: Path) -> list[Path]:
    """Write the accepted uploads into `corpus_dir`; never overwrites a file. Returns the paths written."""
    corpus_dir = Path(corpus_dir)
    corpus_dir.mkdir(parents=True, exist_ok=True)
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
            try:
                os.link(tmp, final)
            except FileExistsError:
                raise UploadError(f"语料库中已有同名文件 {up.name}：请改名后再上传。") from None
        finally:
            os.unlink(tmp)
        written.append(final)
    return written
