"""Real places experts live, for the adapter-source tests and benchmark: an S3-compatible server in its own
process (moto's server mode, reached over HTTP by boto3), a Hugging Face cache written by huggingface_hub
itself, a server that accepts connections and never answers, and a port nothing listens on.

MinIO's server is not in the package registries this project may use (PyPI has only its client SDK, Debian
only Go libraries), so the S3-compatible server is moto's: a standalone HTTP server implementing the S3 API
(pip `moto[server]`), which boto3 talks to as it would to MinIO or AWS.
"""
from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

from tests.support.harness import free_port, stop_process

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "expert.json", "adapter_model.bin")
DEMO = Path(__file__).resolve().parents[2] / "training" / "demo"
# any key pair: moto checks the signature's form, not who signed; the tests check these never reach a log
S3_KEY, S3_SECRET, S3_REGION = "loraplex-test-key", "loraplex-test-secret-do-not-log", "us-east-1"


class S3Server:
    """`python -m moto.server` on a free loopback port."""

    def __init__(self, log_path: Path, nice: int = 0):
        """`nice`: the server's scheduling priority, raised by a benchmark so that a bucket that would be on
        another machine in production takes only the CPU the server under test leaves."""
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     preexec_fn=(lambda: os.nice(nice)) if nice else None)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                httpx.get(self.endpoint + "/moto-api/", timeout=2)
                break
            except httpx.HTTPError:
                if self.proc.poll() is not None:
                    raise RuntimeError("moto's S3 server exited") from None
                time.sleep(0.1)
        else:
            self.stop()
            raise RuntimeError("moto's S3 server did not start")
        self.client = self.make_client()

    def make_client(self):
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client("s3", endpoint_url=self.endpoint, region_name=S3_REGION,
                                              aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET,
                                              config=Config(s3={"addressing_style": "path"}))

    def env(self, prefix: str = "TEST_S3") -> dict[str, str]:
        """The environment variables a server's S3 source names (endpoint_env ... secret_key_env)."""
        return {f"{prefix}_ENDPOINT": self.endpoint, f"{prefix}_REGION": S3_REGION, f"{prefix}_KEY": S3_KEY,
                f"{prefix}_SECRET": S3_SECRET}

    @staticmethod
    def source(name: str, bucket: str, patterns: list[str], prefix: str = "", env: str = "TEST_S3") -> dict:
        """An `adapter_sources` entry reading `bucket` through the variables env() sets."""
        return {"name": name, "kind": "s3", "bucket": bucket, "prefix": prefix, "patterns": patterns,
                "endpoint_env": f"{env}_ENDPOINT", "region_env": f"{env}_REGION", "access_key_env": f"{env}_KEY",
                "secret_key_env": f"{env}_SECRET"}

    def bucket(self, name: str) -> None:
        self.client.create_bucket(Bucket=name)

    def put_adapter(self, bucket: str, key: str, folder: Path | None = None, files: dict | None = None) -> int:
        """Upload an adapter folder's files (and/or `files`: name -> bytes) under `key`/; the bytes put."""
        contents = {f: (folder / f).read_bytes() for f in ADAPTER_FILES if folder and (folder / f).exists()}
        contents.update(files or {})
        for file, data in contents.items():
            self.client.put_object(Bucket=bucket, Key=f"{key}/{file}", Body=data)
        return sum(len(data) for data in contents.values())

    def stop(self) -> None:
        stop_process(self.proc, grace=10)
        self._log.close()


def lay_out_hub_cache(cache_dir: Path, repos: dict[str, Path]) -> None:
    """Write `repos` (repo id -> adapter folder) into a Hugging Face cache as huggingface_hub lays it out:
    hf_hub_download itself downloads each file, from a stand-in for the Hub's file endpoints served on
    loopback for the duration (nothing is asked of the real Hub). The server then reads the cache with
    HF_HUB_OFFLINE=1."""
    from huggingface_hub import hf_hub_download

    files = {f"{repo}/{f.name}": f.read_bytes() for repo, folder in repos.items() for f in folder.iterdir()
             if f.name in ADAPTER_FILES}
    hub = _LoopbackHub(files)
    try:
        for path in files:
            repo, file = path.rsplit("/", 1)
            hf_hub_download(repo, file, cache_dir=str(cache_dir), endpoint=hub.url)
    finally:
        hub.close()


class _LoopbackHub:
    """HEAD and GET `/<org>/<repo>/resolve/<revision>/<file>` as the Hub answers them (commit, etag, size)."""

    def __init__(self, files: dict[str, bytes]):
        class Handler(BaseHTTPRequestHandler):
            def _file(self):
                parts = self.path.split("?")[0].lstrip("/").split("/")
                if len(parts) < 5 or parts[2] != "resolve":
                    return None
                return files.get("/".join(parts[:2] + parts[4:]))

            def _headers(self, body):
                if body is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                else:
                    self.send_response(200)
                    self.send_header("X-Repo-Commit", "0" * 40)
                    self.send_header("ETag", '"%s"' % hashlib.sha256(body).hexdigest())
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()

            def do_HEAD(self):
                self._headers(self._file())

            def do_GET(self):
                body = self._file()
                self._headers(body)
                if body is not None:
                    self.wfile.write(body)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class SilentServer:
    """Accepts connections on loopback and never answers: a source that hangs."""

    def __init__(self):
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.endpoint = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._held: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self._held.append(conn)

    def close(self) -> None:
        self._closed = True
        self._sock.close()
        for conn in self._held:
            conn.close()


def closed_port_endpoint() -> str:
    """An endpoint on loopback where nothing listens: a source that is down."""
    return f"http://127.0.0.1:{free_port()}"
