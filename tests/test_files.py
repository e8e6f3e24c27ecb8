"""rag.files: sha256_file against hashlib on whole bytes, write_atomic's contents, mode and cleanup."""

import hashlib
import os
import stat

import pytest

from rag import files
from rag.files import sha256_file, staged_folder, write_atomic


def test_sha256_file_is_hashlib_over_the_whole_file(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    assert sha256_file(empty) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    big = tmp_path / "big.bin"
    data = os.urandom(3 * (1 << 20) + 7)  # more than one read block, not a whole number of them
    big.write_bytes(data)
    assert sha256_file(big) == hashlib.sha256(data).hexdigest()
    assert sha256_file(str(big)) == sha256_file(big)


def test_sha256_file_without_file_digest_gives_the_same_hash(tmp_path, monkeypatch):
    path = tmp_path / "a.bin"
    path.write_bytes(b"x" * ((1 << 20) + 1))
    expected = sha256_file(path)
    monkeypatch.setattr(files.sys, "version_info", (3, 10, 0))  # the Python 3.10 read loop
    assert sha256_file(path) == expected == hashlib.sha256(b"x" * ((1 << 20) + 1)).hexdigest()


def test_write_atomic_writes_text_as_utf8_and_bytes_as_they_are(tmp_path):
    out = tmp_path / "out.json"
    write_atomic(out, '{"问题": "谁讲话？"}\n')
    assert out.read_bytes() == '{"问题": "谁讲话？"}\n'.encode("utf-8")
    write_atomic(out, b"\x00\x01")  # replaces the old file
    assert out.read_bytes() == b"\x00\x01"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temporary file left


def test_write_atomic_gives_the_mode_open_would_or_the_one_asked(tmp_path):
    umask = os.umask(0o027)
    try:
        write_atomic(tmp_path / "plain", "x")
        write_atomic(tmp_path / "shared", "x", mode=0o644)
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "shared").stat().st_mode) == 0o644


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path, monkeypatch):
    out = tmp_path / "out.txt"
    out.write_text("old", encoding="utf-8")

    def fail(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", fail)
    with pytest.raises(OSError, match="No space"):
        write_atomic(out, "new")
    assert out.read_text(encoding="utf-8") == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_write_atomic_into_a_missing_folder_is_an_oserror(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_atomic(tmp_path / "nope" / "out.txt", "x")


def test_a_staged_folder_appears_whole_and_shareable_or_not_at_all(tmp_path):
    dest = tmp_path / "cache" / "model"
    with staged_folder(dest, ".done") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "weights.bin").write_bytes(b"w")
        (tmp / ".done").write_text("ok")
        assert not dest.exists()  # nothing shows until the block ends
    assert (dest / "sub" / "weights.bin").read_bytes() == b"w"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o755 and stat.S_IMODE((dest / ".done").stat().st_mode) == 0o644
    failed = tmp_path / "cache" / "other"
    with pytest.raises(RuntimeError):
        with staged_folder(failed, ".done") as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("conversion failed")
    assert not failed.exists() and sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["model"]


def test_a_staged_folder_that_lost_the_race_keeps_the_winner(tmp_path):
    dest = tmp_path / "model"
    dest.mkdir()
    (dest / ".done").write_text("first")
    (dest / "weights.bin").write_text("first")
    with staged_folder(dest, ".done") as tmp:
        (tmp / ".done").write_text("second")
    assert (dest / ".done").read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["model"]
