"""A real HTTP server on loopback that speaks the OpenAI chat-completions and embeddings protocol,
with scripted replies: 429 with Retry-After, 500s, malformed bodies, slow answers. It records
every request (path, headers, JSON body, arrival time) for the tests to inspect, and the most
requests it was answering at once."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
EMBEDDING_DIMENSIONS = 16


@dataclass
class Reply:
    status: int = 200
    body: Any = None  # dict -> JSON; str/bytes -> sent as is; None -> the default answer
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds before answering (a timeout for a client with a shorter one)


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    at: float

    @property
    def model(self) -> str:
        return str(self.body.get("model"))

    @property
    def json_mode(self) -> bool:
        return self.body.get("response_format") == {"type": "json_object"}

    def text(self) -> str:
        return "\n".join(str(m.get("content", "")) for m in self.body.get("messages", []))


class FakeLLM:
    """Replies are scripted per model (`push`); with nothing scripted it answers sensibly:
    a valid analysis for a JSON-mode request, an answer citing passage [1] otherwise, and
    deterministic bag-of-words vectors for embeddings."""

    def __init__(self, answer: str = "Leases expire and the run is rescued [1].") -> None:
        self.answer = answer
        self.requests: list[Recorded] = []
        self.delay = 0.0  # seconds before every answer not scripted otherwise
        self.in_flight = 0
        self.most_in_flight = 0
        self._script: dict[str, deque[Reply]] = {}
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = {}
                recorded = Recorded(
                    self.path, {k.lower(): v for k, v in self.headers.items()}, body, time.time()
                )
                with fake._lock:
                    fake.requests.append(recorded)
                    queue = fake._script.get(recorded.model)
                    reply = queue.popleft() if queue else Reply(delay=fake.delay)
                    fake.in_flight += 1
                    fake.most_in_flight = max(fake.most_in_flight, fake.in_flight)
                try:
                    self._answer(recorded, reply)
                finally:
                    with fake._lock:
                        fake.in_flight -= 1

            def _answer(self, recorded: Recorded, reply: Reply) -> None:
                if reply.delay:
                    time.sleep(reply.delay)
                payload = reply.body if reply.body is not None else fake.default(recorded)
                data = (
                    json.dumps(payload).encode()
                    if isinstance(payload, dict | list)
                    else payload.encode()
                    if isinstance(payload, str)
                    else payload
                )
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting (a timeout test)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def push(self, model: str, *replies: Reply) -> None:
        with self._lock:
            self._script.setdefault(model, deque()).extend(replies)

    def for_model(self, model: str) -> list[Recorded]:
        return [r for r in self.requests if r.model == model]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def default(self, request: Recorded) -> dict[str, Any]:
        if request.path.endswith("/embeddings"):
            inputs = request.body.get("input") or []
            return {
                "object": "list",
                "data": [
                    {"object": "embedding", "index": i, "embedding": embed(str(text))}
                    for i, text in enumerate(inputs)
                ],
                "model": request.model,
                "usage": {"prompt_tokens": 5 * len(inputs), "total_tokens": 5 * len(inputs)},
            }
        if request.json_mode:
            question = request.body["messages"][-1]["content"].rsplit("Question:", 1)[-1]
            words = [w.lower() for w in re.findall(r"[A-Za-z]{3,}", question)]
            content = json.dumps(
                {"intent": "explanation", "keywords": words[:8], "queries": [" ".join(words)]}
            )
        else:
            content = self.answer
        return chat_reply(content, request.model)


def chat_reply(content: str, model: str, usage: dict[str, int] | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": usage or USAGE,
    }


def embed(text: str) -> list[float]:
    """A deterministic bag-of-words vector: texts sharing words point the same way."""
    vector = [0.0] * EMBEDDING_DIMENSIONS
    for word in re.findall(r"[a-z]{3,}", text.lower()):
        digest = hashlib.sha1(word.encode()).digest()
        vector[digest[0] % EMBEDDING_DIMENSIONS] += 1.0
    if not any(vector):
        vector[0] = 1.0
    return vector
