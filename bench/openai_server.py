"""A small OpenAI-compatible chat-completions server over the local GGUF (transformers), for tests and benchmarks.

    python bench/openai_server.py [--port 0] [--model-size 0.5b] [--cache-dir DIR] [--api-key KEY] [--fail-first N]

Serves POST /v1/chat/completions (streamed as server-sent events over chunked HTTP/1.1, or whole),
GET /v1/models and GET /health on 127.0.0.1. It loads the model first, then prints one line,
"listening http://127.0.0.1:PORT/v1", so a caller can wait for it. `--fail-first N` answers the first
N completion requests with 503, to exercise a client's retries against a real server.

It stands in for llama.cpp's or vLLM's server where neither can be installed (llama-cpp-python only
builds from source here, ~8 minutes); the wire format is the same, so `rag --generator openai` talks
to any of them unchanged.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from rag.config import Config
from rag.llm import LOCAL_MODELS, LocalGenerator


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "rag-openai-server/1"
    generator: LocalGenerator
    model_name: str
    api_key: str | None
    failures_left: list[int]  # shared counter for --fail-first
    lock = threading.Lock()

    def log_message(self, fmt, *args):  # keep the test output quiet
        pass

    def _json(self, status: int, obj: dict) -> None:
        body = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": {"message": message, "type": "invalid_request_error", "code": status}})

    def do_GET(self):
        if self.path.rstrip("/") in ("/v1/models", "/models"):
            self._json(200, {"object": "list", "data": [{"id": self.model_name, "object": "model", "owned_by": "rag"}]})
        elif self.path == "/health":
            self._json(200, {"status": "ok"})
        else:
            self._error(404, f"no route {self.path}")

    def do_POST(self):
        if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
            return self._error(404, f"no route {self.path}")
        if self.api_key and self.headers.get("Authorization") != f"Bearer {self.api_key}":
            return self._error(401, "invalid API key")
        with self.lock:
            if self.failures_left[0] > 0:
                self.failures_left[0] -= 1
                return self._error(503, "warming up (--fail-first)")
        try:
            length = int(self.headers.get("Content-Length") or 0)
            request = json.loads(self.rfile.read(length).decode("utf-8"))
            messages = request["messages"]
            if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in ("system", "user", "assistant")
                for m in messages
            ):
                raise ValueError("messages must be a list of {role, content}")
            max_tokens = int(request.get("max_tokens") or request.get("max_completion_tokens") or 256)
        except (ValueError, KeyError, TypeError) as e:
            return self._error(400, f"bad request: {e}")
        ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        pieces = self.generator.stream(messages, max_tokens)
        if not request.get("stream"):
            text = "".join(pieces)
            tokens = self.generator.count_tokens(text)
            return self._json(200, {
                "id": ident, "object": "chat.completion", "created": created, "model": self.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"completion_tokens": tokens},
            })
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def event(delta: dict, finish: str | None = None) -> None:
            chunk = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            self._chunk(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n")

        try:
            event({"role": "assistant", "content": ""})
            for piece in pieces:
                event({"content": piece})
            event({}, "stop")
            self._chunk("data: [DONE]\n\n")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pieces.close()  # the client went away: stop generating

    def _chunk(self, text: str) -> None:
        data = text.encode("utf-8")
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    ap.add_argument("--model-size", default="0.5b", choices=sorted(LOCAL_MODELS))
    ap.add_argument("--cache-dir", help="where the joined GGUF is cached (default: the project's cache)")
    ap.add_argument("--api-key", help="require this bearer token")
    ap.add_argument("--fail-first", type=int, default=0, help="answer the first N completion requests with 503")
    args = ap.parse_args()

    cache_dir = Path(args.cache_dir) if args.cache_dir else Config().cache_dir
    generator = LocalGenerator(LOCAL_MODELS[args.model_size], cache_dir)
    generator.load()
    Handler.generator, Handler.api_key = generator, args.api_key
    Handler.model_name = f"qwen2.5-coder-{args.model_size}-instruct"
    Handler.failures_left = [args.fail_first]
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    print(f"listening http://{args.host}:{server.server_address[1]}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    sys.exit(main())
