"""Benchmark the dense index types at scale: build time, memory, query latency, recall@10 against exact.

    python bench/bench_scale.py [--n 1000000] [--real-index index] [--queries 500] [--ef-search 128,256] [--nprobe 128,256]

Vectors: n synthetic 384-d unit vectors near a 48-d subspace, plus the real embeddings of an index
(`--real-index`, its embeddings.npy) mixed in; half the queries are real embeddings. Prints, asserts nothing.
"""
from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import numpy as np

from rag.config import Config
from rag.index import make_dense_index


def synthetic(n: int, dim: int, seed: int) -> np.ndarray:
    """Unit vectors on a noisy 48-dimensional subspace: text embeddings have a low intrinsic
    dimension, so their nearest neighbours are well defined (isotropic noise makes them ties)."""
    basis = np.random.default_rng(12345).normal(size=(48, dim)).astype(np.float32)
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for a in range(0, n, 100_000):  # in blocks, to keep peak memory near the final array
        b = min(n, a + 100_000)
        x = rng.normal(size=(b - a, 48)).astype(np.float32) @ basis
        x += 0.5 * rng.normal(size=x.shape).astype(np.float32)
        out[a:b] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def rss_mb() -> float:
    """Current resident memory (not the peak), to see what an index adds."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--real-index", help="an index folder whose embeddings.npy is mixed in")
    ap.add_argument("--kinds", default="flat,hnsw,ivf_sq8")
    ap.add_argument("--ef-search", default=str(Config().hnsw_ef_search), help="HNSW efSearch values to try, e.g. 128,256")
    ap.add_argument("--nprobe", default=str(Config().ivf_nprobe), help="IVF nprobe values to try, e.g. 128,256")
    args = ap.parse_args()

    data = synthetic(args.n, 384, 0)
    queries = synthetic(args.queries, 384, 1)
    if args.real_index:
        path = Path(args.real_index)
        path = (path / "current").resolve() if (path / "current").exists() else path
        real = np.load(path / "embeddings.npy").astype(np.float32)
        data = np.concatenate([data, real])
        noise = np.random.default_rng(2).normal(size=real.shape).astype(np.float32) * 0.02
        rq = real + noise
        rq /= np.linalg.norm(rq, axis=1, keepdims=True)
        queries = np.concatenate([queries[: args.queries // 2], rq[: args.queries // 2]])
    print(f"{len(data):,} vectors of 384 dims ({data.nbytes / 2**20:.0f} MB), {len(queries)} queries")

    config = Config()
    sweeps = {"flat": [None], "hnsw": [int(v) for v in args.ef_search.split(",")],
              "ivf_sq8": [int(v) for v in args.nprobe.split(",")]}
    exact_ids = None
    for kind in args.kinds.split(","):
        before = rss_mb()
        t0 = time.perf_counter()
        index = make_dense_index(data, kind, config)
        build_s = time.perf_counter() - t0
        added = rss_mb() - before
        for value in sweeps[kind]:  # search breadth: HNSW efSearch, IVF nprobe; the build is shared
            if kind == "hnsw":
                index.hnsw.efSearch = value
            elif kind == "ivf_sq8":
                index.nprobe = value
            times = []
            ids = np.empty((len(queries), 10), dtype=np.int64)
            for i, q in enumerate(queries):  # one query at a time, as a user asks them
                t = time.perf_counter()
                ids[i] = index.search(q[None, :], 10)[1][0]
                times.append((time.perf_counter() - t) * 1000)
            if kind == "flat":
                exact_ids = ids
            recall = (np.mean([len(set(a) & set(e)) / 10 for a, e in zip(ids, exact_ids)])
                      if exact_ids is not None else float("nan"))
            setting = {"hnsw": f"efSearch {value}", "ivf_sq8": f"nprobe {value}"}.get(kind, "exact")
            print(f"{kind:8} {setting:13} build {build_s:7.1f} s  RSS +{added:6.0f} MB  "
                  f"query p50 {np.percentile(times, 50):7.2f} ms  p95 {np.percentile(times, 95):7.2f} ms  "
                  f"recall@10 {recall:.3f}", flush=True)
        del index


if __name__ == "__main__":
    main()
