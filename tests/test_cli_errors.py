"""Every `rag` subcommand against bad arguments: one line on stderr, the documented exit code, never a traceback.

Exit codes (rag/cli.py): 0 done, 1 failed, 2 bad usage, 3 question refused, 141 output pipe closed.
Most cases fail before any model loads; the index they need is built with the fake embedder.
"""
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

import rag.cli
from rag.building import build
from rag.cli import EXIT_BROKEN_PIPE, EXIT_FAILED, EXIT_REFUSED, EXIT_USAGE, main
from rag.config import Config
from rag.versions import list_versions

from .conftest import SEED, SEED_ID, FakeEmbedder, corpus_in

BIG_ID = "big_article"


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    """A folder with: corpus/ (seed + a 90 KB article), index/ (two versions, fake embedder), a garbage feedback
    DB, a good empty one, a plain file, a folder and bad QA files."""
    root = tmp_path_factory.mktemp("cli-errors")
    corpus = corpus_in(root)
    config = Config(corpus_dir=corpus, index_dir=root / "index")
    build(config, FakeEmbedder())
    paragraph = "学校召开专题会议，研究部署下一阶段的教学改革与人才培养工作，强调要把各项任务落到实处。"
    body = "\n\n".join(f"{n}. {paragraph}" for n in range(700))  # > 64 KB as JSON: more than a pipe holds
    (corpus / f"{BIG_ID}.txt").write_text(f"一篇很长的报道\n2023年07月05日10时00分    阅读:10\n\n{body}\n", encoding="utf-8")
    build(config, FakeEmbedder())
    (root / "garbage.sqlite3").write_bytes(b"this is not a database\n" * 10)
    sqlite3.connect(root / "empty.sqlite3").close()
    (root / "a_file").write_text("not a folder\n")
    (root / "a_folder").mkdir()
    (root / "not_json.jsonl").write_text("{\"question\": \n", encoding="utf-8")
    (root / "not_objects.jsonl").write_text("[1, 2]\n", encoding="utf-8")
    (root / "binary.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    (root / "empty.jsonl").write_text("\n", encoding="utf-8")
    return root


def rag_cmd(place: Path, *argv: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "RAG_CORPUS": str(place / "corpus"), "RAG_INDEX": str(place / "index"),
                "RAG_FEEDBACK_DB": str(place / "empty.sqlite3"), "XDG_DATA_HOME": str(place / "xdg"), **env}
    full_env.pop("RAG_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "rag", *argv], env=full_env, capture_output=True, text=True,
                          cwd=place, timeout=120)


def assert_one_line_error(proc: subprocess.CompletedProcess, code: int, fragment: str = "") -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rag: "), proc.stderr
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def taken_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


# (argv, exit code, a fragment of the one line); "{p}" is the test folder.
CASES = [
    # usage: 2
    ([], EXIT_USAGE, "required: COMMAND"),
    (["bogus"], EXIT_USAGE, "invalid choice: 'bogus'"),
    (["build", "--no-such-flag"], EXIT_USAGE, "unrecognized arguments: --no-such-flag"),
    (["ask"], EXIT_USAGE, "give a QUESTION"),
    (["ask", "报告会在哪里举行？", "--batch", "{p}/empty.jsonl"], EXIT_USAGE, "not both"),
    (["ask", "报告会在哪里举行？", "--generator", "gpt"], EXIT_USAGE, "invalid choice: 'gpt'"),
    (["eval"], EXIT_USAGE, "required: --qa"),
    (["doc"], EXIT_USAGE, "required: doc_id"),
    (["serve", "--port", "http"], EXIT_USAGE, "port must be a number"),
    (["serve", "--port", "70000"], EXIT_USAGE, "port must be a number"),
    (["serve", "--concurrency", "0"], EXIT_USAGE, "--concurrency must be at least 1"),
    (["serve", "--concurrency", "many"], EXIT_USAGE, "invalid int value"),
    (["feedback", "--no-such-flag"], EXIT_USAGE, "unrecognized arguments"),
    (["index"], EXIT_USAGE, "required: ACTION"),
    (["index", "drop"], EXIT_USAGE, "invalid choice: 'drop'"),
    (["index", "list", "extra"], EXIT_USAGE, "unrecognized arguments: extra"),
    # refused questions: 3, before any index or model is opened
    (["ask", ""], EXIT_REFUSED, "question refused: 请输入一个问题"),
    (["ask", "问" * 10_000], EXIT_REFUSED, "问题太长"),
    (["ask", "🙂🙂"], EXIT_REFUSED, "请用一句中文"),
    # failures: 1
    (["build", "--index", "{p}/a_file"], EXIT_FAILED, "is a file, not a folder"),
    (["build", "--corpus", "{p}/missing"], EXIT_FAILED, "does not exist"),
    (["build", "--corpus", "{p}/a_file"], EXIT_FAILED, "is a file, not a folder"),
    (["ask", "报告会在哪里举行？", "--index", "{p}/missing"], EXIT_FAILED, "no index"),
    (["ask", "--batch", "{p}/missing.jsonl"], EXIT_FAILED, "no such file"),
    (["ask", "--batch", "{p}/a_folder"], EXIT_FAILED, "is a folder"),
    (["eval", "--qa", "{p}/missing.jsonl"], EXIT_FAILED, "no such file"),
    (["eval", "--qa", "{p}/not_json.jsonl"], EXIT_FAILED, "not valid JSON"),
    (["eval", "--qa", "{p}/not_objects.jsonl"], EXIT_FAILED, "not an object with a \"question\""),
    (["eval", "--qa", "{p}/binary.jsonl"], EXIT_FAILED, "--qa"),
    (["eval", "--qa", "{p}/empty.jsonl"], EXIT_FAILED, "has no questions"),
    (["doc", "no-such-doc"], EXIT_FAILED, "no document 'no-such-doc'"),
    (["doc", SEED_ID, "--index", "{p}/missing"], EXIT_FAILED, "no index"),
    (["index", "list", "--index", "{p}/missing"], EXIT_FAILED, "no index versions"),
    (["index", "list", "--index", "{p}/a_file"], EXIT_FAILED, "is a file"),
    (["index", "rollback", "--index", "{p}/index", "20000101-000000-000000"], EXIT_FAILED, "no index version"),
    (["feedback", "--db", "{p}/missing.sqlite3"], EXIT_FAILED, "no feedback database"),
    (["feedback", "--db", "{p}/garbage.sqlite3"], EXIT_FAILED, "not a usable feedback database"),
    (["feedback", "--db", "{p}/a_folder"], EXIT_FAILED, "is a folder"),
    (["feedback", "--export", "{p}/a_folder"], EXIT_FAILED, "is a folder; give the export a file name"),
    (["feedback", "--export", "{p}/missing/x.jsonl"], EXIT_FAILED, "does not exist"),
    (["serve", "--host", "no-such-host.invalid"], EXIT_USAGE, "cannot listen on host"),
]


@pytest.mark.parametrize("argv, code, fragment", CASES, ids=[" ".join(c[0])[:60] or "(none)" for c in CASES])
def test_bad_arguments_get_one_line_and_the_exit_code(place, argv, code, fragment):
    proc = rag_cmd(place, *[a.replace("{p}", str(place)) for a in argv])
    assert_one_line_error(proc, code, fragment)


def test_every_subcommand_is_covered():
    names = set(rag.cli.parser()._subparsers._group_actions[0].choices)
    covered = {argv[0] for argv, _, _ in CASES if argv}
    assert names == {"build", "ask", "eval", "doc", "serve", "feedback", "index"} and names <= covered
    assert {"list", "rollback"} <= {argv[1] for argv, _, _ in CASES if argv[:1] == ["index"] and len(argv) > 1}


@pytest.mark.parametrize("argv, code", [
    (["ask", "--json"], EXIT_USAGE),
    (["build", "--json", "--index", "{p}/a_file"], EXIT_FAILED),
    (["eval", "--json", "--qa", "{p}/missing.jsonl"], EXIT_FAILED),
    (["doc", "--json", "no-such-doc"], EXIT_FAILED),
    (["index", "list", "--json", "--index", "{p}/missing"], EXIT_FAILED),
    (["feedback", "--json", "--db", "{p}/garbage.sqlite3"], EXIT_FAILED),
])
def test_json_failures_print_json_with_an_error(place, argv, code):
    proc = rag_cmd(place, *[a.replace("{p}", str(place)) for a in argv])
    line = assert_one_line_error(proc, code)
    result = json.loads(proc.stdout)
    assert result["error"] == line.removeprefix("rag: ") and result["exit_code"] == code


def test_a_refused_question_with_json_prints_the_answer_with_its_error(place):
    proc = rag_cmd(place, "ask", "--json", "   ")
    assert_one_line_error(proc, EXIT_REFUSED, "请输入")
    result = json.loads(proc.stdout)
    assert result["found"] is False and "请输入" in result["error"] and result["citations"] == []


def test_port_taken_names_the_port_flag_and_fails_before_loading_anything(place, taken_port):
    proc = rag_cmd(place, "serve", "--port", str(taken_port))
    line = assert_one_line_error(proc, EXIT_FAILED, f"127.0.0.1:{taken_port}")
    assert "--port" in line and "RAG_PORT" in line and "GRADIO_SERVER_PORT" not in line
    proc = rag_cmd(place, "serve", RAG_PORT=str(taken_port))
    assert_one_line_error(proc, EXIT_FAILED, "--port")


def test_common_flags_are_accepted_before_and_after_index_actions(place, tmp_path):
    index = tmp_path / "index"
    shutil.copytree(place / "index", index, symlinks=True)
    first, second = (v["version"] for v in list_versions(index))
    # Each order moves `current` to the other version, so each one is seen to take effect.
    for target, argv in ((first, ["index", "rollback", "--index", str(index), first]),
                         (second, ["index", "--index", str(index), "rollback", second]),
                         (first, ["index", "rollback", first, "--index", str(index)])):
        proc = rag_cmd(place, *argv)
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
        assert f"current index is now {target}" in proc.stdout
        assert [v["version"] for v in list_versions(index) if v["current"]] == [target]
    rag_cmd(place, "index", "rollback", second, "--index", str(index))
    proc = rag_cmd(place, "index", "list", "--index", str(index))
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()
    assert [line[2:].split()[0] for line in lines] == [first, second] and lines[1].startswith("* ")
    assert all(line.endswith("  ok") for line in lines)  # every version's state is shown
    listed = json.loads(rag_cmd(place, "index", "list", "--json", "--index", str(index)).stdout)
    assert [v["version"] for v in listed] == [first, second] and {v["status"] for v in listed} == {"ok"}


def test_index_list_shows_a_damaged_version_and_rollback_still_works(place, tmp_path):
    index = tmp_path / "index"
    shutil.copytree(place / "index", index, symlinks=True)
    first, second = (v["version"] for v in list_versions(index))
    (index / "versions" / second / "manifest.json").write_text("{ garbage", encoding="utf-8")
    proc = rag_cmd(place, "index", "list", "--index", str(index))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr
    damaged = next(line for line in proc.stdout.splitlines() if second in line)
    assert damaged.startswith("* ") and "PROBLEM: " in damaged
    assert rag_cmd(place, "index", "rollback", "--index", str(index)).returncode == 0
    proc = rag_cmd(place, "index", "rollback", second, "--index", str(index))
    assert_one_line_error(proc, EXIT_FAILED, f"index version {second} is")


def test_doc_serves_from_a_good_version_when_current_is_damaged(place, tmp_path):
    index = tmp_path / "index"
    shutil.copytree(place / "index", index, symlinks=True)
    second = list_versions(index)[-1]["version"]
    (index / "versions" / second / "chunks.jsonl").unlink()
    proc = rag_cmd(place, "doc", SEED_ID, "--index", str(index))
    assert proc.returncode == 0 and proc.stdout.startswith("学校举行高质量发展中层干部学习研讨班系列专题报告会")
    assert proc.stderr.startswith("rag: warning: ") and len(proc.stderr.splitlines()) == 1


def test_output_cut_short_by_a_closed_pipe_is_quiet(place):
    """`rag doc ... --json | head -c 300`: the reader goes away; no traceback, exit 141 as a shell shows SIGPIPE."""
    env = {**os.environ, "RAG_INDEX": str(place / "index")}
    proc = subprocess.Popen([sys.executable, "-m", "rag", "doc", BIG_ID, "--json"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    head = proc.stdout.read(300)
    proc.stdout.close()  # the output is over 64 KB, so the writer is still blocked on the full pipe
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert head.startswith(b"{") and proc.returncode == EXIT_BROKEN_PIPE
    assert err == "", err


def test_feedback_export_failures_leave_no_temporary_file(place):
    before = set(os.listdir(place)) | set(os.listdir(place / "a_folder"))
    for target in ("a_folder", "missing/x.jsonl", "a_file/x.jsonl"):
        proc = rag_cmd(place, "feedback", "--export", str(place / target))
        assert_one_line_error(proc, EXIT_FAILED)
    assert set(os.listdir(place)) | set(os.listdir(place / "a_folder")) == before
    out = place / "a_folder" / "ratings.jsonl"
    proc = rag_cmd(place, "feedback", "--export", str(out))
    assert proc.returncode == 0 and out.read_text(encoding="utf-8") == ""
    assert os.listdir(place / "a_folder") == ["ratings.jsonl"]
    out.unlink()


def test_a_garbage_feedback_db_turns_ratings_off_in_the_chat(place):
    """serve() keeps the chat up: the store stands in, says why once at start-up, and each 👍/👎 gets a notice."""
    gr = pytest.importorskip("gradio")
    from rag import web

    store, note = web._feedback_or_off(place / "garbage.sqlite3")
    assert note.startswith("OFF (") and "not a usable feedback database" in note
    with pytest.raises(gr.Error, match="反馈功能暂时关闭"):
        store.add(rating="up", question="q", understood="q", answer="a", found=True, citations=[],
                  index_version=None)
    good, note = web._feedback_or_off(place / "empty.sqlite3")
    assert note == str(place / "empty.sqlite3") and good.rows() == []


def test_an_unexpected_error_is_one_line_with_a_hint_and_debug_shows_the_traceback(monkeypatch, capsys):
    def broken(args, settings):
        raise KeyError("surprise")

    monkeypatch.setattr(rag.cli, "cmd_doc", broken)
    assert main(["doc", "x"], {}) == EXIT_FAILED
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "KeyError" in err and "--debug" in err and "RAG_DEBUG=1" in err
    assert main(["doc", "x"], {"RAG_DEBUG": "0"}) == EXIT_FAILED  # "0" is off
    with pytest.raises(KeyError):
        main(["doc", "x", "--debug"], {})
    with pytest.raises(KeyError):
        main(["doc", "x"], {"RAG_DEBUG": "1"})


def test_build_is_quiet_and_strict_json_names_a_hidden_file(tmp_path, model_cache):
    """Real model: --quiet prints nothing (not even jieba's dictionary lines); --strict --json fails in JSON,
    naming the hidden file it skipped."""
    corpus = corpus_in(tmp_path)
    env = {"RAG_CACHE_DIR": str(model_cache), "RAG_CORPUS": str(corpus), "RAG_INDEX": str(tmp_path / "index")}
    proc = rag_cmd(tmp_path, "build", "--quiet", **env)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    shutil.copy(SEED, corpus / ".draft.txt")
    proc = rag_cmd(tmp_path, "build", "--strict", "--json", **env)
    line = assert_one_line_error(proc, EXIT_FAILED, ".draft.txt (hidden file")
    assert json.loads(proc.stdout)["error"] == line.removeprefix("rag: ")
    summary = json.loads(rag_cmd(tmp_path, "build", "--json", **env).stdout)
    assert summary["skipped"] == [{"path": ".draft.txt", "reason": summary["skipped"][0]["reason"]}]
    assert summary["skipped"][0]["reason"].startswith("hidden file")
    assert summary["unchanged"]  # a skipped file changes no document: no new version
