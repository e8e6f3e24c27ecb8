"""Cold start-up on this machine: `rag --help` against a single `rag ask`, and the local LLM's load.

    python bench/bench_startup.py [--repeats 3] [--index DIR] [--llm]

Each figure is a fresh process (`python -m rag ...`, as the `rag` script runs it), timed from spawn to
exit; the runs alternate help / ask so both see the same machine. The bar (issue 10): the median cold
`rag ask` within 10x of the median `rag --help`. Without --index, an index of corpus/ is built into a
temp folder first (not timed). With --llm, `LocalGenerator.load()` is timed in a fresh process: the
first load converts the GGUF once into the cache (skipped if already cached, unless --fresh-llm-cache),
the next ones read the cached folder; peak RSS of each. Not a test: it prints, it does not assert.
The machine is shared: the 1-minute load average is printed with every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "报告会在哪里举行？"


def load() -> str:
    return "load %.2f" % os.getloadavg()[0]


def run_child(cmd: list[str], env: dict) -> tuple[float, int, str]:
    """(wall seconds, this child's own peak RSS in MB via wait4, its stdout): a fresh process, stderr dropped."""
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child: stdout to a file (no pipe to drain), stderr dropped
        os.chdir(ROOT)
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, 2)
        out = os.open(env["_BENCH_OUT"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(out, 1)
        os.execvpe(cmd[0], cmd, {k: v for k, v in env.items() if k != "_BENCH_OUT"})
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - t0
    text = Path(env["_BENCH_OUT"]).read_text(encoding="utf-8", errors="replace")
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{' '.join(cmd)} failed ({os.waitstatus_to_exitcode(status)}): {text[-300:]}")
    return wall, usage.ru_maxrss // 1024, text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--index", help="an index to ask; default: build one of corpus/ into a temp folder")
    ap.add_argument("--cache-dir", help="model cache (default: rag's, ~/.cache/rag-news)")
    ap.add_argument("--llm", action="store_true", help="also time the local LLM's load (0.5B)")
    ap.add_argument("--fresh-llm-cache", action="store_true", help="with --llm: drop the converted LLM first")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "_BENCH_OUT": str(work / "out.txt")}
    if args.cache_dir:
        env["RAG_CACHE_DIR"] = args.cache_dir
    index = args.index
    if index is None:
        index = str(work / "index")
        print(f"building an index of corpus/ into {index} ... ({load()})", flush=True)
        run_child([sys.executable, "-m", "rag", "build", "--quiet", "--corpus", str(ROOT / "corpus"), "--index", index], env)

    helps, asks = [], []
    for i in range(args.repeats):
        w, rss, _ = run_child([sys.executable, "-m", "rag", "--help"], env)
        helps.append(w)
        print(f"rag --help      {w:6.2f} s  peak {rss:5d} MB  ({load()})", flush=True)
        w, rss, out = run_child([sys.executable, "-m", "rag", "ask", "--index", index, QUESTION], env)
        asks.append(w)
        print(f"rag ask (cold)  {w:6.2f} s  peak {rss:5d} MB  ({load()})  -> {out.splitlines()[0][:40] if out else ''}",
              flush=True)
    h, a = statistics.median(helps), statistics.median(asks)
    print(f"median: rag --help {h:.2f} s, rag ask {a:.2f} s, ratio {a / h:.1f}x (bar: 10x)  ({load()})")

    if args.llm:
        code = (
            "import time, json, sys; t0 = time.perf_counter()\n"
            "from pathlib import Path\n"
            "from rag.config import Config\n"
            "from rag.llm import LOCAL_MODELS, LocalGenerator, converted_folder\n"
            "cache = Config().cache_dir if not sys.argv[1] else Path(sys.argv[1])\n"
            "spec = LOCAL_MODELS['0.5b']\n"
            "cached = (converted_folder(spec, cache) / 'gguf_source.json').is_file()\n"
            "LocalGenerator(spec, cache).load()\n"
            "print(json.dumps({'cached': cached, 'seconds': time.perf_counter() - t0}))\n"
        )
        cache = args.cache_dir or ""
        if args.fresh_llm_cache:
            import shutil

            from rag.config import Config
            from rag.llm import LOCAL_MODELS, converted_folder

            shutil.rmtree(converted_folder(LOCAL_MODELS["0.5b"], Path(cache) if cache else Config().cache_dir),
                          ignore_errors=True)
        for i in range(1 + args.repeats):
            w, rss, out = run_child([sys.executable, "-c", code, cache], env)
            info = json.loads(out.strip().splitlines()[-1])
            what = "from the cached folder" if info["cached"] else "from the GGUF (converts, then caches)"
            print(f"LLM load {what:38s} {w:6.2f} s wall (load() {info['seconds']:.2f} s)  peak {rss:5d} MB  ({load()})",
                  flush=True)


if __name__ == "__main__":
    main()
