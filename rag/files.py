"""File helpers shared by the stages: the sha256 of a file, and a write that is all or nothing."""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator


def sha256_file(path: str | os.PathLike) -> str:
    """The hex sha256 of the file at `path`, read in blocks so a large model file is never held whole.

    sha256_file("empty.txt") -> "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    """
    with open(path, "rb") as fh:
        if sys.version_info >= (3, 11):
            return hashlib.file_digest(fh, "sha256").hexdigest()
        digest = hashlib.sha256()  # Python 3.10 has no file_digest
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
        return digest.hexdigest()


def write_atomic(path: str | os.PathLike, data: bytes | str, *, mode: int | None = None) -> None:
    """Write `data` (str as UTF-8) to `path` so that readers see the old file or the new one, never a part.

    The bytes go to a hidden temporary file in the same folder (os.replace only renames within one file
    system), are fsynced, and the temporary file is renamed over `path`; on any failure it is removed.
    The file gets the permissions a plain open() would give (0666 less the umask), or `mode` when given.

    write_atomic("out.json", "{}") -> out.json holds exactly "{}"
    """
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    # os.open with O_EXCL rather than tempfile.mkstemp: mkstemp makes the file 0600, not what open() gives.
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            if mode is not None:
                os.chmod(tmp, mode)
            os.fsync(fh.fileno())  # the data is on disk before the rename makes it the file
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def staged_folder(dest: Path, marker: str) -> Iterator[Path]:
    """A temporary folder beside `dest` to fill; when the block ends without error it is renamed into place
    (readers see no folder or a whole one), and it is removed on any failure.

    A `dest` that already holds `marker` (another process converted the same thing first) is kept. mkdtemp
    makes the folder private; a cache entry is made as shareable as any other (0755 folders, 0644 files).

    with staged_folder(cache / "model", ".done") as tmp: (tmp / ".done").write_text("ok")
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        yield tmp
        for p in tmp.rglob("*"):
            p.chmod(0o755 if p.is_dir() else 0o644)
        tmp.chmod(0o755)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not (dest / marker).is_file():  # not a lost race with another converting process
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
