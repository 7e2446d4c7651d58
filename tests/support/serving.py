"""Real serving engines for tests: ``transformers serve`` on the CPU, and a key-checking proxy in
front of it (as a deployment puts one in front of vLLM or TGI) that can also cut a stream short.

``transformers serve`` is the OpenAI-compatible server transformers ships (FastAPI + uvicorn);
it has no API keys, so ``KeyedProxy`` adds them: requests without ``Authorization: Bearer <key>``
get OpenAI's 401 error body; with ``cut_after`` bytes set, a streamed answer is forwarded only
that far and the connection dropped, as a server that dies mid-answer does.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

KEY = "sk-test-key"  # what KeyedProxy wants in the ``served`` fixture


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TransformersServe:
    """``transformers serve FOLDER`` on 127.0.0.1, CPU, float32; ``base_url`` ends in /v1 and the
    model's name is its folder path."""

    def __init__(self, folder: Path, timeout_s: float = 120.0):
        self.folder, self.port = str(folder), free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        cli = Path(sys.executable).with_name("transformers")
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"transformers-serve-{self.port}.log", "w+")
        self.process = subprocess.Popen(
            [str(cli), "serve", self.folder, "--host", "127.0.0.1", "--port", str(self.port), "--device", "cpu",
             "--dtype", "float32", "--log-level", "warning"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"transformers serve exited: {self.output()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"transformers serve did not become healthy in {timeout_s:.0f} s: {self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-3000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        self.log.close()


class KeyedProxy:
    """An HTTP proxy to ``upstream`` (``host:port``) that wants ``key`` and may cut streams."""

    def __init__(self, upstream_port: int, key: str):
        self.upstream_port, self.key = upstream_port, key
        self.cut_after: int | None = None  # bytes of a streamed answer forwarded before the connection drops
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                self._forward("GET")

            def do_POST(self):
                self._forward("POST")

            def _forward(self, method: str) -> None:
                if self.headers.get("Authorization") != f"Bearer {proxy.key}":
                    body = json.dumps({"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error",
                                                 "code": "invalid_api_key"}}).encode()
                    self.send_response(401)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    self.rfile.read(int(self.headers.get("Content-Length") or 0))
                    return
                length = int(self.headers.get("Content-Length") or 0)
                payload = self.rfile.read(length) if length else None
                upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=120)
                upstream.request(method, self.path, body=payload,
                                 headers={"Content-Type": self.headers.get("Content-Type", "application/json")})
                answer = upstream.getresponse()
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(key, value)
                self.send_header("Transfer-Encoding", "chunked")  # as servers stream: a cut shows as one
                self.send_header("Connection", "close")
                self.end_headers()
                sent, limit = 0, proxy.cut_after
                while True:
                    chunk = answer.read1(4096)
                    if not chunk:
                        self.wfile.write(b"0\r\n\r\n")  # the end of a whole answer
                        break
                    if limit is not None and sent + len(chunk) >= limit:
                        part = chunk[: max(limit - sent, 1)]
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                        self.wfile.flush()
                        self.connection.shutdown(socket.SHUT_RDWR)  # the server died mid-answer
                        break
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
                    sent += len(chunk)
                upstream.close()
                self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def served():
    """(the demo base's folder, ``transformers serve`` serving it, a ``KeyedProxy`` wanting ``KEY``)."""
    import demo

    if not demo.is_ready():
        pytest.skip("needs the demo family: python -m merging zoo --list builds it")
    folder = demo.base_path()
    server = TransformersServe(folder)
    proxy = KeyedProxy(server.port, KEY)
    yield folder, server, proxy
    proxy.stop()
    server.stop()
