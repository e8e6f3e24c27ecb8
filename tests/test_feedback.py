"""👍/👎 storage: round trip through SQLite, concurrent writers, JSONL export, `rag feedback`."""
import json
import sqlite3
import threading

import pytest

from rag.cli import main
from rag.feedback import DisabledFeedback, FeedbackError, FeedbackStore

CITATION = {"doc_id": "000_3ab29ec542edc89a", "title": "学校举行高质量发展中层干部学习研讨班系列专题报告会",
            "speaker": None, "start": 84, "end": 123, "text": "7月4日,学校在慎行楼乐之厅举行高质量发展中层干部学习研讨班系列专题报告会。"}


def rate(store, rating="up", question="报告会在哪里举行？"):
    return store.add(rating=rating, question=question, understood=question, answer=CITATION["text"], found=True,
                     citations=[CITATION], index_version="20230704-000000-000000")


def test_round_trip(tmp_path):
    store = FeedbackStore(tmp_path / "sub" / "feedback.sqlite3")  # parent folders are created
    first = rate(store)
    second = rate(store, "down", "学校今年的科研经费是多少？")
    rows = store.rows()
    assert [r["id"] for r in rows] == [first, second]
    assert rows[0]["rating"] == "up" and rows[1]["rating"] == "down"
    assert rows[0]["citations"] == [CITATION]
    assert rows[0]["found"] is True
    assert rows[0]["index_version"] == "20230704-000000-000000"
    assert rows[0]["created_at"][:2] == "20" and "T" in rows[0]["created_at"]


def test_reopening_keeps_ratings(tmp_path):
    path = tmp_path / "feedback.sqlite3"
    rate(FeedbackStore(path))
    assert len(FeedbackStore(path).rows()) == 1


def test_unknown_rating_is_refused(tmp_path):
    with pytest.raises(ValueError, match="rating"):
        rate(FeedbackStore(tmp_path / "f.sqlite3"), rating="meh")


def test_a_newer_schema_is_not_touched(tmp_path):
    path = tmp_path / "f.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(FeedbackError, match="schema version 99"):
        FeedbackStore(path)


@pytest.mark.parametrize("content, fragment", [
    (b"not a database at all\n" * 50, "not a usable feedback database (file is not a database)"),
    (b"SQLite format 3\x00" + b"\xff" * 200, "not a usable feedback database"),
])
def test_a_file_that_is_not_our_database_is_one_clear_error(tmp_path, content, fragment):
    path = tmp_path / "f.sqlite3"
    path.write_bytes(content)
    with pytest.raises(FeedbackError, match="RAG_FEEDBACK_DB") as caught:
        FeedbackStore(path)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)
    assert path.read_bytes() == content  # never "repaired" over a user's file


def test_a_feedback_table_of_another_program_is_refused(tmp_path):
    path = tmp_path / "f.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE feedback (id INTEGER PRIMARY KEY, stars INTEGER)")
    with pytest.raises(FeedbackError, match="did not write"):
        FeedbackStore(path)


def test_export_to_a_folder_or_a_missing_folder_fails_cleanly(tmp_path):
    store = FeedbackStore(tmp_path / "f.sqlite3")
    rate(store)
    (tmp_path / "out").mkdir()
    with pytest.raises(FeedbackError, match="is a folder"):
        store.export_jsonl(tmp_path / "out")
    with pytest.raises(FeedbackError, match="does not exist"):
        store.export_jsonl(tmp_path / "missing" / "x.jsonl")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.sqlite3", "out"] and not any((tmp_path / "out").iterdir())


def test_disabled_feedback_refuses_ratings_with_its_reason(tmp_path):
    off = DisabledFeedback(tmp_path / "f.sqlite3", "not a usable feedback database")
    with pytest.raises(FeedbackError, match="feedback is off: not a usable"):
        rate(off)
    assert off.rows() == []


def test_concurrent_writers_lose_nothing(tmp_path):
    store = FeedbackStore(tmp_path / "f.sqlite3")
    threads = [threading.Thread(target=lambda: [rate(store) for _ in range(10)]) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.rows()) == 80


def test_cli_export_writes_readable_jsonl(tmp_path, monkeypatch, capsys):
    path = tmp_path / "f.sqlite3"
    store = FeedbackStore(path)
    rate(store)
    rate(store, "down")
    monkeypatch.setenv("RAG_FEEDBACK_DB", str(path))
    out = tmp_path / "feedback.jsonl"
    assert main(["feedback", "--export", str(out)]) == 0
    lines = out.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["rating"] for line in lines] == ["up", "down"]
    assert "慎行楼乐之厅" in lines[0]  # ensure_ascii=False: the Chinese is readable
    assert "wrote 2 ratings" in capsys.readouterr().out
    assert main(["feedback"]) == 0
    assert "2 ratings (1 👍, 1 👎" in capsys.readouterr().out


def test_cli_without_a_database_says_so(tmp_path, capsys):
    assert main(["feedback", "--db", str(tmp_path / "missing.sqlite3"), "--export", str(tmp_path / "x.jsonl")]) == 1
    assert "no feedback database" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()
