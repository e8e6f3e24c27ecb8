"""20 simultaneous chats through gradio_client against `python app.py` on loopback: all answered, all right.

Bounded: 20 clients x 3 questions. The p50/p95 latencies are printed and written to load.json in the test's
temporary folder (pytest's tmp_path_factory, "load*"), never into the repository.
"""
import json
import threading
import time

import numpy as np
import pytest

from rag.building import build
from rag.config import Config
from rag.evaluation import read_qa

from .conftest import QA_COPY, corpus_in, start_server, stop_server

CLIENTS = 20
QUESTIONS_EACH = 3
P95_LIMIT_S = 30.0  # far above what 2 cores need (a few seconds); a hang or a serialised queue trips it


def _norm(text: str) -> str:
    import unicodedata

    return "".join(unicodedata.normalize("NFKC", text).split())


def is_right(item: dict, reply: str) -> bool:
    """The answer line (the reply's first line) holds one of the item's gold strings."""
    first = _norm(reply.splitlines()[0]) if reply else ""
    return any(_norm(gold) in first for gold in item["answers_any"]) and all(
        _norm(gold) in first for gold in item.get("answers_all", []))


@pytest.fixture(scope="module")
def server(tmp_path_factory, real_embedder, model_cache):
    root = tmp_path_factory.mktemp("load")
    corpus_in(root)
    build(Config(corpus_dir=root / "corpus", index_dir=root / "index"), real_embedder)  # current: no build at start
    proc, url = start_server(root, model_cache)
    yield url, root
    stop_server(proc)


def test_twenty_simultaneous_chats_are_all_answered_right(server, capsys):
    from gradio_client import Client

    url, root = server
    gold = [item for item in read_qa(QA_COPY) if item.get("answerable", True) and item.get("answers_any")]
    # Accuracy is the end-to-end tests' business; this test is about concurrency. So the pool is the
    # gold questions the server answers right when asked alone, and under load each must be answered
    # right again, and exactly as it was alone.
    solo_client = Client(url, verbose=False)
    solo = {item["id"]: solo_client.predict(item["question"], api_name="/chat") for item in gold}
    pool = [item for item in gold if is_right(item, solo[item["id"]])]
    missed = [item["id"] for item in gold if item not in pool]
    assert len(pool) >= 10, f"too few gold questions answered right even alone: missed {missed}"

    clients = [Client(url, verbose=False) for _ in range(CLIENTS)]
    start = threading.Barrier(CLIENTS)
    results: list[tuple[dict, str, float]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def chat(n: int) -> None:
        try:
            start.wait(60)
            for k in range(QUESTIONS_EACH):
                item = pool[(n * QUESTIONS_EACH + k) % len(pool)]
                t0 = time.perf_counter()
                reply = clients[n].predict(item["question"], api_name="/chat")
                with lock:
                    results.append((item, reply, time.perf_counter() - t0))
        except Exception as e:  # collected and reported below; a thread cannot fail the test itself
            with lock:
                errors.append(e)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=chat, args=(n,)) for n in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    wall = time.perf_counter() - t0

    assert not errors, errors
    assert len(results) == CLIENTS * QUESTIONS_EACH
    wrong = [(item["id"], reply[:80]) for item, reply, _ in results if not is_right(item, reply)]
    assert not wrong, wrong
    changed = [item["id"] for item, reply, _ in results if reply != solo[item["id"]]]
    assert not changed, f"answers differ from the same question asked alone: {changed}"

    latency = np.array([s for _, _, s in results])
    report = {"clients": CLIENTS, "questions": len(results), "pool": len(pool), "missed_alone": missed,
              "p50_s": round(float(np.percentile(latency, 50)), 3), "p95_s": round(float(np.percentile(latency, 95)), 3),
              "max_s": round(float(latency.max()), 3), "wall_s": round(wall, 2),
              "throughput_qps": round(len(results) / wall, 2)}
    (root / "load.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    with capsys.disabled():
        print(f"\nload: {CLIENTS} clients x {QUESTIONS_EACH} questions: p50 {report['p50_s']} s, "
              f"p95 {report['p95_s']} s, max {report['max_s']} s, {report['throughput_qps']} questions/s ({root / 'load.json'})")
    assert report["p95_s"] < P95_LIMIT_S
