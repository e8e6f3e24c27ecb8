"""Scores a QA file (the shared eval format) against the pipeline: retrieval hits, answers, refusals, latency."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .answering import Answer
from .text import compact


def read_qa(path: Path) -> list[dict]:
    items = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n} is not valid JSON ({e.msg})") from None
    return items


def answer_correct(item: dict, answer: Answer, max_chars: int = 150) -> bool:
    """An answerable item is right when found, short, and containing the gold strings."""
    if not item.get("answerable", True):
        return not answer.found
    text = compact(answer.answer)
    if not answer.found or len(answer.answer) > max_chars:
        return False
    any_ok = not item.get("answers_any") or any(compact(a) in text for a in item["answers_any"])
    all_ok = all(compact(a) in text for a in item.get("answers_all", []))
    return any_ok and all_ok


def evidence_rank(item: dict, answer: Answer) -> int | None:
    """1-based rank of the first passage that contains an evidence string, or None."""
    evidence = [compact(e) for e in item.get("evidence", [])]
    for rank, hit in enumerate(answer.passages, start=1):
        text = compact(hit.chunk.text)
        if any(e in text for e in evidence):
            return rank
    return None


def score(items: list[dict], answers: list[Answer], max_chars: int = 150) -> dict:
    answerable = [(i, a) for i, a in zip(items, answers) if i.get("answerable", True)]
    unanswerable = [(i, a) for i, a in zip(items, answers) if not i.get("answerable", True)]
    ranks = [evidence_rank(i, a) for i, a in answerable]
    latency = np.array([a.timings_ms.get("retrieve", 0.0) for a in answers]) if answers else np.zeros(1)
    n = max(len(answerable), 1)
    return {
        "questions": len(items),
        "answerable": len(answerable),
        "hit@1": sum(r == 1 for r in ranks) / n,
        "hit@5": sum(r is not None and r <= 5 for r in ranks) / n,
        "mrr@10": sum(1 / r for r in ranks if r is not None and r <= 10) / n,
        "answer_accuracy": sum(answer_correct(i, a, max_chars) for i, a in answerable) / n,
        "refusal_accuracy": sum(not a.found for _, a in unanswerable) / max(len(unanswerable), 1),
        "false_refusals": sum(not a.found for _, a in answerable),
        # How well the answer model's decline threshold (rag/models/answerer.json) separates the two.
        "support_max_unanswerable": max((a.support for _, a in unanswerable), default=0.0),
        "support_min_answerable": min((a.support for i, a in answerable if answer_correct(i, a, max_chars)), default=1.0),
        "retrieve_ms_p50": float(np.percentile(latency, 50)),
        "retrieve_ms_p95": float(np.percentile(latency, 95)),
        "failures": [
            {"id": i.get("id"), "question": i["question"], "answer": a.answer, "found": a.found}
            for i, a in zip(items, answers) if not answer_correct(i, a, max_chars)
        ],
    }
