"""A scriptable OpenAI-compatible server on a free loopback port, for tests (stdlib only).

``FakeOpenAI(respond)`` starts ``http.server.ThreadingHTTPServer`` on 127.0.0.1 in a daemon thread.
``respond(call)`` decides each answer: a string (the assistant's text in a well-formed chat
completion) or a :class:`Reply` (any status, body, headers and delay). The server records every call
and the most requests it ever had in flight, so tests can check retries and concurrency limits.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


@dataclass
class Call:
    path: str
    body: dict
    headers: dict
    index: int  # 0-based arrival order

    @property
    def user_text(self) -> str:
        """All user/system message contents joined (chat), or the prompt (completions)."""
        if "messages" in self.body:
            return "\n".join(str(m.get("content", "")) for m in self.body["messages"])
        return str(self.body.get("prompt", ""))


@dataclass
class Reply:
    status: int = 200
    body: dict | str | None = None
    headers: dict = field(default_factory=dict)
    delay: float = 0.0


def completion(text: str, model: str = "fake") -> dict:
    return {"id": "fake-1", "object": "chat.completion", "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}


class FakeOpenAI:
    def __init__(self, respond: Callable[[Call], "str | Reply"], models: tuple[str, ...] = ("fake",)):
        self.respond = respond
        self.models = models
        self.calls: list[Call] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _send(self, status: int, body, headers: dict | None = None):
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, str(v))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout tests)

            def do_GET(self):
                if self.path.endswith("/models"):
                    self._send(200, {"object": "list", "data": [{"id": m, "object": "model"}
                                                                for m in server.models]})
                else:
                    self._send(404, {"detail": "Not Found"})

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except ValueError:
                    self._send(400, {"error": {"message": "invalid JSON"}})
                    return
                with server._lock:
                    call = Call(self.path, body, {k.lower(): v for k, v in self.headers.items()},
                                len(server.calls))
                    server.calls.append(call)
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    reply = server.respond(call)
                    if isinstance(reply, str):
                        reply = Reply(body=completion(reply, body.get("model", "fake")))
                    if reply.delay:
                        time.sleep(reply.delay)
                    self._send(reply.status, reply.body if reply.body is not None else {}, reply.headers)
                finally:
                    with server._lock:
                        server.in_flight -= 1

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                        daemon=True)

    def __enter__(self) -> "FakeOpenAI":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
