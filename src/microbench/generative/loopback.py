"""A scripted OpenAI-compatible chat-completions server on 127.0.0.1, for tests, benchmarks and dry runs.

``ScriptedChatServer(reply=...)`` answers ``POST /v1/chat/completions`` with ``reply(body) -> str`` (default: the
letter A), after ``delay_s``; ``fail(n, body) -> int | None`` can turn the n-th request into an HTTP error (429,
500...), ``"hang"`` (sleep past the client's timeout) or ``"non_json"`` (HTTP 200 with an HTML body, as a proxy
or a misrouted URL answers). It counts requests, errors and the largest number of
requests in flight at once, and returns first-token letter log-probabilities when asked.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ScriptedChatServer:
    def __init__(self, reply: Callable[[dict], str] | None = None, delay_s: float = 0.0,
                 fail: Callable[[int, dict], int | str | None] | None = None, hang_s: float = 5.0) -> None:
        self.reply = reply or (lambda body: "A")
        self.delay_s, self.fail, self.hang_s = delay_s, fail, hang_s
        self.lock = threading.Lock()
        self.requests = 0
        self.errors: dict[str, int] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self.bodies: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server API
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                with server.lock:
                    server.requests += 1
                    n = server.requests
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    server.bodies.append(body)
                try:
                    outcome = server.fail(n, body) if server.fail else None
                    if outcome == "hang":
                        time.sleep(server.hang_s)
                    elif outcome == "non_json":
                        self._send(200, None)
                        return
                    elif outcome:
                        with server.lock:
                            server.errors[str(outcome)] = server.errors.get(str(outcome), 0) + 1
                        self._send(int(outcome), {"error": {"message": f"scripted {outcome}"}})
                        return
                    if server.delay_s:
                        time.sleep(server.delay_s)
                    text = server.reply(body)
                    payload = {"id": f"chatcmpl-{n}", "object": "chat.completion", "model": body.get("model"),
                               "choices": [{"index": 0, "finish_reason": "stop",
                                            "message": {"role": "assistant", "content": text}}]}
                    if body.get("logprobs") and isinstance(text, str) and text:
                        alts = [{"token": L, "logprob": (-0.1 if L == text[0] else -3.0 - i)}
                                for i, L in enumerate("ABCDEF")]
                        payload["choices"][0]["logprobs"] = {"content": [{"token": text[0], "logprob": -0.1,
                                                                          "top_logprobs": alts[:5]}]}
                    self._send(200, payload)
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _send(self, code: int, payload: dict) -> None:
                data = json.dumps(payload).encode() if payload is not None else b"<html><body>Welcome</body></html>"
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    if code == 429:
                        self.send_header("Retry-After", "0")
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout)

        class Server(ThreadingHTTPServer):
            request_queue_size = 256  # the default listen backlog (5) drops bursts of concurrent connections
            daemon_threads = True

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> ScriptedChatServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
