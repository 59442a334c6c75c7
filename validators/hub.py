"""Hugging Face Hub checkpoints, read without downloading weights.

`org/name[@rev]` or `hf://org/name[@rev]` -> one `model_info` call (which pins the revision to a
commit and lists the repo's files), `hf_hub_download` of the small JSON files (config.json,
hf_quant_config.json, model.safetensors.index.json; absent ones are fine), and for every shard
two HTTP range requests: bytes 0-7 (the header length, and the file size from Content-Range),
then exactly the header. The header bytes go through the same strict parser as local files, so
Hub and local checkpoints get identical checks, and not one byte of tensor data is transferred.

Settings are read from the environment at call time (HF_ENDPOINT, HF_TOKEN, HF_HOME /
HF_HUB_CACHE, HF_HUB_OFFLINE), not at import time, so a long-running service follows them.
Tokens are passed through to huggingface_hub and never appear in messages.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from quantgate.validators.checkpoint import (
    CONFIG_FILE,
    HUB_SCHEME,
    INDEX_FILE,
    MAX_CONFIG_BYTES,
    MAX_INDEX_BYTES,
    QUANT_CONFIG_FILE,
    SAFETENSORS_SUFFIX,
    CheckpointView,
    parse_json_object,
)
from quantgate.validators.errors import CheckpointReadError, HeaderError, UsageError
from quantgate.validators.integrity import (
    Problem,
    check_index,
    check_shard_name,
    merge_shards,
    problem,
    shard_reference_counts,
)
from quantgate.validators.safetensors_header import (
    LENGTH_PREFIX_BYTES,
    SafetensorsHeader,
    gc_paused,
    header_length,
    parse_header_bytes,
)

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
REQUEST_TIMEOUT_S = 10.0            # huggingface_hub's own download timeout
HEADER_FETCH_THREADS = 8            # shard headers fetched in parallel
_TRUE = {"1", "on", "yes", "true"}
# org/name as the Hub spells repo ids, optionally @revision (branch, tag or commit).
REPO_REF = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95})(?:@(?P<rev>[^\s@]+))?")
CONTENT_RANGE_TOTAL = re.compile(r"bytes (?:\d+-\d+|\*)/(\d+)")
RANGE_NOT_SATISFIABLE = 416


def parse_hub_target(target: str, revision: str | None = None) -> tuple[str, str | None] | None:
    """(repo_id, revision) when `target` names a Hub repo, None when it is a local path.

    An existing local path always wins; `./x`, `../x`, `/x`, `~/x` and Windows paths are local.
    `hf://` forces the Hub. A revision both in the target (`@rev`) and in `revision` must agree.
    """
    if target.startswith(HUB_SCHEME):
        match = REPO_REF.fullmatch(target[len(HUB_SCHEME):])
        if match is None or ".." in match["repo"] or "--" in match["repo"]:
            raise CheckpointReadError(f"{target}: not a Hub reference; expected hf://org/name or "
                                      "hf://org/name@revision")
    else:
        if _looks_local(target) or Path(target).expanduser().exists():
            return None
        match = REPO_REF.fullmatch(target)
        if match is None or ".." in match["repo"] or "--" in match["repo"]:
            return None
    in_target = match["rev"]
    if in_target and revision and in_target != revision:
        raise UsageError(f"{target}: revision {in_target!r} in the target conflicts with --revision {revision!r}")
    return match["repo"], in_target or revision


def _looks_local(target: str) -> bool:
    return (target in (".", "..") or target.startswith(("./", "../", "/", "~", ".\\", "..\\"))
            or "\\" in target or re.match(r"[A-Za-z]:", target) is not None)


def open_hub_checkpoint(target: str, repo_id: str, revision: str | None, *,
                        token: str | None = None) -> CheckpointView:
    """Read a Hub repo's shard headers and JSON files (see module docstring)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        raise CheckpointReadError(f"{target}: HF_HUB_OFFLINE is set, which forbids Hub access; unset it, "
                                  "or validate a local copy of the checkpoint (a directory path)")
    from huggingface_hub import HfApi

    token = token or os.environ.get("HF_TOKEN") or None
    endpoint = (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    api = HfApi(endpoint=endpoint, token=token)
    with _hub_errors(target, repo_id, revision, endpoint):
        info = api.model_info(repo_id, revision=revision, timeout=REQUEST_TIMEOUT_S)
        commit = info.sha or revision or "main"
        siblings = [s.rfilename for s in (info.siblings or [])]
        reader = _HubReader(repo_id, commit, token, endpoint)
        with gc_paused():
            return reader.read(target, siblings)


class _HubReader:
    """Everything fetched for one repo at one commit."""

    def __init__(self, repo_id: str, commit: str, token: str | None, endpoint: str) -> None:
        self.repo_id, self.commit, self.token, self.endpoint = repo_id, commit, token, endpoint
        self.problems: list[Problem] = []

    def read(self, target: str, siblings: list[str]) -> CheckpointView:
        present = set(siblings)
        top_level = sorted(n for n in siblings if n.endswith(SAFETENSORS_SUFFIX) and "/" not in n)
        index = self.json_file(INDEX_FILE, MAX_INDEX_BYTES) if INDEX_FILE in present else None
        weight_map = index.get("weight_map") if index is not None else None
        if index is not None and not isinstance(weight_map, dict):
            self.problems.append(problem("QG606", f"{INDEX_FILE} has no weight_map object; reading the repo's "
                                         "*.safetensors files instead", (INDEX_FILE,),
                                         "regenerate the index with save_pretrained"))
            weight_map = None
        if weight_map is None and not top_level:
            raise CheckpointReadError(f"{target}: the repo has no .safetensors weights at revision "
                                      f"{self.commit[:12]} (pickle .bin checkpoints are never loaded)")
        shards = top_level if weight_map is None else self.index_shards(weight_map, present, top_level)
        headers = self.headers(shards)
        tensors = merge_shards(headers, self.problems)
        if weight_map is not None:
            self.problems += check_index(weight_map, headers)
        config = self.json_file(CONFIG_FILE, MAX_CONFIG_BYTES) if CONFIG_FILE in present else None
        quant = self.json_file(QUANT_CONFIG_FILE, MAX_CONFIG_BYTES) if QUANT_CONFIG_FILE in present else None
        return CheckpointView(target=target, kind="hub", tensors=tensors, config=config, hf_quant_config=quant,
                              index=index if weight_map is not None else None, files=list(headers),
                              problems=self.problems, headers=headers, root=None, revision=self.commit,
                              repo_files=siblings)

    def index_shards(self, weight_map: dict, present: set[str], top_level: list[str]) -> list[str]:
        counts = shard_reference_counts(weight_map)
        shards = []
        for name, tensors in counts.items():
            refusal = check_shard_name(name)
            if refusal:
                self.problems.append(problem("QG605", f"{INDEX_FILE} maps {tensors} tensor(s) to {name!r}: "
                                             f"{refusal}; refused, never fetched", (name,),
                                             "fix the weight_map: shard names are plain file names"))
            elif name not in present:
                self.problems.append(problem("QG601", f"{INDEX_FILE} maps {tensors} tensor(s) to shard {name!r}, "
                                             "which the repo does not contain", (name,),
                                             "upload the missing shard, or regenerate the index"))
            else:
                shards.append(name)
        for name in sorted(set(top_level) - set(counts)):
            self.problems.append(problem("QG604", f"shard {name!r} is in the repo but {INDEX_FILE} does not "
                                         "reference it; engines following the index never load it", (name,),
                                         "delete the stray shard, or regenerate the index"))
        return sorted(shards)

    def headers(self, shards: list[str]) -> dict[str, SafetensorsHeader]:
        with ThreadPoolExecutor(max_workers=HEADER_FETCH_THREADS) as pool:
            results = list(pool.map(self.header_or_problem, shards))
        headers = {}
        for name, result in zip(shards, results):
            if isinstance(result, Problem):
                self.problems.append(result)
            else:
                headers[name] = result
        return headers

    def header_or_problem(self, name: str) -> SafetensorsHeader | Problem:
        from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

        try:
            return self.fetch_header(name)
        except HeaderError as exc:
            return problem("QG602", f"shard {name!r} is unreadable: {exc.problem}", (name,),
                           "re-upload this shard; its tensors are missing from the checkpoint as it stands")
        except EntryNotFoundError:
            return problem("QG601", f"shard {name!r} is listed but cannot be fetched (not found)", (name,),
                           "upload the missing shard, or regenerate the index")
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else "?"
            return problem("QG602", f"shard {name!r}: the Hub answered HTTP {status} for its header", (name,),
                           "retry later; if it persists, check the file on the Hub")

    def fetch_header(self, name: str) -> SafetensorsHeader:
        prefix, file_size = self.fetch_range(name, 0, LENGTH_PREFIX_BYTES)
        length = header_length(prefix, name, file_size)
        raw, _ = self.fetch_range(name, LENGTH_PREFIX_BYTES, length)
        if len(raw) != length:
            raise HeaderError(name, f"truncated: header says {length} header bytes, got {len(raw)}")
        data_size = None if file_size is None else file_size - LENGTH_PREFIX_BYTES - length
        return parse_header_bytes(raw, file_name=name, data_size=data_size)

    def fetch_range(self, name: str, start: int, size: int) -> tuple[bytes, int | None]:
        """`size` bytes at `start` of a repo file, and the file's total size when the server says.

        Streams, and stops after `size` bytes even if the server ignores the Range header."""
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        url = hf_hub_url(self.repo_id, name, revision=self.commit, endpoint=self.endpoint)
        headers = build_hf_headers(token=self.token)
        headers["Range"] = f"bytes={start}-{start + size - 1}"
        headers["Accept-Encoding"] = "identity"
        with get_session().stream("GET", url, headers=headers, timeout=REQUEST_TIMEOUT_S) as response:
            if response.status_code == RANGE_NOT_SATISFIABLE:      # the file is shorter than `start`
                return b"", _total_size(response.headers, ranged=True)
            if response.status_code >= 400:
                response.read()
                hf_raise_for_status(response)
            ranged = response.status_code == 206
            chunks, got = [], 0
            skip = 0 if ranged else start           # a plain 200 starts at byte 0
            for chunk in response.iter_bytes():
                chunks.append(chunk)
                got += len(chunk)
                if got >= skip + size:
                    break
            body = b"".join(chunks)[skip:skip + size]
            return body, _total_size(response.headers, ranged)

    def json_file(self, name: str, max_bytes: int) -> dict | None:
        """Download one small JSON file (size-checked first), or None with a QG606 problem."""
        from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

        url = hf_hub_url(self.repo_id, name, revision=self.commit, endpoint=self.endpoint)
        size = get_hf_file_metadata(url, token=self.token, timeout=REQUEST_TIMEOUT_S).size
        if size is not None and size > max_bytes:
            self.problems.append(problem("QG606", f"{name} is {size} bytes, over the {max_bytes}-byte limit; "
                                         "ignored", (name,), f"fix or regenerate {name}"))
            return None
        path = hf_hub_download(self.repo_id, name, revision=self.commit, endpoint=self.endpoint,
                               token=self.token, cache_dir=hub_cache_dir())
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
        return parse_json_object(raw, name, max_bytes, self.problems)


def _total_size(headers: Mapping[str, str], ranged: bool) -> int | None:
    """A file's full size: from `Content-Range: bytes a-b/N` (or `*/N`) of a 206 / 416 answer,
    else from the Content-Length of a plain 200."""
    if ranged:
        match = CONTENT_RANGE_TOTAL.fullmatch(headers.get("Content-Range", "").strip())
        return int(match[1]) if match else None
    length = headers.get("Content-Length", "")
    return int(length) if length.isdigit() else None


def hub_cache_dir() -> str:
    """The hub cache as the environment says now (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return os.path.join(home, "hub")


@contextmanager
def _hub_errors(target: str, repo_id: str, revision: str | None, endpoint: str) -> Iterator[None]:
    """Turn huggingface_hub / transport exceptions into one actionable CheckpointReadError."""
    try:
        yield
    except CheckpointReadError:
        raise
    except Exception as exc:
        message = _hub_error_message(exc, target, repo_id, revision, endpoint)
        if message is None:
            raise
        raise CheckpointReadError(f"{target}: {message}") from None


def _hub_error_message(exc: Exception, target: str, repo_id: str, revision: str | None,
                       endpoint: str) -> str | None:
    """The one-line reason for a Hub failure (never the token), or None for an unexpected error."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    local_hint = "" if target.startswith(HUB_SCHEME) else " (and no local path of that name exists)"
    if isinstance(exc, OfflineModeIsEnabled):
        return "offline mode (HF_HUB_OFFLINE) forbids Hub access; validate a local copy instead"
    if isinstance(exc, GatedRepoError):
        return (f"repo {repo_id} is gated: accept its terms on {endpoint}/{repo_id} and provide a token "
                "with access (HF_TOKEN)")
    if isinstance(exc, RepositoryNotFoundError):
        return f"repo {repo_id} not found on {endpoint}{local_hint}; check the name, or set HF_TOKEN if it is private"
    if isinstance(exc, RevisionNotFoundError):
        return f"revision {revision!r} not found in repo {repo_id}; check the branch, tag or commit"
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "?"
        return f"the Hub at {endpoint} answered HTTP {status}; retry later or check HF_ENDPOINT"
    if isinstance(exc, _transport_errors()):
        return (f"cannot reach the Hub at {endpoint} ({type(exc).__name__}){local_hint}; check the network "
                "or HF_ENDPOINT, or validate a local copy")
    return None


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level error classes of whichever HTTP client this huggingface_hub uses:
    httpx2 for huggingface_hub >= 2, httpx for 1.x, requests for older releases."""
    errors: list[type[BaseException]] = [OSError]
    for module_name, attr in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                              ("requests", "ConnectionError")):
        try:
            module = __import__(module_name)
        except ImportError:
            continue
        errors.append(getattr(module, attr))
    return tuple(errors)
