"""The `rag` command end to end with the real model: JSON shapes, batch order, and clear messages for bad input."""
import json
import os
import subprocess
import sys

import pytest

from rag.cli import EXIT_REFUSED, main

from .conftest import QA_COPY, SEED_ID, corpus_in


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory, model_cache):
    root = tmp_path_factory.mktemp("cli")
    corpus = corpus_in(root)
    # main() takes the environment it resolves settings from, so these tests neither read nor change os.environ
    # (a RAG_GENERATOR in the shell that runs them does not reach them).
    env = {"RAG_CORPUS": str(corpus), "RAG_INDEX": str(root / "index"), "RAG_CACHE_DIR": str(model_cache)}
    assert main(["build", "--quiet"], env) == 0
    return env


def run(capsys, env, *argv):
    code = main(list(argv), env)
    out, err = capsys.readouterr()
    return code, out, err


def test_ask_json_has_answer_citations_passages_and_timings(cli_env, capsys):
    code, out, _ = run(capsys, cli_env, "ask", "--json", "张根华作的报告叫什么名字？")
    assert code == 0
    result = json.loads(out)
    assert result["found"] and "识变与求变" in result["answer"] and len(result["answer"]) <= 150
    assert {"retrieve", "answer"} <= set(result["timings_ms"])
    assert len(result["passages"]) >= 5
    assert {"doc_id", "text", "score", "speaker", "start", "end"} <= set(result["passages"][0])
    _, doc_out, _ = run(capsys, cli_env, "doc", SEED_ID, "--json")
    doc = json.loads(doc_out)
    for c in result["citations"]:
        assert doc["text"][c["start"] : c["end"]] == c["text"]
        assert {"doc_id", "title", "speaker"} <= set(c)
    assert doc["title"] == "学校举行高质量发展中层干部学习研讨班系列专题报告会" and doc["read_count"] == 2214


def test_batch_prints_one_object_per_line_in_order(cli_env, capsys):
    code, out, _ = run(capsys, cli_env, "ask", "--json", "--batch", str(QA_COPY))
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    questions = [json.loads(line)["question"] for line in QA_COPY.read_text(encoding="utf-8").splitlines()]
    assert [x["question"] for x in lines] == questions


@pytest.mark.parametrize(
    "question, fragment",
    [("", "请输入"), ("   ", "请输入"), ("问" * 10_000, "太长"), ("🙂🙂", "提问")],
)
def test_bad_questions_get_a_clear_message(cli_env, capsys, question, fragment):
    code, out, err = run(capsys, cli_env, "ask", "--json", question)
    assert code == EXIT_REFUSED and "Traceback" not in err
    assert err.startswith("rag: question refused: ") and len(err.splitlines()) == 1 and fragment in err
    result = json.loads(out)
    assert result["found"] is False and fragment in result["answer"] and result["error"]


def test_a_refused_question_in_a_batch_is_answered_in_its_place_and_exits_3(cli_env, capsys, tmp_path):
    batch = tmp_path / "batch.jsonl"
    batch.write_text('{"question": "报告会在哪里举行？"}\n{"question": ""}\n', encoding="utf-8")
    code, out, err = run(capsys, cli_env, "ask", "--json", "--batch", str(batch))
    first, second = (json.loads(line) for line in out.splitlines())
    assert code == EXIT_REFUSED and first["found"] and second["error"]
    assert err.startswith("rag: 1 of 2 questions refused: 请输入") and len(err.splitlines()) == 1


def test_emoji_around_a_chinese_question_is_answered(cli_env, capsys):
    _, out, _ = run(capsys, cli_env, "ask", "--json", "🙂报告会在哪里举行？👍")
    result = json.loads(out)
    assert result["found"] and "慎行楼乐之厅" in result["answer"]


def test_unanswerable_question_declines_and_shows_passages(cli_env, capsys):
    _, out, _ = run(capsys, cli_env, "ask", "学校今年的科研经费是多少？")
    assert "文章中没有提到" in out and "最接近的段落" in out


def test_eval_prints_the_metrics(cli_env, capsys):
    code, out, _ = run(capsys, cli_env, "eval", "--qa", str(QA_COPY), "--json")
    result = json.loads(out)
    assert code == 0 and result["hit@5"] == 1.0 and result["answer_accuracy"] >= 0.85  # 0.889 measured
    assert result["retrieve_ms_p50"] > 0 and result["false_refusals"] <= 1


def test_missing_index_and_empty_corpus_are_one_line_errors(tmp_path):
    env = {**os.environ, "RAG_INDEX": str(tmp_path / "none"), "RAG_CORPUS": str(tmp_path / "empty")}
    (tmp_path / "empty").mkdir()
    for argv in (["ask", "报告会在哪里举行？"], ["build"], ["doc", "x"]):
        proc = subprocess.run([sys.executable, "-m", "rag", *argv], env=env, capture_output=True, text=True)
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.startswith("rag: ") and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_help_is_instant_and_lists_commands():
    proc = subprocess.run([sys.executable, "-m", "rag", "--help"], capture_output=True, text=True, timeout=20)
    assert proc.returncode == 0 and all(c in proc.stdout for c in ("build", "ask", "eval", "doc"))
    probe = "import sys, rag.cli; print('torch' in sys.modules, 'faiss' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip()
    assert out == "False False"
