"""A small real HTTP server that speaks the OpenAI chat-completions protocol, for the endpoint judge's tests.

It answers by itself (`reply(prompt) -> text`) or forwards to a real server (`upstream`, e.g. `vllm serve`), and
in front of either it injects the faults a test queues: "429" and "500" (JSON errors that ask the client to
retry within 10 ms), "malformed" (a 200 reply that is not JSON), "no_choices" (JSON without a completion).
It counts what it was asked: `chats` holds the body of every chat request, `answered` the ones it answered.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class OpenAIServer:
    def __init__(self, *, reply=None, upstream: str | None = None, models: tuple[str, ...] = ("judge",)):
        self.reply, self.upstream, self.models = reply, upstream, models
        self.faults: deque[str] = deque()  # what the next chat requests get instead of an answer
        self.chats: list[dict] = []  # every chat request's body, faulted or not
        self.answered: list[dict] = []  # the bodies of the chat requests answered with a completion
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):  # /v1/models
                if server.upstream:
                    return self._send(*forward(server.upstream, "GET", self.path[len("/v1"):], None))
                self._send(200, json.dumps({"object": "list", "data": [
                    {"id": m, "object": "model", "created": 0, "owned_by": "test"} for m in server.models]}).encode())

            def do_POST(self):  # /v1/chat/completions
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.chats.append(body)
                    fault = server.faults.popleft() if server.faults else None
                if fault:
                    return self._send(*FAULTS[fault])
                if server.upstream:
                    status, data = forward(server.upstream, "POST", self.path[len("/v1"):], body)
                else:
                    status, data = 200, completion(body, server.reply(body["messages"][-1]["content"]))
                if status == 200:
                    with server.lock:
                        server.answered.append(body)
                self._send(status, data)

            def _send(self, status: int, data: bytes, kind: str = "application/json"):
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                if status in (429, 500):
                    self.send_header("retry-after-ms", "10")
                self.end_headers()
                self.wfile.write(data)

        return Handler


def _error(status: int, message: str) -> tuple[int, bytes]:
    return status, json.dumps({"error": {"message": message, "type": "test", "code": status}}).encode()


FAULTS = {"429": _error(429, "rate limited"), "500": _error(500, "server error"),
          "malformed": (200, b"<html>not json</html>", "text/html"),
          "no_choices": (200, json.dumps({"id": "x", "object": "chat.completion"}).encode())}


def completion(body: dict, text: str) -> bytes:
    usage = {"prompt_tokens": len(body["messages"][-1]["content"].split()), "completion_tokens": len(text.split())}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return json.dumps({"id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": text}}], "usage": usage}).encode()


def forward(upstream: str, method: str, path: str, body: dict | None) -> tuple[int, bytes]:
    request = urllib.request.Request(upstream + path, method=method, data=json.dumps(body).encode() if body else None,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=600) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
