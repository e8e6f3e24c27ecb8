"""The Milvus backend with the real model: the same answers as FAISS on the shared sets, and several chat
servers serving one Milvus while an ingest job builds (a real `milvus-lite server`, real `rag serve` processes)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rag.answering import QA
from rag.config import Config
from rag.evaluation import read_qa, score
from rag.stores import build, open_serving

from .conftest import ROOT, SEED, start_server, stop_server

SHARED = ROOT.parent / "shared" / "eval"
NEWS = SHARED / "news_corpus"


def test_milvus_answers_as_faiss_does_on_the_shared_sets(tmp_path, real_embedder, milvus_server):
    corpus = tmp_path / "corpus"
    shutil.copytree(NEWS, corpus)
    shutil.copy(SEED, corpus / SEED.name)
    faiss_config = Config(corpus_dir=corpus, index_dir=tmp_path / "index")
    milvus_config = faiss_config.replace(backend="milvus", milvus_uri=milvus_server.uri)
    build(faiss_config, real_embedder)
    report = build(milvus_config, real_embedder)  # the version is unchanged: only published
    assert report.unchanged
    items = read_qa(SHARED / "news_qa.jsonl") + read_qa(SHARED / "seed_qa.jsonl")
    results = {}
    for name, config in (("faiss", faiss_config), ("milvus", milvus_config)):
        qa = QA.over(open_serving(config).index, real_embedder, config)
        results[name] = score(items, [qa.ask(item["question"]) for item in items])
    for key in ("hit@1", "hit@5", "answer_accuracy", "refusal_accuracy"):
        assert abs(results["milvus"][key] - results["faiss"][key]) <= 0.01, (key, results)
    assert abs(results["milvus"]["false_refusals"] - results["faiss"]["false_refusals"]) <= 1, results


def _ingest(root: Path, model_cache: Path, uri: str, *flags: str) -> subprocess.Popen:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAG_")}, "RAG_CORPUS": str(root / "corpus"),
           "RAG_INDEX": str(root / "index"), "RAG_CACHE_DIR": str(model_cache), "RAG_BACKEND": "milvus",
           "RAG_MILVUS_URI": uri, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "rag", "build", *flags], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_two_chat_servers_serve_one_milvus_while_a_build_runs(tmp_path, model_cache, milvus_server):
    from gradio_client import Client

    ingest = tmp_path / "ingest"
    (ingest / "corpus").mkdir(parents=True)
    shutil.copy(SEED, ingest / "corpus")
    first = _ingest(ingest, model_cache, milvus_server.uri, "--json")  # --json: a summary, no progress lines
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    summary = json.loads(out)
    assert summary["milvus"] == {"uri": milvus_server.uri, "collection": f"rag_news_v{summary['version'].replace('-', '_')}"}

    servers = []
    try:
        for n in (1, 2):  # chat-only machines: no articles of their own, the index comes from Milvus
            root = tmp_path / f"chat{n}"
            (root / "corpus").mkdir(parents=True)
            servers.append(start_server(root, model_cache, RAG_BACKEND="milvus", RAG_MILVUS_URI=milvus_server.uri))
        clients = [Client(url, verbose=False) for _, url in servers]
        for client in clients:
            assert "慎行楼乐之厅" in client.predict("报告会在哪里举行？", api_name="/chat")

        shutil.copy(NEWS / "inews_dev_191.txt", ingest / "corpus")
        second = _ingest(ingest, model_cache, milvus_server.uri)
        answered_during = 0
        for line in second.stderr:  # the build's own progress lines: questions go in while it embeds and writes
            if line.startswith(("parsed", "tokenized", "embedding", "Milvus: writing")) and second.poll() is None:
                for client in clients:
                    reply = client.predict("报告会在哪里举行？", api_name="/chat")
                    assert "慎行楼乐之厅" in reply, reply
                    answered_during += 1
        assert second.wait(600) == 0
        assert answered_during >= 2
        # Both servers answer from the new version on their next question, without a restart.
        for client in clients:
            reply = client.predict("内蒙古食药监系统那场讲依法行政的座谈培训在哪座城市办的？", api_name="/chat")
            assert "呼和浩特" in reply, reply
    finally:
        for proc, _ in servers:
            stop_server(proc)


@pytest.mark.parametrize("uri, fragment", [
    ("http://127.0.0.1:9", "unreachable"),  # nothing listens on the discard port
])
def test_a_chat_server_without_its_milvus_starts_and_says_so(tmp_path, model_cache, uri, fragment):
    root = tmp_path / "chat"
    (root / "corpus").mkdir(parents=True)
    proc, url = start_server(root, model_cache, RAG_BACKEND="milvus", RAG_MILVUS_URI=uri)
    try:
        from gradio_client import Client

        reply = Client(url, verbose=False).predict("报告会在哪里举行？", api_name="/chat")
        assert "检索库暂时无法访问" in reply and fragment in reply, reply
    finally:
        stop_server(proc)
