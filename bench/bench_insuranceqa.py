"""Benchmark retrieval quality on InsuranceQA-zh: BM25, dense and fused, fusion chosen on valid, reported on test.

    nice python bench/bench_insuranceqa.py [--answers 0] [--questions 0] [--dtype auto] [--cache /tmp/rag-bench-insuranceqa]

Data: `insuranceqa-data==1.2` (pip install insuranceqa-data==1.2): 27,413 answer passages (Chinese, machine-translated),
2,000 valid and 2,000 test questions, each with its gold answer ids. Every answer is one passage (they average
167 characters, under Config.chunk_size only by a little, so they are indexed whole, as InsuranceQA defines them).

- Dense: the project's embedder ("passage: " / "query: " prefixes), exact FAISS inner product (rag.index.make_dense_index).
  The passage vectors are cached in --cache per model fingerprint and dtype, keyed by passage hash, so a rerun
  (or a subsample, or the full set after a subsample) only embeds what is new; a killed run resumes by block.
- BM25: rag.lexical.BM25 over rag.lexical.ChineseTokenizer tokens, search mode (tokenize(text, search=True)),
  for passages and questions alike, as rag.retrieval.Retriever does.
- Fusion: weighted RRF (rag.retrieval.rrf) over each retriever's top candidate_k, and a convex combination
  of min-max normalised scores (alpha * dense + (1 - alpha) * bm25) over the same candidates. Grids are searched on
  the valid split by MRR@10; the best of each family, the project default (Config's fusion) and the overall choice
  are then scored on test.
- Metrics: R@k is the fraction of questions with at least one gold answer in the top k (questions have 1.65 gold
  answers on average); MRR@10 is the mean of 1/rank of the first gold answer in the top 10 (0 beyond).
- Latency: test questions one at a time, as a user asks: query embedding + FAISS, tokenize + BM25, fusion.

--answers N keeps every gold answer of the questions used plus random distractors up to N passages (0: all);
--questions N uses the first N questions of each split (0: all). Prints figures, asserts nothing.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

from rag.config import Config
from rag.embedding import load_embedder
from rag.index import make_dense_index
from rag.lexical import BM25, ChineseTokenizer, top_k
from rag.retrieval import convex, rrf

DEPTH = 100  # candidates kept per retriever per question; the grid's candidate_k values are <= this
KS = (1, 5, 10)


class Clock:
    """Wall and CPU seconds (all threads of this process) of a block: `with Clock() as c: ...; c.wall, c.cpu`."""

    def __enter__(self):
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self._w, time.process_time() - self._c


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- data


def load_data(n_answers: int, n_questions: int, seed: int = 0):
    import insuranceqa_data as iqa

    answers = iqa.load_answers()
    splits = {}
    for name, loader in (("valid", iqa.load_valid), ("test", iqa.load_test)):
        items = sorted(loader().items(), key=lambda kv: int(kv[0]))
        if n_questions:
            items = items[:n_questions]
        splits[name] = [(q["zh"].strip(), q["answers"]) for _, q in items]
    ids = sorted(answers, key=int)
    if n_answers and n_answers < len(ids):
        gold = {a for qs in splits.values() for _, golds in qs for a in golds}
        rest = [a for a in ids if a not in gold]
        extra = np.random.default_rng(seed).choice(len(rest), max(0, n_answers - len(gold)), replace=False)
        ids = sorted(gold | {rest[i] for i in extra}, key=int)
    row = {a: i for i, a in enumerate(ids)}
    texts = [answers[a]["zh"].strip() for a in ids]
    for name in splits:
        splits[name] = [(q, [row[a] for a in golds]) for q, golds in splits[name]]
    return texts, splits


# --------------------------------------------------------------------------- passage vectors, cached


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def passage_vectors(embedder, texts: list[str], cache: Path, batch_size: int) -> tuple[np.ndarray, dict]:
    """(n, dim) float32 vectors of `texts`: cached ones loaded, the rest embedded now in length-sorted blocks.

    The cache is a folder per (model fingerprint, dtype) of blocks: block-NNNN.npy (vectors), .keys (sha256 of
    each passage) and .json (wall and CPU seconds and tokens it took). Keyed by passage, so a subsample and
    the full set share vectors, and a killed run loses at most the block it was embedding.
    Returns the vectors and the embedding figures of the blocks that supplied them, grouped by torch threads.
    """
    import torch

    folder = cache / f"{embedder.fingerprint[:16]}-{embedder.dtype}"
    folder.mkdir(parents=True, exist_ok=True)
    keys = [_sha(t) for t in texts]
    where: dict[str, list[int]] = {}  # InsuranceQA has a few answers with the same text: embed them once
    for i, k in enumerate(keys):
        where.setdefault(k, []).append(i)
    out = np.zeros((len(texts), embedder.dim), dtype=np.float32)
    have: set[str] = set()
    stats: dict = {"by_threads": {}, "embedded_now": 0}

    def account(meta: dict) -> None:
        group = stats["by_threads"].setdefault(meta.get("threads"), {"n": 0, "wall": 0.0, "cpu": 0.0, "tokens": 0})
        for key in group:
            group[key] += meta[key]

    for keys_path in sorted(folder.glob("block-*.keys")):
        hits = [(j, k) for j, k in enumerate(keys_path.read_text().split()) if k in where and k not in have]
        if not hits:
            continue
        vecs = np.load(keys_path.with_suffix(".npy"), mmap_mode="r")
        for j, k in hits:
            out[where[k]] = vecs[j]
            have.add(k)
        account(json.loads(keys_path.with_suffix(".json").read_text()))
    # Longest first over everything left, so each block pads to similar lengths (Embedder sorts within a call).
    todo = sorted((k for k in where if k not in have), key=lambda k: -len(texts[where[k][0]]))
    block = 1024
    for lo in range(0, len(todo), block):
        batch_keys = todo[lo : lo + block]
        batch = [texts[where[k][0]] for k in batch_keys]
        with Clock() as c:
            vecs = embedder.encode_passages(batch, batch_size=batch_size)
        meta = {"n": len(batch), "wall": c.wall, "cpu": c.cpu, "tokens": sum(embedder.token_count(t) for t in batch),
                "threads": torch.get_num_threads(), "batch_size": batch_size}
        name = folder / f"block-{time.time_ns()}"
        np.save(name.with_suffix(".tmp.npy"), vecs)
        name.with_suffix(".tmp.npy").replace(name.with_suffix(".npy"))
        name.with_suffix(".json").write_text(json.dumps(meta))
        name.with_suffix(".keys").write_text("\n".join(batch_keys) + "\n")  # written last: the block is complete
        for k, v in zip(batch_keys, vecs):
            out[where[k]] = v
        account(meta)
        stats["embedded_now"] += len(batch)
        say(f"embedded {lo + len(batch)}/{len(todo)} passages, {len(batch) / c.wall:.1f}/s this block "
            f"(cpu {c.cpu / c.wall:.2f} cores), ETA {(len(todo) - lo - len(batch)) * c.wall / len(batch) / 60:.1f} min")
    stats["unique"] = len(where)
    return out, stats


# --------------------------------------------------------------------------- evaluation


def first_gold_rank(order: np.ndarray, gold: set[int], limit: int = 10) -> int:
    """1-based rank of the first gold id in `order[:limit]`, or 0 when none is there."""
    for r, i in enumerate(order[:limit], start=1):
        if int(i) in gold:
            return r
    return 0


def metrics(ranks: np.ndarray) -> dict[str, float]:
    ranks = np.asarray(ranks)
    out = {f"R@{k}": float(np.mean((ranks > 0) & (ranks <= k))) for k in KS}
    out["MRR@10"] = float(np.mean(np.where((ranks > 0) & (ranks <= 10), 1.0 / np.maximum(ranks, 1), 0.0)))
    return out


class Candidates:
    """One question's candidates: dense and BM25 top-DEPTH ids, and both scores for every id in either list."""

    def __init__(self, dense_ids, bm25_ids, vectors, qvec, bm25_full):
        self.dense_ids = np.asarray(dense_ids, dtype=np.int64)
        self.bm25_ids = np.asarray(bm25_ids, dtype=np.int64)
        union = list(dict.fromkeys([*self.dense_ids.tolist(), *self.bm25_ids.tolist()]))
        self.union = np.array(union, dtype=np.int64)
        self.cos = {i: float(s) for i, s in zip(union, vectors[self.union] @ qvec)}
        self.bm = {i: float(bm25_full[i]) for i in union}


def fuse_rrf(c: Candidates, cand_k: int, wd: float, wb: float, k: float) -> np.ndarray:
    """Ids by rag.retrieval.rrf over each list's top cand_k, in the Retriever's tie order (dense items first)."""
    fused = rrf([c.dense_ids[:cand_k].tolist(), c.bm25_ids[:cand_k].tolist()], [wd, wb], k)
    return np.asarray(sorted(fused, key=lambda i: -fused[i]), dtype=np.int64)


def fuse_convex(c: Candidates, cand_k: int, alpha: float) -> np.ndarray:
    """Ids by rag.retrieval.convex (alpha * minmax(cosine) + (1 - alpha) * minmax(BM25)) over the union of both
    lists' top cand_k, in the Retriever's candidate order (dense first, then BM25-only)."""
    ids = list(dict.fromkeys([*c.dense_ids[:cand_k].tolist(), *c.bm25_ids[:cand_k].tolist()]))
    fused = convex({i: c.cos[i] for i in ids}, {i: c.bm[i] for i in ids}, [alpha, 1 - alpha])
    score = np.array([fused[i] for i in ids])
    return np.asarray(ids)[np.argsort(-score, kind="stable")]


def rrf_grid():
    # Only the ratio of the two weights matters; dense_weight stays 1 as in Config.
    for cand_k, wb, k in itertools.product((30, 100), (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0),
                                           (1, 5, 10, 20, 30, 60, 100, 200)):
        yield ("rrf", cand_k, 1.0, wb, k)


def convex_grid():
    for cand_k, alpha in itertools.product((30, 100), [round(a, 2) for a in np.arange(0.0, 1.0001, 0.05)]):
        yield ("convex", cand_k, alpha)


def fused_order(c: Candidates, setting: tuple) -> np.ndarray:
    if setting[0] == "rrf":
        _, cand_k, wd, wb, k = setting
        return fuse_rrf(c, cand_k, wd, wb, k)
    _, cand_k, alpha = setting
    return fuse_convex(c, cand_k, alpha)


def describe(setting: tuple) -> str:
    if setting[0] == "rrf":
        _, cand_k, wd, wb, k = setting
        return f"weighted RRF dense_weight={wd:g} bm25_weight={wb:g} rrf_k={k} candidate_k={cand_k}"
    _, cand_k, alpha = setting
    return f"convex min-max {alpha:g}*dense + {1 - alpha:g}*bm25, candidate_k={cand_k}"


def score_settings(cands: list[Candidates], golds: list[set[int]], settings: list[tuple]) -> dict[tuple, dict]:
    return {s: metrics([first_gold_rank(fused_order(c, s), g) for c, g in zip(cands, golds)]) for s in settings}


def bm25_search_full(bm25: BM25, tokens: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    """BM25.search's top-k (same selection, score-0 documents left out) plus the full score vector,
    which the convex fusion needs for dense-only candidates, as rag.retrieval.Retriever does."""
    s = bm25.scores(tokens)
    return top_k(s, k), s


def rr10(ranks) -> np.ndarray:
    ranks = np.asarray(ranks)
    return np.where((ranks > 0) & (ranks <= 10), 1.0 / np.maximum(ranks, 1), 0.0)


def paired_bootstrap(a, b, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of mean(a - b) over questions resampled with replacement (paired: same questions)."""
    d = np.asarray(a) - np.asarray(b)
    idx = np.random.default_rng(seed).integers(0, len(d), size=(n_boot, len(d)))
    means = d[idx].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def print_row(name: str, m: dict) -> None:
    print(f"  {name:44} " + "  ".join(f"{key} {m[key]:.3f}" for key in ("R@1", "R@5", "R@10", "MRR@10")))


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--answers", type=int, default=0, help="passages to index (all golds + distractors); 0: all")
    ap.add_argument("--questions", type=int, default=0, help="questions per split; 0: all 2,000")
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    ap.add_argument("--batch-size", type=int, default=Config().embed_batch_size)
    ap.add_argument("--cache", default="/tmp/rag-bench-insuranceqa")
    args = ap.parse_args()
    run_wall, run_cpu = time.perf_counter(), time.process_time()

    texts, splits = load_data(args.answers, args.questions)
    say(f"{len(texts)} passages, {len(splits['valid'])} valid and {len(splits['test'])} test questions")
    config = Config()
    with Clock() as load_c:
        embedder = load_embedder(config, dtype=args.dtype)
    say(f"{embedder!r} loaded in {load_c.wall:.1f} s")

    with Clock() as tok_c:
        tokenizer = ChineseTokenizer()  # no corpus lexicon: InsuranceQA has no article metadata to draw names from
        docs = [tokenizer.tokenize(t, search=True) for t in texts]
    with Clock() as bm25_c:
        bm25 = BM25.build(docs)
    del docs
    say(f"BM25 built ({tok_c.wall + bm25_c.wall:.1f} s)")
    vectors, emb = passage_vectors(embedder, texts, Path(args.cache), args.batch_size)
    all_tokens = sum(embedder.token_count(t) for t in texts)
    with Clock() as faiss_c:
        dense = make_dense_index(vectors, "flat", config)

    # Valid: batch-encoded questions (only quality matters here), then the grid.
    valid = splits["valid"]
    with Clock() as venc:
        vq = embedder.encode_queries([q for q, _ in valid], batch_size=32)
    say(f"valid questions embedded in {venc.wall:.1f} s")
    _, vids = dense.search(vq, DEPTH)
    vcands = []
    for (q, _), qv, dids in zip(valid, vq, vids):
        bids, full = bm25_search_full(bm25, tokenizer.tokenize(q, search=True), DEPTH)
        vcands.append(Candidates(dids[dids >= 0], bids, vectors, qv, full))
    vgold = [set(g) for _, g in valid]
    if config.fusion == "rrf":
        default = ("rrf", config.candidate_k, config.dense_weight, config.bm25_weight, config.rrf_k)
    else:
        default = ("convex", config.candidate_k, config.dense_weight / (config.dense_weight + config.bm25_weight))
    grids = {"rrf": list(rrf_grid()), "convex": list(convex_grid())}
    grids[default[0]].append(default)
    with Clock() as grid_c:
        rrf_scores = score_settings(vcands, vgold, grids["rrf"])
        convex_scores = score_settings(vcands, vgold, grids["convex"])
    say(f"grid of {len(rrf_scores) + len(convex_scores)} settings scored on valid in {grid_c.wall:.1f} s")
    best_rrf = max(rrf_scores, key=lambda s: (rrf_scores[s]["MRR@10"], rrf_scores[s]["R@10"]))
    best_convex = max(convex_scores, key=lambda s: (convex_scores[s]["MRR@10"], convex_scores[s]["R@10"]))
    allv = {**rrf_scores, **convex_scores}
    chosen = max((best_rrf, best_convex), key=lambda s: (allv[s]["MRR@10"], allv[s]["R@10"]))
    v_dense = metrics([first_gold_rank(c.dense_ids, g) for c, g in zip(vcands, vgold)])
    v_bm25 = metrics([first_gold_rank(c.bm25_ids, g) for c, g in zip(vcands, vgold)])
    del vcands

    # Test: one question at a time, timed stage by stage, fused with the chosen setting.
    test = splits["test"]
    tcands, lat = [], {"dense": [], "bm25": [], "fuse": [], "total": [], "cpu": []}
    embedder.encode_queries([test[0][0]])  # warm-up: first-call allocations are not what a user waits for
    for q, _ in test:
        w0, c0 = time.perf_counter(), time.process_time()
        qv = embedder.encode_queries([q])
        _, dids = dense.search(qv, DEPTH)
        w1 = time.perf_counter()
        bids, full = bm25_search_full(bm25, tokenizer.tokenize(q, search=True), DEPTH)
        w2 = time.perf_counter()
        cand = Candidates(dids[0][dids[0] >= 0], bids, vectors, qv[0], full)
        fused_order(cand, chosen)[:10]
        w3, c3 = time.perf_counter(), time.process_time()
        tcands.append(cand)
        for key, v in (("dense", w1 - w0), ("bm25", w2 - w1), ("fuse", w3 - w2), ("total", w3 - w0), ("cpu", c3 - c0)):
            lat[key].append(v * 1000)
    tgold = [set(g) for _, g in test]
    t_dense_ranks = [first_gold_rank(c.dense_ids, g) for c, g in zip(tcands, tgold)]
    t_bm25_ranks = [first_gold_rank(c.bm25_ids, g) for c, g in zip(tcands, tgold)]
    t_fused_ranks = [first_gold_rank(fused_order(c, chosen), g) for c, g in zip(tcands, tgold)]
    t_dense, t_bm25 = metrics(t_dense_ranks), metrics(t_bm25_ranks)
    t_scores = score_settings(tcands, tgold, list(dict.fromkeys([default, best_rrf, best_convex])))

    # ------------------------------------------------------------------ report
    n = len(texts)
    print(f"InsuranceQA-zh (insuranceqa-data 1.2): {n:,} answer passages (mean {np.mean([len(t) for t in texts]):.0f} "
          f"characters), {len(valid)} valid / {len(test)} test questions")
    print(f"embedder             {embedder!r}, batch size {args.batch_size}")
    print(f"model load           {load_c.wall:.1f} s wall, {load_c.cpu:.1f} s CPU")
    # Rates come from the blocks that supplied the vectors (embedded now or in an earlier run), per torch thread
    # count; the time to embed all n passages is their token count at that rate.
    print(f"embed passages       {emb['embedded_now']} embedded in this run, {emb['unique'] - emb['embedded_now']} from "
          f"{args.cache} ({emb['unique']:,} distinct texts, {all_tokens / n:.0f} tokens each)")
    for threads, g in sorted(emb["by_threads"].items(), key=lambda kv: str(kv[0])):
        w, c = all_tokens / (g["tokens"] / g["wall"]), all_tokens * g["cpu"] / g["tokens"]
        print(f"  torch threads {threads}: {g['tokens'] / g['wall']:.0f} tokens/s, CPU/wall {g['cpu'] / g['wall']:.2f} "
              f"over {g['n']} passages of {g['tokens'] / g['n']:.0f} tokens -> all {n:,}: {w:.0f} s wall, {c:.0f} s CPU, "
              f"{n / w:.1f} passages/s")
    best = max(emb["by_threads"].values(), key=lambda g: g["tokens"] / g["wall"])
    embed_w, embed_c = all_tokens * best["wall"] / best["tokens"], all_tokens * best["cpu"] / best["tokens"]
    print(f"tokenize (jieba)     {tok_c.wall:.1f} s wall, {tok_c.cpu:.1f} s CPU")
    print(f"BM25 build           {bm25_c.wall:.1f} s wall, {bm25_c.cpu:.1f} s CPU")
    print(f"FAISS flat build     {faiss_c.wall:.2f} s wall")
    build_w = embed_w + tok_c.wall + bm25_c.wall + faiss_c.wall
    build_c = embed_c + tok_c.cpu + bm25_c.cpu + faiss_c.cpu
    print(f"build total          {build_w:.1f} s wall, {build_c:.1f} s CPU, {n / build_w:.1f} passages/s "
          "(embedding at the fastest rate above)")
    pct = lambda key, p: np.percentile(lat[key], p)  # noqa: E731
    print(f"query latency (ms, one at a time, {len(test)} test questions)")
    for key, label in (("dense", "dense (embed + FAISS)"), ("bm25", "BM25 (tokenize + search)"),
                       ("fuse", "fusion"), ("total", "fused query, wall"), ("cpu", "fused query, CPU")):
        print(f"  {label:26} p50 {pct(key, 50):7.2f}  p95 {pct(key, 95):7.2f}")
    print(f"valid split (grid of {len(rrf_scores)} RRF + {len(convex_scores)} convex settings, chosen by MRR@10); "
          f"project default: {describe(default)}")
    print_row("BM25 alone", v_bm25)
    print_row("dense alone", v_dense)
    print_row("project default", allv[default])
    print_row("best RRF", allv[best_rrf])
    print_row("best convex", allv[best_convex])
    print("  top 5 RRF settings on valid:")
    for s in sorted(rrf_scores, key=lambda s: -rrf_scores[s]["MRR@10"])[:5]:
        print(f"    MRR@10 {rrf_scores[s]['MRR@10']:.4f}  {describe(s)}")
    print("  top 5 convex settings on valid:")
    for s in sorted(convex_scores, key=lambda s: -convex_scores[s]["MRR@10"])[:5]:
        print(f"    MRR@10 {convex_scores[s]['MRR@10']:.4f}  {describe(s)}")
    print("test split")
    print_row("BM25 alone", t_bm25)
    print_row("dense alone", t_dense)
    print_row("project default", t_scores[default])
    print_row("best RRF on valid", t_scores[best_rrf])
    print_row("best convex on valid", t_scores[best_convex])
    print_row("FUSED (chosen on valid)", t_scores[chosen])
    rr_f, rr_d, rr_b = rr10(t_fused_ranks), rr10(t_dense_ranks), rr10(t_bm25_ranks)
    for other, rr_o in (("dense", rr_d), ("BM25", rr_b)):
        lo, hi = paired_bootstrap(rr_f, rr_o)
        print(f"fused - {other:5}        MRR@10 {rr_f.mean() - rr_o.mean():+.4f} (95% paired bootstrap {lo:+.4f} .. {hi:+.4f}); "
              f"reciprocal rank higher on {int((rr_f > rr_o).sum())} questions, lower on {int((rr_f < rr_o).sum())}")
    print(f"best RRF on valid    {describe(best_rrf)}")
    print(f"best convex on valid {describe(best_convex)}")
    print(f"chosen fusion        {describe(chosen)}")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak memory (RSS)    {peak_mb:.0f} MB")
    print(f"whole run            {time.perf_counter() - run_wall:.1f} s wall, {time.process_time() - run_cpu:.1f} s CPU")


if __name__ == "__main__":
    main()
