"""Benchmark the generators on this machine: time to first token, tokens/s, answer time, accuracy on seed_qa.

    python bench/bench_generation.py [--generators extractive,local,openai] [--sizes 0.5b,1.5b]
                                     [--base-url URL] [--limit N] [--workdir /tmp/rag-bench-gen]

Builds the seed index with the real embedding model, then answers every question in the QA file
with each generator. `openai` talks to --base-url, or, without one, to bench/openai_server.py
started here on loopback over the same GGUF. Prints, per generator: answer accuracy, refusals,
sentences without a citation (in the final answers, and in what the model wrote), sentences dropped
by the support check, time to first token, tokens/s and answer time (p50), and the support scores
of the sentences kept in right and wrong answers (what Generator.min_support is chosen between).
Not a test: it prints, it does not assert.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from rag.answering import QA, StreamEvent
from rag.building import build
from rag.config import Config
from rag.embedding import load_embedder
from rag.evaluation import answer_correct, read_qa, score
from rag.generation import GenerativeAnswerer, GeneratorConfig
from rag.index import load
from rag.llm import LOCAL_MODELS, LocalGenerator, OpenAIGenerator, assemble_gguf
from rag.support import SupportChecker, split_generated

ROOT = Path(__file__).resolve().parent.parent


def p50(values) -> float:
    return float(np.percentile(values, 50)) if len(values) else float("nan")


def run(name: str, qa: QA, items: list[dict], count_tokens) -> dict:
    answers, ttft, rates, totals, raw_uncited, dropped, kept_right, kept_wrong = [], [], [], [], 0, 0, [], []
    for item in items:
        hits = qa.retriever.search(item["question"], k=qa.config.rerank_k)
        t0 = time.perf_counter()
        if isinstance(qa.answerer, GenerativeAnswerer):
            out = list(qa.answerer.stream(item["question"], hits, qa.index.documents, sentences=True))
        else:
            out = [StreamEvent("answer", answer=qa.answerer.answer(item["question"], hits, qa.index.documents))]
        totals.append((time.perf_counter() - t0) * 1000)
        answer = out[-1].answer
        answers.append(answer)
        raw = "".join(e.text for e in out if e.kind == "text")
        checked = [e.sentence for e in out if e.kind == "sentence"]
        t = answer.timings_ms
        if "first_token" in t:
            ttft.append(t["first_token"])
            if count_tokens is not None:
                n = count_tokens(raw)
                if n > 1 and t["generate"] > t["first_token"]:
                    rates.append((n - 1) / ((t["generate"] - t["first_token"]) / 1000))
            raw_uncited += sum(1 for _, cited in split_generated(raw) if not cited)
            dropped += sum(1 for c in checked if not c.supported and not c.decline)
            right = answer_correct(item, answer, qa.config.max_answer_chars)
            (kept_right if right else kept_wrong).extend(c.support for c in checked if c.supported)
        mark = "ok " if answer_correct(item, answer, qa.config.max_answer_chars) else "BAD"
        print(f"  {name:12} {mark} {item['id']} {item['question']} -> {answer.answer[:70]}", flush=True)
    result = score(items, answers, qa.config.max_answer_chars)
    uncited = sum(1 for a in answers if a.found
                  for s in re.split(r"(?<=[。！？；])", a.answer) if s.strip() and not re.search(r"\[\d+\]", s))
    return {
        "generator": name, "accuracy": round(result["answer_accuracy"], 3),
        "refusal_accuracy": round(result["refusal_accuracy"], 3), "false_refusals": result["false_refusals"],
        "uncited_sentences": uncited, "model_sentences_without_marker": raw_uncited, "dropped_sentences": dropped,
        "ttft_ms_p50": round(p50(ttft), 1), "tokens_per_s_p50": round(p50(rates), 2),
        "answer_ms_p50": round(p50(totals), 1),
        "support_kept_in_right": [round(x, 2) for x in sorted(kept_right)[:5]],
        "support_kept_in_wrong": [round(x, 2) for x in sorted(kept_wrong)],
        "failures": [f["id"] for f in result["failures"]],
    }


FILLERS = ("赵海涛", "北京人民大会堂", "创新驱动与开放共享", "300")


def calibrate(qa: QA, items: list[dict], verbose: bool = True) -> dict:
    """Support of hand-made sentences over each answerable question's top passages (no LLM).

    Supported: the article's own evidence sentence for the question. Unsupported: the same sentence
    with each gold answer replaced by a made-up one (a name, a place, a phrase, a number), which is
    what a model inventing an answer in the article's words looks like. The threshold belongs in
    the gap between the two.
    """
    checker = qa.answerer.checker if isinstance(qa.answerer, GenerativeAnswerer) else None
    if checker is None:
        checker = SupportChecker(qa.answerer.tokenizer, qa.retriever.embedder)
    extractive = getattr(qa.answerer, "extractive", qa.answerer)
    good, bad = [], []
    for item in items:
        if not item.get("answerable", True) or not item.get("evidence"):
            continue
        hits = qa.retriever.search(item["question"], k=qa.config.rerank_k)
        passages = list(extractive.answer(item["question"], hits, qa.index.documents).passages)
        evidence = item["evidence"][0]
        golds = [g for g in item.get("answers_any", []) + item.get("answers_all", []) if g in evidence]
        good.append(checker.check(evidence, (1,), item["question"], passages, qa.index.documents, 0.0).support)
        for filler in FILLERS:
            wrong = evidence
            for g in golds:
                wrong = wrong.replace(g, filler)
            if wrong != evidence:
                bad.append(checker.check(wrong, (1,), item["question"], passages, qa.index.documents, 0.0).support)
                if verbose and bad[-1] >= GeneratorConfig().min_support:
                    print(f"  unsupported but {bad[-1]:.2f}: {item['id']} {wrong}")
    lo, hi = max(bad), min(good)
    return {"supported_min": round(hi, 3), "supported_p10": round(float(np.percentile(good, 10)), 3),
            "unsupported_max": round(lo, 3), "unsupported_p90": round(float(np.percentile(bad, 90)), 3),
            "n_supported": len(good), "n_unsupported": len(bad),
            "unsupported_over_threshold": sum(b >= GeneratorConfig().min_support for b in bad),
            "supported_under_threshold": sum(g < GeneratorConfig().min_support for g in good)}


def start_server(size: str, cache_dir: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "openai_server.py"), "--port", "0",
                             "--model-size", size, "--cache-dir", str(cache_dir)],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    line = proc.stdout.readline().strip()
    match = re.match(r"listening (\S+)", line)
    if not match:
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    return proc, match.group(1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--generators", default="extractive,local,openai")
    ap.add_argument("--sizes", default="0.5b", help="local model sizes, comma-separated: 0.5b,1.5b")
    ap.add_argument("--base-url", help="an OpenAI-compatible server to bench instead of starting bench/openai_server.py")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="model name sent to --base-url")
    ap.add_argument("--qa", default=str(ROOT / "tests" / "data" / "seed_qa.jsonl"))
    ap.add_argument("--limit", type=int, help="only the first N questions")
    ap.add_argument("--workdir", default="/tmp/rag-bench-gen")
    ap.add_argument("--cache-dir", help="model cache (default: the project's, ~/.cache/rag-news)")
    ap.add_argument("--calibrate", action="store_true", help="only print the support of hand-made sentences")
    args = ap.parse_args()

    work = Path(args.workdir)
    shutil.rmtree(work / "index", ignore_errors=True)
    (work / "corpus").mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "corpus" / "000_3ab29ec542edc89a.txt", work / "corpus")
    config = Config(corpus_dir=work / "corpus", index_dir=work / "index")
    if args.cache_dir:
        config = config.replace(cache_dir=Path(args.cache_dir))
    embedder = load_embedder(config)
    build(config, embedder)
    index = load(config.index_dir, model_name=embedder.name)
    items = read_qa(Path(args.qa))[: args.limit]

    def qa_with(generator, gen) -> QA:
        qa = QA.over(index, embedder, config)
        if generator is not None:
            qa.answerer = GenerativeAnswerer(qa.answerer, generator, config, gen, embedder)
        return qa

    if args.calibrate:
        print(json.dumps(calibrate(qa_with(None, None), items), ensure_ascii=False))
        return
    results = []
    tokenizer = []

    def counter(text: str) -> int:  # Qwen2.5 models share one tokenizer: the 0.5B GGUF's counts for all
        if not tokenizer:
            from transformers import AutoTokenizer

            path = assemble_gguf(LOCAL_MODELS["0.5b"], config.cache_dir)
            tokenizer.append(AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name))
        return len(tokenizer[0].encode(text, add_special_tokens=False))

    for name in args.generators.split(","):
        if name == "extractive":
            results.append(run("extractive", qa_with(None, None), items, None))
        elif name == "local":
            for size in args.sizes.split(","):
                gen = GeneratorConfig(kind="local", local_model=size)
                generator = LocalGenerator(LOCAL_MODELS[size], config.cache_dir)
                t0 = time.perf_counter()
                generator.load()
                print(f"local {size}: loaded in {time.perf_counter() - t0:.1f} s", flush=True)
                results.append(run(f"local-{size}", qa_with(generator, gen), items, counter))
        elif name == "openai":
            proc, url = (None, args.base_url) if args.base_url else start_server("0.5b", config.cache_dir)
            try:
                gen = GeneratorConfig(kind="openai", base_url=url, model=args.model)
                generator = OpenAIGenerator(url, args.model, timeout=gen.timeout, retries=gen.retries)
                results.append(run("openai", qa_with(generator, gen), items, counter))
            finally:
                if proc is not None:
                    proc.terminate()
                    proc.wait(timeout=30)
    print()
    for r in results:
        print(json.dumps(r, ensure_ascii=False))


if __name__ == "__main__":
    main()
