"""A small, real OpenAI-compatible HTTP server for tests, with injectable failures.

Run as a process (``python tests/openai_server.py --port 0 --ready-file F``) so a test
can kill it for real, or in a thread with ``start_in_thread``. Serves
``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models`` and
``GET /health`` over a real socket (stdlib ``ThreadingHTTPServer``).

Replies are deterministic echoes: sample i of a prompt P is ``echo[<last line of P>]#<i>
\\boxed{<len(P) mod 97>}``, so a test can check every result belongs to its request.

Failure injection (each decided per HTTP request with a seeded RNG):
``--error-rate`` (HTTP 500), ``--drop-rate`` (close the socket without replying),
``--slow-rate``/``--slow-s`` (sleep before replying), ``--fail-first K`` (the first K
requests for each distinct prompt get HTTP 500), ``--ignore-n`` (always one choice),
``--delay-s`` (latency of every reply), ``--error-every N`` / ``--drop-every N`` (every
N-th request received, for tests that must see each failure kind). ``--log FILE`` appends one JSON line per
successful reply (prompt, number of choices) so tests can count server-side work.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def echo_text(prompt: str, i: int) -> str:
    last = prompt.strip().splitlines()[-1] if prompt.strip() else ""
    return f"echo[{last}]#{i} \\boxed{{{len(prompt) % 97}}}"


class Config:
    def __init__(self, **kw):
        self.error_rate = float(kw.get("error_rate", 0.0))
        self.drop_rate = float(kw.get("drop_rate", 0.0))
        self.slow_rate = float(kw.get("slow_rate", 0.0))
        self.slow_s = float(kw.get("slow_s", 0.0))
        self.fail_first = int(kw.get("fail_first", 0))
        self.error_every = int(kw.get("error_every", 0))
        self.drop_every = int(kw.get("drop_every", 0))
        self.ignore_n = bool(kw.get("ignore_n", False))
        self.delay_s = float(kw.get("delay_s", 0.0))
        self.log = kw.get("log")
        self.model = kw.get("model", "echo-model")
        self.rng = random.Random(int(kw.get("seed", 0)))
        self.lock = threading.Lock()
        self.seen: Counter = Counter()
        self.counts: Counter = Counter()


def make_handler(cfg: Config):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _send(self, code: int, obj: dict) -> None:
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path.rstrip("/") == "/health":
                return self._send(200, {"status": "ok"})
            if self.path.rstrip("/") == "/v1/models":
                return self._send(200, {"object": "list", "data": [{"id": cfg.model, "object": "model"}]})
            return self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            try:
                body = json.loads(raw)
            except json.JSONDecodeError:
                return self._send(400, {"error": {"message": "body is not JSON"}})
            chat = self.path.rstrip("/") == "/v1/chat/completions"
            if not chat and self.path.rstrip("/") != "/v1/completions":
                return self._send(404, {"error": {"message": f"no route {self.path}"}})
            if chat:
                msgs = body.get("messages")
                if not isinstance(msgs, list):
                    return self._send(400, {"error": {"message": "messages must be a list"}})
                prompt = "\n".join(str(m.get("content", "")) for m in msgs)
            else:
                prompt = body.get("prompt")
                if not isinstance(prompt, str):
                    return self._send(400, {"error": {"message": "prompt must be a string"}})
            with cfg.lock:
                cfg.seen[prompt] += 1
                cfg.counts["received"] += 1
                k = cfg.counts["received"]
                roll = cfg.rng.random()
                slow = cfg.rng.random() < cfg.slow_rate
                if cfg.drop_every and k % cfg.drop_every == 0:
                    action = "drop"
                elif cfg.seen[prompt] <= cfg.fail_first or roll < cfg.error_rate \
                        or (cfg.error_every and k % cfg.error_every == 0):
                    action = "500"
                elif roll < cfg.error_rate + cfg.drop_rate:
                    action = "drop"
                else:
                    action = "ok"
                if action != "ok":
                    cfg.counts[action] += 1
            if action == "500":
                return self._send(500, {"error": {"message": "injected failure"}})
            if action == "drop":  # close the socket without a reply
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
            delay = cfg.delay_s + (cfg.slow_s if slow else 0.0)
            if delay:
                time.sleep(delay)
            n = 1 if cfg.ignore_n else int(body.get("n") or 1)
            base = int(body.get("seed") or 0)
            choices = []
            for i in range(n):
                text = echo_text(prompt, base + i)
                if chat:
                    choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                    "finish_reason": "stop"})
                else:
                    choices.append({"index": i, "text": text, "finish_reason": "stop"})
            obj = {"id": "cmpl-test", "object": "chat.completion" if chat else "text_completion",
                   "model": body.get("model"), "choices": choices}
            try:
                self._send(200, obj)
            except OSError:
                return
            with cfg.lock:
                cfg.counts["ok"] += 1
                if cfg.log:
                    with open(cfg.log, "a", encoding="utf-8") as fh:
                        fh.write(json.dumps({"prompt": prompt, "n": n}) + "\n")

    return Handler


def start_in_thread(port: int = 0, **kw):
    """Start a server in a daemon thread; returns (server, base_url, config)."""
    cfg = Config(**kw)
    server = ThreadingHTTPServer(("127.0.0.1", port), make_handler(cfg))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1", cfg


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=0, help="port (0: any free port)")
    ap.add_argument("--ready-file", help="write the bound port here once listening")
    ap.add_argument("--error-rate", type=float, default=0.0, help="share of requests answered with HTTP 500")
    ap.add_argument("--drop-rate", type=float, default=0.0, help="share of requests whose connection is dropped")
    ap.add_argument("--slow-rate", type=float, default=0.0, help="share of requests delayed by --slow-s")
    ap.add_argument("--slow-s", type=float, default=0.0, help="extra delay of slow requests")
    ap.add_argument("--fail-first", type=int, default=0, help="first K requests per prompt get HTTP 500")
    ap.add_argument("--error-every", type=int, default=0, help="every N-th request received gets HTTP 500")
    ap.add_argument("--drop-every", type=int, default=0, help="every N-th request received is dropped")
    ap.add_argument("--ignore-n", action="store_true", help="always return one choice")
    ap.add_argument("--delay-s", type=float, default=0.0, help="latency of every reply")
    ap.add_argument("--seed", type=int, default=0, help="seed of the failure injection")
    ap.add_argument("--log", help="append one JSON line per successful reply")
    ap.add_argument("--model", default="echo-model", help="model id reported by /v1/models")
    args = ap.parse_args(argv)
    cfg = Config(**{k: v for k, v in vars(args).items() if k not in ("port", "ready_file")})
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(cfg))
    server.daemon_threads = True
    if args.ready_file:
        tmp = args.ready_file + ".tmp"
        with open(tmp, "w") as fh:
            fh.write(str(server.server_address[1]))
        os.replace(tmp, args.ready_file)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
