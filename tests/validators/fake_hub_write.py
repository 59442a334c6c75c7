"""The write side of the local fake Hub: what `huggingface_hub` uploads with (127.0.0.1, a thread).

It extends `fake_hub` (the read side) with the calls `HfApi.create_repo`, `create_branch`,
`create_commit` (and so `upload_folder` without hf_xet), `list_repo_commits` and the LFS basic
transfer make, as huggingface_hub 1.x/2.x sends them:

- `POST /api/repos/create` `{name, organization, visibility}` -> `{url}`; 409 when it exists
- `POST /api/validate-yaml` `{content}` -> `{errors, warnings}` (the README front matter must parse)
- `POST /api/models/{repo}/branch/{branch}` -> a new branch from main; 409 when it exists
- `POST /api/models/{repo}/preupload/{rev}` -> per file `uploadMode` (lfs for `*.safetensors`,
  regular otherwise), `shouldIgnore`, and `oid` of the file already there (so unchanged files are skipped)
- `POST /{repo}.git/info/lfs/objects/batch` -> basic-transfer upload + verify actions (none when
  the object is already stored); `PUT /lfs/{oid}` stores the bytes (sha256 checked); `POST /lfs-verify`
- `POST /api/models/{repo}/commit/{rev}` (NDJSON: header, file, lfsFile) -> `{commitOid, commitUrl}`;
  files land in the branch directory, so the read side serves them afterwards
- `GET /api/models/{repo}/commits/{rev}` -> the branch's commits, newest first; `GET .../tree/{rev}`
  -> the files (what `snapshot_download` lists before downloading a source)

Every write needs `Authorization: Bearer <write_token>`; any other token gets the Hub's 401
`Invalid credentials in Authorization header`. The xet upload protocol is not faked: tests run
huggingface_hub with `HF_HUB_DISABLE_XET=1`, the documented switch to the LFS path.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

import yaml
from fake_hub import DEFAULT_BRANCH, FakeHub, FakeHubServer, _Handler

REPO = r"(?P<repo>[^/]+/[^/]+)"
CREATE = re.compile(r"^/api/repos/create$")
VALIDATE_YAML = re.compile(r"^/api/validate-yaml$")
BRANCH = re.compile(rf"^/api/models/{REPO}/branch/(?P<branch>[^/]+)$")
PREUPLOAD = re.compile(rf"^/api/models/{REPO}/preupload/(?P<rev>[^/]+)$")
COMMIT = re.compile(rf"^/api/models/{REPO}/commit/(?P<rev>[^/]+)$")
COMMITS = re.compile(rf"^/api/models/{REPO}/commits/(?P<rev>[^/]+)$")
TREE = re.compile(rf"^/api/models/{REPO}/tree/(?P<rev>[^/]+)$")
LFS_BATCH = re.compile(rf"^/{REPO}\.git/info/lfs/objects/batch$")
LFS_PUT = re.compile(r"^/lfs/(?P<oid>[0-9a-f]{64})$")
LFS_VERIFY = re.compile(r"^/lfs-verify$")
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"


def git_blob_oid(data: bytes) -> str:
    """Git's blob id (what the Hub reports as a regular file's oid)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class WritableFakeHub(FakeHub):
    """The read side's state plus tokens, commits per branch and stored LFS objects."""

    write_token: str = ""
    commits: dict[tuple[str, str], list[dict]] = field(default_factory=dict)   # newest first
    blobs: dict[str, bytes] = field(default_factory=dict)                      # sha256 -> bytes
    private: set[str] = field(default_factory=set)
    write_lock: threading.Lock = field(default_factory=threading.Lock)         # one write at a time

    def sha(self, repo: str, branch: str) -> str:
        history = self.commits.get((repo, branch))
        return history[0]["id"] if history else super().sha(repo, branch)

    def commit_ids(self, repo: str, branch: str = DEFAULT_BRANCH) -> list[str]:
        return [c["id"] for c in self.commits.get((repo, branch), [])]

    def add_commit(self, repo: str, branch: str, title: str, message: str) -> str:
        parent = self.sha(repo, branch)
        files = self.root / repo / branch
        digest = hashlib.sha1(f"{parent}\n{title}\n{message}".encode())
        for path in sorted(p for p in files.rglob("*") if p.is_file()):
            digest.update(str(path.relative_to(files)).encode() + hashlib.sha256(path.read_bytes()).digest())
        oid = digest.hexdigest()
        entry = {"id": oid, "title": title, "message": message, "authors": [{"user": "quantgate-tester"}],
                 "date": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())}
        self.commits.setdefault((repo, branch), []).insert(0, entry)
        return oid


class _WriteHandler(_Handler):
    hub: WritableFakeHub

    def do_POST(self) -> None:
        self.write()

    def do_PUT(self) -> None:
        self.write()

    def body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def json_reply(self, status: int, payload: object, code: str | None = None, message: str | None = None) -> None:
        headers = {"Content-Type": "application/json"}
        if code:
            headers["X-Error-Code"] = code
        if message:
            headers["X-Error-Message"] = message
        self.send(status, json.dumps(payload).encode(), headers, False)

    def authorized(self) -> bool:
        if self.headers.get("Authorization") == f"Bearer {self.hub.write_token}":
            return True
        self.json_reply(401, {"error": INVALID_CREDENTIALS}, message=INVALID_CREDENTIALS)
        return False

    def write(self) -> None:
        path = unquote(urlsplit(self.path).path)
        data = self.body()
        routes = ((CREATE, self.create_repo), (VALIDATE_YAML, self.validate_yaml), (BRANCH, self.create_branch),
                  (PREUPLOAD, self.preupload), (COMMIT, self.commit), (LFS_BATCH, self.lfs_batch),
                  (LFS_PUT, self.lfs_put), (LFS_VERIFY, self.lfs_verify))
        for pattern, route in routes:
            match = pattern.match(path)
            if match:
                if route not in (self.validate_yaml, self.lfs_put) and not self.authorized():  # PUT: a presigned URL
                    return
                with self.hub.write_lock:
                    route(data, **match.groupdict())
                return
        self.error(404, "EntryNotFound", False)

    def answer(self, *, head: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        match = COMMITS.match(path)
        if match and not head:
            self.list_commits(match["repo"], match["rev"])
            return
        match = TREE.match(path)
        if match and not head:
            self.list_tree(match["repo"], match["rev"])
            return
        super().answer(head=head)

    def list_tree(self, repo: str, rev: str) -> None:
        """`list_repo_tree(recursive=True)` (what snapshot_download lists a source with)."""
        if not self.repo_access(repo, False):
            return
        branch = self.hub.branch_dir(repo, rev)
        if branch is None:
            self.error(404, "RevisionNotFound", False)
            return
        entries = []
        for file in sorted(p for p in branch.rglob("*") if p.is_file()):
            data = file.read_bytes()
            entry = {"type": "file", "path": file.relative_to(branch).as_posix(), "size": len(data),
                     "oid": git_blob_oid(data)}
            if file.suffix == ".safetensors":
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        self.json_reply(200, entries)

    def list_commits(self, repo: str, rev: str) -> None:
        if not self.repo_access(repo, False):
            return
        branch = self.hub.branch_dir(repo, rev)
        if branch is None:
            self.error(404, "RevisionNotFound", False)
            return
        self.json_reply(200, self.hub.commits.get((repo, branch.name), []))

    def repo_access(self, repo: str, head: bool) -> bool:
        if repo in self.hub.private and self.headers.get("Authorization") != f"Bearer {self.hub.write_token}":
            self.error(401, "RepoNotFound", head)
            return False
        return super().repo_access(repo, head)

    def create_repo(self, data: bytes) -> None:
        body = json.loads(data)
        namespace = body.get("organization") or "quantgate-tester"
        repo = f"{namespace}/{body['name']}"
        if (self.hub.root / repo).is_dir():
            self.json_reply(409, {"error": "You already created this model repo", "url": f"{self.hub.url}/{repo}"})
            return
        (self.hub.root / repo / DEFAULT_BRANCH).mkdir(parents=True)
        if body.get("visibility") == "private":
            self.hub.private.add(repo)
        self.hub.add_commit(repo, DEFAULT_BRANCH, "initial commit", "")
        self.json_reply(200, {"url": f"{self.hub.url}/{repo}", "name": repo})

    def validate_yaml(self, data: bytes) -> None:
        content = json.loads(data)["content"]
        match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        try:
            meta = yaml.safe_load(match[1]) if match else None
        except yaml.YAMLError as exc:
            self.json_reply(400, {"error": f"invalid YAML in README.md: {exc}"})
            return
        warnings = [] if isinstance(meta, dict) else [{"message": "empty or missing YAML metadata"}]
        self.json_reply(200, {"errors": [], "warnings": warnings})

    def create_branch(self, data: bytes, repo: str, branch: str) -> None:
        target = self.hub.root / repo / branch
        if target.exists():
            self.json_reply(409, {"error": f"Reference already exists: refs/heads/{branch}"})
            return
        shutil.copytree(self.hub.root / repo / DEFAULT_BRANCH, target)
        self.hub.commits[(repo, branch)] = list(self.hub.commits.get((repo, DEFAULT_BRANCH), []))
        self.json_reply(200, {})

    def preupload(self, data: bytes, repo: str, rev: str) -> None:
        branch = self.hub.branch_dir(repo, rev)
        if branch is None:
            self.error(404, "RevisionNotFound", False)
            return
        files = []
        for item in json.loads(data)["files"]:
            lfs = item["path"].endswith(".safetensors") or item["size"] > 10 * 1024 * 1024
            existing = branch / item["path"]
            oid = None
            if existing.is_file():
                content = existing.read_bytes()
                oid = hashlib.sha256(content).hexdigest() if lfs else git_blob_oid(content)
            files.append({"path": item["path"], "uploadMode": "lfs" if lfs else "regular",
                          "shouldIgnore": False, "oid": oid})
        self.json_reply(200, {"files": files, "commitOid": self.hub.sha(repo, branch.name)})

    def lfs_batch(self, data: bytes, repo: str) -> None:
        objects = []
        for obj in json.loads(data)["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.hub.blobs:
                entry["actions"] = {"upload": {"href": f"{self.hub.url}/lfs/{obj['oid']}"},
                                    "verify": {"href": f"{self.hub.url}/lfs-verify"}}
            objects.append(entry)
        self.json_reply(200, {"transfer": "basic", "objects": objects})

    def lfs_put(self, data: bytes, oid: str) -> None:
        if hashlib.sha256(data).hexdigest() != oid:
            self.json_reply(400, {"error": "sha256 of the uploaded bytes does not match the oid"})
            return
        self.hub.blobs[oid] = data
        self.json_reply(200, {})

    def lfs_verify(self, data: bytes) -> None:
        body = json.loads(data)
        blob = self.hub.blobs.get(body["oid"])
        ok = blob is not None and len(blob) == body["size"]
        self.json_reply(200 if ok else 404, {} if ok else {"error": "object not found"})

    def commit(self, data: bytes, repo: str, rev: str) -> None:
        branch = self.hub.branch_dir(repo, rev)
        if branch is None:
            self.error(404, "RevisionNotFound", False)
            return
        header: dict = {}
        writes: list[tuple[str, bytes]] = []
        for line in data.splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "header":
                header = value
            elif item["key"] == "file":
                writes.append((value["path"], base64.b64decode(value["content"])))
            elif item["key"] == "lfsFile":
                blob = self.hub.blobs.get(value["oid"])
                if blob is None:
                    self.json_reply(400, {"error": f"LFS object {value['oid']} was never uploaded"})
                    return
                writes.append((value["path"], blob))
        for rel, content in writes:
            target = branch / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
        oid = self.hub.add_commit(repo, branch.name, header.get("summary", ""), header.get("description", ""))
        self.json_reply(200, {"success": True, "commitOid": oid, "commitUrl": f"{self.hub.url}/{repo}/commit/{oid}"})


class WritableFakeHubServer(FakeHubServer):
    """Context manager: a read + write fake Hub on 127.0.0.1:<free port> that accepts `write_token`."""

    def __init__(self, root: Path, write_token: str) -> None:
        self._serve(WritableFakeHub(root=root, write_token=write_token), _WriteHandler, "fake-hub-write")
