"""A tiny local stand-in for the Hugging Face Hub, for tests (127.0.0.1, a free port, a thread).

It implements the subset of the Hub HTTP API that huggingface_hub uses to read a model repo:

- `GET /api/models/{org}/{name}` and `.../revision/{rev}`: repo info (`id`, `sha`, `siblings`)
- `HEAD|GET /{org}/{name}/resolve/{rev}/{file}`: the file, with `X-Repo-Commit`, `ETag`,
  `Content-Length`; `Range: bytes=a-b` answered with 206 and `Content-Range`
- errors as the Hub spells them: 401 `X-Error-Code: RepoNotFound`, 404 `RevisionNotFound` /
  `EntryNotFound`, 403 `GatedRepo` (gated repos need `Authorization: Bearer <token>`)

Repos are real directories: `root/{org}/{name}/{revision}/...`, one folder per branch; a branch's
commit sha is derived from its name. Every request is recorded (method, path, range, bytes of
body sent) so tests can prove that no tensor data crossed the wire.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
API_MODEL = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")
RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
DEFAULT_BRANCH = "main"


def commit_sha(repo: str, branch: str) -> str:
    """The fake (stable) 40-hex commit id of a branch."""
    return hashlib.sha1(f"{repo}@{branch}".encode()).hexdigest()


@dataclass
class Served:
    """One request as the server saw it."""

    method: str
    path: str
    range: str | None
    status: int
    body_bytes: int
    authorization: str | None


@dataclass
class FakeHub:
    """The server's state: where repos live, which are gated, and the request log."""

    root: Path
    gated: dict[str, str] = field(default_factory=dict)         # repo -> required token
    log: list[Served] = field(default_factory=list)
    ranges: bool = True                                          # False: ignore Range like a plain server
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def branch_dir(self, repo: str, rev: str) -> Path | None:
        """Directory of `rev` (a branch name or a commit sha) in `repo`, or None."""
        repo_dir = self.root / repo
        for branch in sorted(p.name for p in repo_dir.iterdir() if p.is_dir()):
            if rev in (branch, self.sha(repo, branch)):
                return repo_dir / branch
        return None

    def sha(self, repo: str, branch: str) -> str:
        """The commit id a branch points at (a writable fake hub moves it on every commit)."""
        return commit_sha(repo, branch)

    def resolve_bytes_served(self, file_suffix: str = ".safetensors") -> list[Served]:
        return [s for s in self.log if s.method == "GET" and "/resolve/" in s.path and s.path.endswith(file_suffix)]


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub          # set on the subclass made per server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        return

    def do_HEAD(self) -> None:
        self.answer(head=True)

    def do_GET(self) -> None:
        self.answer(head=False)

    def answer(self, *, head: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        api = API_MODEL.match(path)
        resolve = RESOLVE.match(path)
        if api:
            self.model_info(api["repo"], api["rev"] or DEFAULT_BRANCH, head)
        elif resolve:
            self.resolve(resolve["repo"], resolve["rev"], resolve["file"], head)
        else:
            self.error(404, "EntryNotFound", head)

    def repo_access(self, repo: str, head: bool) -> bool:
        if not (self.hub.root / repo).is_dir():
            self.error(401, "RepoNotFound", head)
            return False
        required = self.hub.gated.get(repo)
        if required is not None and self.headers.get("Authorization") != f"Bearer {required}":
            self.error(403, "GatedRepo", head)
            return False
        return True

    def model_info(self, repo: str, rev: str, head: bool) -> None:
        if not self.repo_access(repo, head):
            return
        branch = self.hub.branch_dir(repo, rev)
        if branch is None:
            self.error(404, "RevisionNotFound", head)
            return
        files = sorted(str(p.relative_to(branch)) for p in branch.rglob("*") if p.is_file())
        body = json.dumps({
            "id": repo, "modelId": repo, "private": False,
            "sha": self.hub.sha(repo, branch.name),
            "siblings": [{"rfilename": f} for f in files],
        }).encode()
        self.send(200, body, {"Content-Type": "application/json"}, head)

    def resolve(self, repo: str, rev: str, file: str, head: bool) -> None:
        if not self.repo_access(repo, head):
            return
        branch = self.hub.branch_dir(repo, rev)
        if branch is None:
            self.error(404, "RevisionNotFound", head)
            return
        target = (branch / file).resolve()
        if not target.is_relative_to(branch.resolve()) or not target.is_file():
            self.error(404, "EntryNotFound", head)
            return
        data = target.read_bytes()
        headers = {
            "X-Repo-Commit": self.hub.sha(repo, branch.name),
            "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        wanted = self.headers.get("Range")
        match = RANGE.match(wanted or "")
        if match and not head and self.hub.ranges:
            start = int(match[1])
            end = min(int(match[2]) if match[2] else len(data) - 1, len(data) - 1)
            if start >= len(data):
                headers["Content-Range"] = f"bytes */{len(data)}"
                self.send(416, b"", headers, head)
                return
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            self.send(206, data[start:end + 1], headers, head)
            return
        self.send(200, data, headers, head)

    def error(self, status: int, code: str, head: bool) -> None:
        body = json.dumps({"error": code}).encode()
        self.send(status, body, {"X-Error-Code": code, "X-Error-Message": code,
                                 "Content-Type": "application/json"}, head)

    def send(self, status: int, body: bytes, headers: dict[str, str], head: bool) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)
        with self.hub.lock:
            self.hub.log.append(Served(self.command, unquote(urlsplit(self.path).path), self.headers.get("Range"),
                                       status, 0 if head else len(body), self.headers.get("Authorization")))


class FakeHubServer:
    """Context manager: serve `root` on 127.0.0.1:<free port> in a daemon thread."""

    def __init__(self, root: Path, gated: dict[str, str] | None = None) -> None:
        self._serve(FakeHub(root=root, gated=dict(gated or {})), _Handler, "fake-hub")

    def _serve(self, hub: FakeHub, handler_base: type, thread_name: str) -> None:
        """Bind `hub` behind a handler class derived from `handler_base` (started by __enter__)."""
        self.hub = hub
        handler = type("Handler", (handler_base,), {"hub": hub})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        hub.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02},
                                       name=thread_name, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self.hub

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
