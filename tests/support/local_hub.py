"""A Hugging Face Hub on this machine, serving the models of a local cache.

The real Hub is out of reach here, so the path every new user takes (a model not yet in
the cache, downloaded at start-up) is tested against this one: ``HF_ENDPOINT`` pointed at
it, huggingface_hub downloads the stand-ins over HTTP as it would the real weights. It
answers what huggingface_hub 2.x asks while loading a model: a repository's metadata and
file tree, and each file's HEAD (its commit and ETag) and GET, at ``main`` or at any
branch, tag or commit the cache holds; anything else is a 404.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import re
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

_MODEL = r"(?P<repo>[^/]+/[^/]+)"
_REVISION = r"(?P<revision>[^/]+)"
_INFO = re.compile(rf"^/api/models/{_MODEL}(?:/revision/{_REVISION})?/?$")
_TREE = re.compile(rf"^/api/models/{_MODEL}/tree/{_REVISION}(?:/(?P<path>.*))?$")
_FILE = re.compile(rf"^/{_MODEL}/resolve/{_REVISION}/(?P<path>.+)$")


def _repositories(hf_home: Path) -> dict[str, Path]:
    """Each model in ``hf_home``'s cache, by repository id: its folder there."""
    return {
        folder.name.removeprefix("models--").replace("--", "/"): folder
        for folder in (hf_home / "hub").glob("models--*")
    }


def _snapshot(repository: Path, revision: str | None) -> Path | None:
    """``repository``'s snapshot at ``revision`` (a commit, or a branch or tag in its
    ``refs``; default ``main``), None if the cache has none."""
    revision = revision or "main"
    ref = repository / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = repository / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    models: ClassVar[dict[str, Path]]  # set on each server's own subclass
    requests: ClassVar[list[str]]

    def log_message(self, format: str, *args: object) -> None:
        self.requests.append(f"{self.command} {self.path}")

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _answer(self, body: bool) -> None:
        url = urllib.parse.urlsplit(self.path)
        path = urllib.parse.unquote(url.path)
        query = urllib.parse.parse_qs(url.query)
        match = _INFO.match(path) or _TREE.match(path) or _FILE.match(path)
        if match is None or match["repo"] not in self.models:
            return self._send(404, b"{}", body, json_body=True, error="RepoNotFound")
        snapshot = _snapshot(self.models[match["repo"]], match["revision"])
        if snapshot is None:
            return self._send(404, b"{}", body, json_body=True, error="RevisionNotFound")
        if match.re is _INFO:
            files = [{"rfilename": p.relative_to(snapshot).as_posix()} for p in _files(snapshot)]
            info = {"id": match["repo"], "sha": snapshot.name, "siblings": files, "tags": []}
            return self._send(200, json.dumps(info).encode(), body, json_body=True)
        if match.re is _TREE:
            folder = snapshot / (match["path"] or "")
            if not folder.is_dir():
                return self._send(404, b"{}", body, json_body=True, error="EntryNotFound")
            entries = [
                {
                    "type": "directory" if entry.is_dir() else "file",
                    "path": entry.relative_to(snapshot).as_posix(),
                    "oid": "0" * 40,
                    "size": entry.stat().st_size if entry.is_file() else 0,
                }
                for entry in sorted(
                    folder.rglob("*")
                    if query.get("recursive", [""])[0].lower() == "true"
                    else folder.iterdir()
                )
            ]
            return self._send(200, json.dumps(entries).encode(), body, json_body=True)
        file = (snapshot / match["path"]).resolve()
        if not file.is_file() or snapshot.resolve() not in file.parents:
            return self._send(404, b"", body, error="EntryNotFound", commit=snapshot.name)
        data = file.read_bytes()
        etag = f'"{hashlib.sha256(data).hexdigest()}"'
        return self._send(200, data, body, commit=snapshot.name, etag=etag)

    def _send(
        self,
        status: int,
        data: bytes,
        body: bool,
        json_body: bool = False,
        error: str | None = None,
        commit: str | None = None,
        etag: str | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if json_body else "text/plain")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (("X-Error-Code", error), ("X-Repo-Commit", commit), ("ETag", etag)):
            if value is not None:
                self.send_header(name, value)
        self.end_headers()
        if body:
            self.wfile.write(data)


def _files(snapshot: Path) -> list[Path]:
    return sorted(p for p in snapshot.rglob("*") if p.is_file())


@contextlib.contextmanager
def local_hub(hf_home: Path) -> Iterator[tuple[str, list[str]]]:
    """A Hub serving ``hf_home``'s models: its URL (for ``HF_ENDPOINT``) and the list of
    the requests it answers, as they come."""
    handler = type("Handler", (_Handler,), {"models": _repositories(hf_home), "requests": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="local-hub", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.requests
    finally:
        server.shutdown()
        server.server_close()


class _Broken(http.server.BaseHTTPRequestHandler):
    """Answers 502 everywhere (a mirror down behind its load balancer), or (``stall``)
    answers at its root and never elsewhere (a Hub that takes connections and stalls)."""

    protocol_version = "HTTP/1.1"
    stall: ClassVar[threading.Event | None] = None

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.stall is not None and self.path != "/":
            self.stall.wait()
            return
        self.send_response(200 if self.stall is not None else 502)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET


@contextlib.contextmanager
def broken_hub(stall: bool = False) -> Iterator[str]:
    """A Hub that answers 502 to everything, or (``stall``) nothing but its root: its URL."""
    released = threading.Event()
    handler = type("Handler", (_Broken,), {"stall": released if stall else None})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="broken-hub", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        released.set()
        server.shutdown()
        server.server_close()
