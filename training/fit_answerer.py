"""Fit the answer model (rag/models/answerer.json) on training/qa.jsonl and report 5-fold cross-validation.

    python training/fit_answerer.py [--index /tmp/rag-train-index] [--out rag/models/answerer.json]

Builds (or reuses) an index of the training articles (training/export_articles.py) with the seed article,
retrieves for every question as the product does, labels every candidate span (positive: an answerable
question's span in its article that contains the gold answer), fits a logistic regression, and chooses the
decline threshold on out-of-fold predictions (folds grouped by article, so no article is in both halves).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
ROOT = HERE.parent

from rag.answering import ExtractiveAnswerer
from rag.config import Config
from rag.evaluation import answer_correct, evidence_rank, read_qa
from rag.spans import FEATURES, GATE_FEATURES, Linear, SpanModel, gate_row, logistic_loss, softmax_loss
from rag.text import compact

SEED = ROOT.parent / "shared" / "corpus"


def _norm(text: str) -> str:
    # rag.evaluation's form (compact: NFKC, no whitespace), lower-cased too: a span is labelled right whatever
    # the case of its Latin letters, where the eval compares case as written. Kept as the answerer was fitted.
    return compact(text).lower()


def label(item: dict, cand) -> bool:
    if not item.get("answerable", True) or cand.chunk.doc_id != item["doc"]:
        return False
    text = _norm(cand.text)
    if item.get("answers_all"):
        return all(_norm(a) in text for a in item["answers_all"])
    return any(_norm(a) in text for a in item["answers_any"])


def fold_of(item: dict, k: int) -> int:
    key = item["doc"] or item["id"]
    return int(hashlib.sha256(key.encode()).hexdigest(), 16) % k


def collect(qa, items: list[dict]):
    """Per question: hits, candidates, feature rows, labels (models are applied later)."""
    out = []
    for n, item in enumerate(items):
        hits = qa.retriever.search(item["question"], k=qa.config.rerank_k)
        cands, rows = qa.answerer.features(item["question"], hits)
        labels = np.array([label(item, c) for c in cands], dtype=float)
        out.append({"item": item, "hits": hits, "cands": cands, "rows": rows, "labels": labels})
        if n % 100 == 0:
            print(f"  {n}/{len(items)} questions", file=sys.stderr)
    return out


def fit_ranker(data, l2: float) -> Linear:
    """The listwise ranker over questions that have a positive span."""
    rows, groups, at = [], [], 0
    for d in data:
        if d["labels"].sum() > 0:
            rows.append(d["rows"])
            groups.append((at, at + len(d["rows"]), d["labels"]))
            at += len(d["rows"])
    return Linear.fit(FEATURES, np.vstack(rows), softmax_loss(groups), l2)


def always_answer(ranker: Linear) -> SpanModel:
    n = len(GATE_FEATURES)
    return SpanModel(ranker, Linear(GATE_FEATURES, np.zeros(n), np.ones(n), np.zeros(n), 20.0), 0.0, {})


def outcomes(qa, data, ranker: Linear) -> list[tuple[np.ndarray, bool, int | None]]:
    """Per question: (gate features, answer right if answered, evidence rank after reranking)."""
    qa.answerer.model = always_answer(ranker)
    res = []
    for d in data:
        a = qa.answerer.answer(d["item"]["question"], d["hits"], qa.index.documents)
        gate = gate_row(d["rows"], ranker.score(d["rows"])) if len(d["rows"]) else np.zeros(len(GATE_FEATURES))
        res.append((gate, answer_correct(d["item"], a) and a.found, evidence_rank(d["item"], a)))
    return res


def metrics(items, res, threshold: float) -> dict:
    ans = [(i, r) for i, r in zip(items, res) if i.get("answerable", True)]
    neg = [(i, r) for i, r in zip(items, res) if not i.get("answerable", True)]
    declined = int(sum(r[0] < threshold for _, r in ans))
    return {
        "questions": len(items), "answerable": len(ans), "unanswerable": len(neg),
        "hit@1": round(sum(r[2] == 1 for _, r in ans) / len(ans), 3),
        "hit@5": round(sum(r[2] is not None and r[2] <= 5 for _, r in ans) / len(ans), 3),
        "answer_accuracy": round(sum(r[0] >= threshold and r[1] for _, r in ans) / len(ans), 3),
        "answerable_declined": declined,
        "unanswerable_declined": int(sum(r[0] < threshold for _, r in neg)),
        "overall_accuracy": round((sum(r[0] >= threshold and r[1] for _, r in ans)
                                   + sum(r[0] < threshold for _, r in neg)) / len(items), 3),
    }


MAX_DECLINED = 0.05  # the stated target: at most 5% of answerable questions declined (out-of-fold, training set)


def choose_threshold(items, res) -> float:
    """The highest threshold that declines at most MAX_DECLINED of the answerable questions, on out-of-fold
    predictions: the unanswerable ones are declined as far as that allows."""
    grid = np.round(np.arange(0.01, 0.9, 0.01), 3)
    n = sum(i.get("answerable", True) for i in items)
    ok = [t for t in grid if metrics(items, res, t)["answerable_declined"] <= MAX_DECLINED * n]
    return float(max(ok, default=grid[0]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--index", type=Path, default=Path(tempfile.gettempdir()) / "rag-train-index")
    p.add_argument("--qa", type=Path, default=HERE / "qa.jsonl")
    p.add_argument("--out", type=Path, default=ROOT / "rag" / "models" / "answerer.json")
    p.add_argument("--l2", type=float, default=1.0, help="L2 penalty of both models (on standardised features)")
    p.add_argument("--folds", type=int, default=5)
    args = p.parse_args()

    corpus = args.index.with_name(args.index.name + "-corpus")
    if not (args.index / "current").exists():
        subprocess.run([sys.executable, str(HERE / "export_articles.py"), str(corpus)], check=True)
        for f in SEED.iterdir():
            (corpus / f.name).write_bytes(f.read_bytes())
        subprocess.run([sys.executable, "-m", "rag", "build", "--corpus", str(corpus), "--index", str(args.index)],
                       check=True)
    from rag.answering import QA
    from rag.embedding import load_embedder
    from rag.index import load
    from rag.retrieval import Retriever
    config = Config(index_dir=args.index)
    retriever = Retriever(load(args.index), load_embedder(config), config)
    n = len(FEATURES)
    qa = QA(retriever, ExtractiveAnswerer(retriever, config, always_answer(Linear(FEATURES, np.zeros(n), np.ones(n), np.zeros(n), 0.0))), config)
    items = read_qa(args.qa)
    data = collect(qa, items)

    folds = np.array([fold_of(i, args.folds) for i in items])
    oof: list = [None] * len(items)  # out-of-fold: gate features, right if answered, evidence rank
    for f in range(args.folds):
        ranker = fit_ranker([d for d, g in zip(data, folds) if g != f], args.l2)
        test = [n for n, g in enumerate(folds) if g == f]
        for n, r in zip(test, outcomes(qa, [data[n] for n in test], ranker)):
            oof[n] = r
    gate_x = np.array([r[0] for r in oof])
    gate_y = np.array([float(r[1] and i.get("answerable", True)) for r, i in zip(oof, items)])
    support = np.zeros(len(items))
    for f in range(args.folds):
        gate = Linear.fit(GATE_FEATURES, gate_x[folds != f], logistic_loss(gate_y[folds != f]), args.l2)
        support[folds == f] = 1.0 / (1.0 + np.exp(-gate.score(gate_x[folds == f])))
    res = [(s_, r[1], r[2]) for s_, r in zip(support, oof)]
    threshold = choose_threshold(items, res)
    cv = metrics(items, res, threshold)
    cv["answerable_right_if_never_declined"] = round(sum(r[1] for r, i in zip(oof, items) if i.get("answerable", True))
                                                     / cv["answerable"], 3)
    print("5-fold CV on", args.qa, json.dumps(cv, ensure_ascii=False))
    for t in (threshold - 0.1, threshold - 0.05, threshold + 0.05, threshold + 0.1):
        print(f"  at threshold {t:.2f}:", json.dumps(metrics(items, res, t)))

    ranker = fit_ranker(data, args.l2)
    gate = Linear.fit(GATE_FEATURES, gate_x, logistic_loss(gate_y), args.l2)
    model = SpanModel(ranker, gate, threshold, {
        "trained_on": f"{args.qa.relative_to(ROOT) if args.qa.is_relative_to(ROOT) else args.qa} "
                      f"({len(items)} questions, {len({i['doc'] for i in items if i['doc']})} articles, "
                      f"sha256 {hashlib.sha256(args.qa.read_bytes()).hexdigest()[:16]})",
        "candidates": int(sum(len(d["labels"]) for d in data)), "l2": args.l2,
        "ranker": "softmax over each question's candidate spans (listwise), positives: spans with the gold answer",
        "gate": "logistic regression on out-of-fold ranker outputs; label: the chosen span answers correctly",
        "threshold_rule": f"the highest that declines at most {MAX_DECLINED:.0%} of answerable questions on "
                          "out-of-fold predictions, folds grouped by article",
        "cv": cv,
    })
    args.out.parent.mkdir(parents=True, exist_ok=True)
    model.save(args.out)
    print("wrote", args.out, "threshold", threshold)
    for part in (ranker, gate):
        print("  " + ", ".join(f"{f} {w:+.2f}" for f, w in sorted(zip(part.features, part.weights), key=lambda x: -abs(x[1]))))


if __name__ == "__main__":
    main()
