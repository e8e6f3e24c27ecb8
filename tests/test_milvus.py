"""The Milvus backend (rag/milvus.py behind rag/stores.py) against a real `milvus-lite server`, with the fake embedder
(fast tier): the same hits and answers as FAISS, versions behind an alias (rollback, pruning), a build killed while
publishing, errors in one line, a chat that keeps running while Milvus is down, and incremental builds.

No mock of pymilvus anywhere: a build that is killed is a real process killed with SIGKILL mid-publish."""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from rag import stores
from rag.answering import QA, LiveQA
from rag.chat import STORE_FAILED, Chat, Session
from rag.config import Config
from rag.index import IndexFault, StoreUnreachable
from rag.retrieval import Filters, Retriever
from rag.serving import Rebuilder
from rag.versions import KEEP_VERSIONS
from rag.versions import open_serving as open_folder

from .conftest import ROOT, SEED_ID, FakeEmbedder, MilvusServer, corpus_in, free_port

NEWS = ROOT.parent / "shared" / "eval" / "news_corpus"
QA_FILE = ROOT / "tests" / "data" / "seed_qa.jsonl"
QUESTIONS = [json.loads(line)["question"] for line in QA_FILE.open(encoding="utf-8") if line.strip()][:10]
WHERE = "报告会在哪里举行？"
STORE_FAILED_START = STORE_FAILED.split("：")[0]  # "检索库暂时无法访问"
NO_SUCH_SPEAKER = "没有这个人"


def news(n: int) -> list[Path]:
    """The first n articles of the shared news corpus (copied into tmp_path by corpus_in)."""
    files = sorted(NEWS.glob("*.txt"))[:n]
    assert len(files) == n, f"needs {n} articles in {NEWS} (../shared beside the repository)"
    return files


def milvus_config(root: Path, server: MilvusServer, corpus: Path, **changes) -> Config:
    return Config(backend="milvus", milvus_uri=server.uri, corpus_dir=corpus, index_dir=root / "index",
                  cache_dir=root / "cache", model=FakeEmbedder.name, **changes)


def add_article(config: Config, name: str, n: int = 1) -> None:
    (Path(config.corpus_dir) / f"{name}.txt").write_text(
        f"读书日活动第{n}场\n4月23日，图书馆举办第{n}场读书日活动。馆长作了讲话，号召师生多读书、读好书。\n",
        encoding="utf-8")


def collections(config: Config) -> list[str]:
    return stores.milvus_store(config).call("list_collections")


def one_line(text: str) -> str:
    assert "\n" not in text and "Traceback" not in text, text
    return text


def wait_until_reachable(config: Config, timeout: float = 60) -> None:
    """Poll the store until it answers (the client reconnects with its own back-off after a restart)."""
    store, deadline = stores.milvus_store(config), time.monotonic() + timeout
    while True:
        try:
            store.call("list_collections")
            return
        except StoreUnreachable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)  # polling for the client's reconnection, not timing a race


# ---------------------------------------------------------------- 1. the same hits and answers as FAISS


@pytest.fixture
def published(tmp_path, milvus_server, fake_embedder):
    """The seed article and three news articles, built once: the FAISS folder and the same version in Milvus."""
    config = milvus_config(tmp_path, milvus_server, corpus_in(tmp_path, *news(3)))
    report = stores.build(config, fake_embedder)
    return config, report


def assert_same_hits(faiss_hits, milvus_hits, why) -> None:
    assert [h.row for h in milvus_hits] == [h.row for h in faiss_hits], why
    for f, m in zip(faiss_hits, milvus_hits):
        assert m.chunk == f.chunk, why
        assert abs(m.score - f.score) <= 1e-4, (why, f.row, f.score, m.score)
        assert abs(m.dense_score - f.dense_score) <= 1e-4, (why, f.row, f.dense_score, m.dense_score)
        assert (m.bm25_score is None) == (f.bm25_score is None), (why, f.row, f.bm25_score, m.bm25_score)
        if f.bm25_score is not None:
            assert abs(m.bm25_score - f.bm25_score) <= 1e-4, (why, f.row, f.bm25_score, m.bm25_score)


def test_milvus_returns_the_same_rows_scores_and_answers_as_faiss_with_and_without_filters(published, fake_embedder):
    config, report = published
    faiss_index, faiss_problems = open_folder(config.index_dir, config.model)
    milvus_index, milvus_problems = stores.open_serving(config)
    assert faiss_problems == milvus_problems == []
    assert milvus_index.version == faiss_index.version == report.manifest["version"]
    assert milvus_index.chunks == faiss_index.chunks and np.array_equal(milvus_index.spans, faiss_index.spans)
    assert milvus_index.speakers == faiss_index.speakers and list(milvus_index.documents) == list(faiss_index.documents)
    assert milvus_index.documents[SEED_ID] == faiss_index.documents[SEED_ID]

    speaker = "王任"
    assert speaker in faiss_index.speakers
    cases = {
        "no filters": (None, lambda c: True),
        "a speaker": (Filters((speaker,)), lambda c: c.speaker == speaker),
        "a date range": (Filters(date_from="2023-07-01", date_to="2023-07-31"),
                         lambda c: "2023-07-01" <= (c.date or "")[:10] <= "2023-07-31"),
        "a first day": (Filters(date_from="2023-07-04"), lambda c: (c.date or "")[:10] >= "2023-07-04"),
        "nothing matches": (Filters((NO_SUCH_SPEAKER,)), lambda c: False),
        "no day matches": (Filters(date_from="1990-01-01", date_to="1990-12-31"), lambda c: False),
    }
    faiss_retriever = Retriever(faiss_index, fake_embedder, config)
    milvus_retriever = Retriever(milvus_index, fake_embedder, config)
    for question in QUESTIONS:
        for name, (filters, allowed) in cases.items():
            faiss_hits = faiss_retriever.search(question, filters=filters)
            milvus_hits = milvus_retriever.search(question, filters=filters)
            assert_same_hits(faiss_hits, milvus_hits, (question, name))
            assert all(allowed(h.chunk) for h in milvus_hits), (question, name)
            if name.startswith("no") and name != "no filters":
                assert milvus_hits == [], (question, name)
            else:
                assert milvus_hits, (question, name)  # a comparison of two empty lists would prove nothing

    faiss_qa, milvus_qa = QA.over(faiss_index, fake_embedder, config), QA.over(milvus_index, fake_embedder, config)
    for question in QUESTIONS:
        for filters in (None, Filters((speaker,))):
            f, m = faiss_qa.ask(question, filters=filters), milvus_qa.ask(question, filters=filters)
            assert m.answer == f.answer and m.found == f.found, (question, filters)
            assert m.citations == f.citations, (question, filters)
            assert abs(m.support - f.support) <= 1e-4, (question, filters)


# ---------------------------------------------------------------- 2. versions: alias, list, rollback, prune


def test_each_build_publishes_a_version_behind_the_alias_rollback_moves_it_back_and_old_ones_are_pruned(
        tmp_path, milvus_server, seed_corpus, fake_embedder):
    config = milvus_config(tmp_path, milvus_server, seed_corpus)
    store = stores.milvus_store(config)
    first = stores.build(config, fake_embedder)
    add_article(config, "reading-1", 1)
    second = stores.build(config, fake_embedder)
    v1, v2 = first.manifest["version"], second.manifest["version"]
    c1, c2 = store.collection(v1), store.collection(v2)
    assert v1 != v2 and store.current() == c2
    assert {c1, f"{c1}_spans", f"{c1}_meta", c2, f"{c2}_spans", f"{c2}_meta"} <= set(collections(config))

    versions = stores.list_versions(config)
    assert [(v["version"], v["collection"], v["status"], v["problem"], v["current"]) for v in versions] == [
        (v1, c1, "ok", None, False), (v2, c2, "ok", None, True)]
    assert (versions[0]["documents"], versions[1]["documents"]) == (1, 2)
    assert versions[1]["chunks"] == second.manifest["counts"]["chunks"] and versions[1]["model"] == FakeEmbedder.name
    index, problems = stores.open_serving(config)
    assert (index.version, problems) == (v2, []) and "reading-1" in index.documents

    # Rollback moves the alias back; a fresh open serves the old version.
    target = stores.rollback(config)
    assert target["version"] == v1 and target["current"] and store.current() == c1
    assert [(v["version"], v["current"]) for v in stores.list_versions(config)] == [(v1, True), (v2, False)]
    index, problems = stores.open_serving(config)
    assert (index.version, problems) == (v1, []) and "reading-1" not in index.documents
    assert QA.over(index, fake_embedder, config).ask(WHERE).found

    # By name, forwards and back; an unknown name or nothing earlier is refused in one line.
    assert stores.rollback(config, v2)["version"] == v2 and store.current() == c2
    assert stores.rollback(config, c1)["version"] == v1 and store.current() == c1
    with pytest.raises(IndexFault) as e:
        stores.rollback(config, "20000101-000000-000000")
    assert "no index version '20000101-000000-000000'" in one_line(str(e.value))
    with pytest.raises(IndexFault) as e:
        stores.rollback(config)  # v1 is the oldest
    assert "no earlier intact index version" in one_line(str(e.value))

    # One build beyond KEEP_VERSIONS drops the oldest intact version, all three of its collections.
    made = [v1, v2]
    for n in range(2, KEEP_VERSIONS + 1):
        add_article(config, f"reading-{n}", n)
        made.append(stores.build(config, fake_embedder).manifest["version"])
    assert len(made) == KEEP_VERSIONS + 1
    versions = stores.list_versions(config)
    assert [v["version"] for v in versions] == made[-KEEP_VERSIONS:]
    assert all(v["status"] == "ok" for v in versions) and [v["current"] for v in versions][-1]
    assert sum(v["current"] for v in versions) == 1 and store.current() == store.collection(made[-1])
    names = collections(config)
    for gone in made[:-KEEP_VERSIONS]:
        assert not [n for n in names if n.startswith(store.collection(gone))], (gone, names)
    for kept in made[-KEEP_VERSIONS:]:
        c = store.collection(kept)
        assert {c, f"{c}_spans", f"{c}_meta"} <= set(names)
    assert stores.open_serving(config).index.version == made[-1]


# ---------------------------------------------------------------- 3. a build killed while publishing

STUCK_BUILD = r"""
import json, sys, threading
from pathlib import Path
from rag import stores
from rag.config import Config
from rag.milvus import MilvusStore
from tests.conftest import FakeEmbedder

def stuck(self, collection, index):
    print("inserting spans into", collection, flush=True)
    threading.Event().wait()  # until killed

MilvusStore._insert_spans = stuck  # in this process only
a = json.loads(sys.argv[1])
stores.build(Config(backend="milvus", milvus_uri=a["uri"], corpus_dir=Path(a["corpus"]), index_dir=Path(a["index"]),
                    cache_dir=Path(a["cache"]), model=FakeEmbedder.name), FakeEmbedder())
print("the build finished", flush=True)
"""


def start_stuck_build(config: Config, log: Path) -> tuple[subprocess.Popen, str]:
    """A `stores.build` in another process that stops for good while writing its spans to Milvus; returns the
    process and the collection it was publishing, once it says it got there (a handshake, not a sleep)."""
    args = json.dumps({"uri": config.milvus_uri, "corpus": str(config.corpus_dir), "index": str(config.index_dir),
                       "cache": str(config.cache_dir)})
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAG_")}
    proc = subprocess.Popen([sys.executable, "-c", STUCK_BUILD, args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=log.open("w", encoding="utf-8"), text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            continue
        line = proc.stdout.readline()
        if line.startswith("inserting spans into "):
            return proc, line.split()[-1].removesuffix("_spans")
        if not line:  # it exited before getting there
            break
    proc.kill()
    proc.wait()
    pytest.fail(f"the stuck build never reached its spans:\n{log.read_text(encoding='utf-8')[-3000:]}")


def kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    proc.stdout.close()


def test_a_build_killed_while_publishing_leaves_the_alias_on_the_old_version_and_is_dropped_later(
        tmp_path, milvus_server, seed_corpus, fake_embedder):
    config = milvus_config(tmp_path, milvus_server, seed_corpus)
    store = stores.milvus_store(config)
    old = stores.build(config, fake_embedder).manifest["version"]
    c_old = store.collection(old)
    add_article(config, "reading-1", 1)

    proc, killed = start_stuck_build(config, tmp_path / "stuck-build.log")
    try:
        assert killed != c_old and killed in collections(config)
    finally:
        kill(proc)

    assert store.current() == c_old
    versions = stores.list_versions(config)
    assert [(v["collection"], v["current"]) for v in versions] == [(c_old, True), (killed, False)]
    assert versions[0]["status"] == "ok"
    assert versions[1]["status"].startswith("incomplete") and versions[1]["problem"] == versions[1]["status"]
    index, problems = stores.open_serving(config)
    assert (index.version, problems) == (old, []) and "reading-1" not in index.documents
    with pytest.raises(IndexFault) as e:
        stores.rollback(config, killed)  # never onto a version that is not whole
    assert "incomplete" in one_line(str(e.value))

    # The next build publishes a new version and drops the incomplete one: its builder's pid is dead.
    add_article(config, "reading-2", 2)
    new = stores.build(config, fake_embedder).manifest["version"]
    assert store.current() == store.collection(new)
    assert not [n for n in collections(config) if n.startswith(killed)]
    assert [(v["version"], v["status"], v["current"]) for v in stores.list_versions(config)] == [
        (old, "ok", False), (new, "ok", True)]
    index = stores.open_serving(config).index
    assert index.version == new and {"reading-1", "reading-2"} <= set(index.documents)


def test_a_version_still_being_published_by_a_live_build_is_not_pruned(tmp_path, milvus_server, seed_corpus,
                                                                        fake_embedder):
    config = milvus_config(tmp_path, milvus_server, seed_corpus)
    store = stores.milvus_store(config)
    stores.build(config, fake_embedder)
    add_article(config, "reading-1", 1)
    proc, publishing = start_stuck_build(config, tmp_path / "stuck-build.log")
    try:
        add_article(config, "reading-2", 2)
        mine = stores.build(config, fake_embedder).manifest["version"]  # publishes and prunes meanwhile
        assert store.current() == store.collection(mine)
        assert {publishing, f"{publishing}_spans", f"{publishing}_meta"} <= set(collections(config))
        status = {v["collection"]: v["status"] for v in stores.list_versions(config)}
        assert status[publishing].startswith("incomplete")
    finally:
        kill(proc)
    add_article(config, "reading-3", 3)
    stores.build(config, fake_embedder)  # now that its builder is gone
    assert not [n for n in collections(config) if n.startswith(publishing)]


# ---------------------------------------------------------------- 4. errors: one line, saying what to do


def rag_cmd(cwd: Path, *argv: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("RAG_")}
    full_env.update(XDG_DATA_HOME=str(cwd / "xdg-data"), XDG_CACHE_HOME=str(cwd / "xdg-cache"), **env)
    return subprocess.run([sys.executable, "-m", "rag", *argv], env=full_env, capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def assert_one_line_error(proc: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rag: "), proc.stderr
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def empty_milvus(tmp_path_factory):
    """A Milvus with no index in it, shared by the error cases."""
    server = MilvusServer(tmp_path_factory.mktemp("empty-milvus") / "data").start()
    yield server
    server.stop()


CLOSED = "http://127.0.0.1:{closed}"
# (argv, extra environment, exit code, fragments of the one line); {closed}: a port nothing listens on,
# {empty}: the URI of a Milvus without any index.
ERROR_CASES = {
    "ask, Milvus unreachable": (["ask", WHERE, "--backend", "milvus", "--milvus-uri", CLOSED], {}, 1,
                                [f"Milvus at {CLOSED} is unreachable", "start it, or point --milvus-uri"]),
    "index list, Milvus unreachable (env)": (["index", "list"], {"RAG_BACKEND": "milvus", "RAG_MILVUS_URI": CLOSED}, 1,
                                             [f"Milvus at {CLOSED} is unreachable", "--milvus-uri"]),
    "doc, Milvus unreachable": (["doc", SEED_ID, "--backend", "milvus", "--milvus-uri", CLOSED], {}, 1,
                                ["unreachable", "--milvus-uri"]),
    "a URI without a scheme": (["ask", WHERE, "--backend", "milvus", "--milvus-uri", "not a uri"], {}, 1,
                               ["'not a uri' is not a Milvus URI", "--milvus-uri"]),
    "a URI with a bad port": (["index", "list", "--backend", "milvus", "--milvus-uri", "http://127.0.0.1:notaport"],
                              {}, 1, ["http://127.0.0.1:notaport", "--milvus-uri"]),
    "a URI without a host": (["ask", WHERE, "--backend", "milvus", "--milvus-uri", "http://"], {}, 1,
                             ["'http://' is not a Milvus URI", "--milvus-uri"]),
    "a URI of another protocol": (["ask", WHERE, "--backend", "milvus", "--milvus-uri", "ftp://127.0.0.1:9"], {}, 1,
                                  ["'ftp://127.0.0.1:9' is not a Milvus URI", "--milvus-uri"]),
    "no URI at all": (["ask", WHERE, "--backend", "milvus"], {}, 1, ["needs a URI", "--milvus-uri"]),
    "a bad collection name": (["ask", WHERE, "--backend", "milvus", "--milvus-uri", "{empty}", "--milvus-collection",
                               "bad-name"], {}, 1, ["'bad-name'", "letters, digits and underscores"]),
    "ask, no index yet": (["ask", WHERE, "--backend", "milvus", "--milvus-uri", "{empty}"], {}, 1,
                          ["no index named rag_news in Milvus at {empty}",
                           "build one with `rag build --backend milvus`"]),
    "doc, no index yet": (["doc", SEED_ID], {"RAG_BACKEND": "milvus", "RAG_MILVUS_URI": "{empty}"}, 1,
                          ["no index named rag_news", "build one"]),
    "index list, no index yet": (["index", "list", "--backend", "milvus", "--milvus-uri", "{empty}"], {}, 1,
                                 ["no index versions in Milvus at {empty} (rag_news)", "build one"]),
    "index rollback, no index yet": (["index", "rollback", "--backend", "milvus", "--milvus-uri", "{empty}"], {}, 1,
                                     ["no earlier intact index version", "rag build --backend milvus"]),
    "RAG_BACKEND=foo": (["ask", WHERE], {"RAG_BACKEND": "foo"}, 2,
                        ["backend must be faiss or milvus, not 'foo'", "RAG_BACKEND"]),
    "--backend foo": (["index", "list", "--backend", "foo"], {}, 2, ["invalid choice: 'foo'"]),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_cli_milvus_errors_are_one_line_saying_what_to_do(tmp_path, empty_milvus, case):
    argv, env, code, fragments = ERROR_CASES[case]
    closed, empty = str(free_port()), empty_milvus.uri

    def fill(text: str) -> str:
        return text.replace("{closed}", closed).replace("{empty}", empty)

    proc = rag_cmd(tmp_path, *map(fill, argv), **{k: fill(v) for k, v in env.items()})
    assert_one_line_error(proc, code, *map(fill, fragments))
    assert proc.stdout == ""


def test_an_index_built_with_another_model_is_refused_with_what_to_do(tmp_path, milvus_server, seed_corpus,
                                                                      fake_embedder):
    config = milvus_config(tmp_path, milvus_server, seed_corpus)
    stores.build(config, fake_embedder)
    other = config.replace(model="other-model")
    for call in (stores.open_serving, stores.choose):
        with pytest.raises(IndexFault) as e:
            call(other)
        message = one_line(str(e.value))
        assert f"built with the embedding model {FakeEmbedder.name!r}, not 'other-model'" in message, message
        assert "rebuild it with `rag build --backend milvus`" in message
    assert stores.open_serving(config).index.manifest["model"]["name"] == FakeEmbedder.name  # the right one still opens


def test_an_unreachable_milvus_is_a_store_unreachable_fault_in_the_library(tmp_path, seed_corpus):
    uri = f"http://127.0.0.1:{free_port()}"
    config = Config(backend="milvus", milvus_uri=uri, corpus_dir=seed_corpus, index_dir=tmp_path / "index",
                    cache_dir=tmp_path / "cache", model=FakeEmbedder.name)
    for call in (stores.open_serving, stores.choose, stores.list_versions, stores.rollback):
        with pytest.raises(StoreUnreachable) as e:
            call(config)
        assert f"Milvus at {uri} is unreachable" in one_line(str(e.value))
    with pytest.raises(StoreUnreachable):  # the local build is done, publishing fails in one line
        stores.build(config, FakeEmbedder())


# ---------------------------------------------------------------- 5. the chat outlives a Milvus restart



@pytest.fixture
def milvus_chat(tmp_path, milvus_server, seed_corpus, fake_embedder):
    """A chat over the seed article served from Milvus (fake embedder), its LiveQA's lines in chat.said."""
    config = milvus_config(tmp_path, milvus_server, seed_corpus)
    stores.build(config, fake_embedder)
    said: list[str] = []
    chat = Chat(LiveQA(config, fake_embedder, say=said.append), Rebuilder(config, fake_embedder), sleep=lambda s: None)
    chat.said, chat.config = said, config
    return chat


def turn(chat: Chat, at: int):
    return list(chat.turn(WHERE, Session(), at=at))


def test_the_chat_keeps_running_and_says_the_store_is_unreachable_while_milvus_is_down(milvus_chat, milvus_server):
    chat = milvus_chat
    answered = turn(chat, 1)[-1]
    assert 'class="rag-answer"' in answered.html and 1 in answered.session.turns

    milvus_server.stop()
    for at in (3, 5):  # every turn while it is down, not only the first
        replies = turn(chat, at)  # no exception
        notice = replies[-1]
        assert 'class="rag-notice"' in notice.html and STORE_FAILED_START in notice.html, notice.html
        assert "Milvus" in notice.html and "start it" in notice.html and not notice.session.turns  # nothing to rate
    assert chat.answer_text(WHERE).startswith(STORE_FAILED_START)
    assert any("unreachable" in line and "answering from" in line for line in chat.said)  # the log says why
    qa, problem = chat.current()
    assert qa is not None and problem is None  # the page keeps its last index rather than saying "no index"


def test_the_chat_answers_again_after_milvus_restarts(milvus_chat, milvus_server):
    chat = milvus_chat
    before = turn(chat, 1)[-1].session.turns[1]
    milvus_server.stop()
    assert STORE_FAILED_START in turn(chat, 3)[-1].html

    milvus_server.start()  # same data folder, same port
    wait_until_reachable(chat.config)
    answered = turn(chat, 5)[-1]  # the next turn once the client has reconnected
    assert 'class="rag-answer"' in answered.html, answered.html  # fails: "... is in state 'released' ..."
    assert answered.session.turns[5] == before  # the same answer, sources and version as before the restart
    assert before.answer in chat.answer_text(WHERE)


def test_the_example_check_the_page_starts_does_not_die_with_a_traceback_while_milvus_is_down(
        milvus_chat, milvus_server, monkeypatch):
    chat = milvus_chat
    qa, _ = chat.current()
    milvus_server.stop()
    escaped = []
    monkeypatch.setattr(threading, "excepthook", escaped.append)
    assert chat.examples_ready(qa) is None  # not checked yet: the check starts in the background
    for thread in threading.enumerate():
        if "_check_examples" in thread.name:
            thread.join(60)
    assert [f"{e.exc_type.__name__}: {e.exc_value}" for e in escaped] == []


def test_an_open_milvus_index_searches_again_after_a_restart(tmp_path, milvus_server, seed_corpus, fake_embedder):
    """What `rag ask --batch` or `rag eval` hold for their whole run: one MilvusIndex, no choose() per question."""
    config = milvus_config(tmp_path, milvus_server, seed_corpus)
    stores.build(config, fake_embedder)
    qa = QA.over(stores.open_serving(config).index, fake_embedder, config)
    before = qa.ask(WHERE)
    milvus_server.stop()
    milvus_server.start()
    wait_until_reachable(config)
    after = qa.ask(WHERE)  # raises StoreUnreachable: "... is in state 'released'; call load() ..."
    assert (after.answer, after.citations) == (before.answer, before.citations)


# ---------------------------------------------------------------- 6. incremental builds


def test_a_second_build_reuses_unchanged_vectors_and_milvus_holds_the_new_counts(tmp_path, milvus_server,
                                                                                fake_embedder):
    first_files, added = news(3)[:2], news(3)[2]
    config = milvus_config(tmp_path, milvus_server, corpus_in(tmp_path, *first_files))
    store = stores.milvus_store(config)
    first = stores.build(config, fake_embedder)
    assert first.reused == 0 and first.embedded == first.manifest["counts"]["chunks"]

    (Path(config.corpus_dir) / added.name).write_bytes(added.read_bytes())
    second = stores.build(config, fake_embedder)
    counts = second.manifest["counts"]
    assert second.reused > 0 and second.embedded > 0
    assert second.reused == first.manifest["counts"]["chunks"]  # every chunk of the unchanged articles
    assert second.reused + second.embedded == counts["chunks"] and counts["documents"] == 4  # and the seed

    coll = store.collection(second.manifest["version"])
    assert store.current() == coll
    for name, want in ((coll, counts["chunks"]), (f"{coll}_spans", counts["spans"])):
        have = store.call("query", name, filter="", output_fields=["count(*)"])[0]["count(*)"]
        assert have == want, name
    latest = stores.list_versions(config)[-1]
    assert (latest["documents"], latest["chunks"], latest["current"]) == (4, counts["chunks"], True)

    index = stores.open_serving(config).index
    assert len(index.chunks) == counts["chunks"] and len(index.spans) == counts["spans"]
    assert added.stem in index.documents and len(index.documents) == 4
    local = np.load(second.path / "embeddings.npy")
    assert np.allclose(index.vectors(list(range(len(index.chunks)))), local, atol=1e-6)
    new_rows = [i for i, c in enumerate(index.chunks) if c.doc_id == added.stem]
    assert new_rows and QA.over(index, fake_embedder, config).retriever.search(index.chunks[new_rows[0]].text)[0].row \
        in new_rows

    # Nothing changed: no new version, the alias stays.
    third = stores.build(config, fake_embedder)
    assert third.unchanged and third.embedded == 0 and store.current() == coll
    assert len(stores.list_versions(config)) == 2
