"""Push a validated export to the Hugging Face Hub with its model card, at most once.

`push_export(folder, target, card)` creates the repo (and the branch) when needed, then makes one
commit holding every file of the export plus the card as `README.md` (a README.md copied from the
source is replaced by the card). Only a validated export reaches this point: the pipeline's final
directory exists only when the validator found no error, and callers push only that directory.

At most once: the commit description carries a marker line `quantgate-push: <push id>` (the job
id for a service job, else a digest of the checkpoint's weights and configs). Before uploading, the branch's
commits are listed; when one carries the marker, that commit is returned and nothing is sent, so
a retried job or a re-run command does not make a second commit.

The token comes from the caller or huggingface_hub's own lookup (HF_TOKEN, the saved login); it is
never logged, put in an event, an error message or the card. `HF_ENDPOINT` picks the Hub.
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from quantgate.exporter.progress import ProgressCallback, emit
from quantgate.validators.errors import QuantgateError, UsageError

__all__ = ["PushError", "PushRejected", "PushResult", "PushTarget", "check_repo_id", "export_digest", "publish_export",
           "publish_html", "push_export"]

log = logging.getLogger(__name__)

STAGE = "upload"
CARD_NAME = "README.md"
MARKER_PREFIX = "quantgate-push: "
DEFAULT_BRANCH = "main"
DIGEST_CHUNK = 1 << 22
#: files of an export that describe the run, not the checkpoint (left out of the push id)
RUN_RECORDS: frozenset[str] = frozenset({"calibration.json", "quantgate-report.json", "quantgate-report.html"})
HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
#: HTTP status of a Hub refusal -> what to tell the user (both are bad input: exit 2)
REFUSALS: dict[int, str] = {
    401: "the Hub rejected the token (HTTP 401{detail}); set HF_TOKEN to a valid token with write access",
    403: "the token may not write to {repo} (HTTP 403{detail}); use a token with write access to its "
         "namespace, or push to a namespace you own",
}


class PushError(QuantgateError):
    """The upload failed (the Hub unreachable or answering with an error); the export is kept."""


class PushRejected(PushError, UsageError):
    """The Hub refused the token or the repo (missing, invalid or read-only token): bad input."""


@dataclass(frozen=True)
class PushTarget:
    repo_id: str                  # org/name
    private: bool = False         # only applies when the repo is created
    revision: str | None = None   # branch to commit to (created from main when missing); None: main

    @property
    def branch(self) -> str:
        return self.revision or DEFAULT_BRANCH


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    revision: str
    commit: str                   # the commit that holds this export
    commit_url: str
    repo_url: str
    created: bool                 # False: an earlier run had already pushed it (nothing was sent)
    files: int

    def to_dict(self) -> dict:
        return asdict(self)


def _files(folder: Path) -> Iterator[tuple[str, Path]]:
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and rel != CARD_NAME:
            yield rel, path


def export_digest(folder: Path) -> str:
    """A digest of the checkpoint's weights and configs (the push id of a run without a job).

    Files that record the run rather than the checkpoint (timings in calibration.json, the report's
    target path) are left out, so re-running the same export finds its earlier commit."""
    digest = hashlib.sha256()
    for rel, path in _files(folder):
        if rel in RUN_RECORDS:
            continue
        digest.update(rel.encode() + b"\0")
        with path.open("rb") as handle:
            while chunk := handle.read(DIGEST_CHUNK):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()[:32]


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def _hub_error(exc: Exception, repo_id: str, token: str | None) -> PushError:
    """A PushError (or PushRejected) with an actionable message and no secret in it."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        server = exc.server_message or exc.response.headers.get("X-Error-Message") or ""
        detail = f": {server}" if server else ""
        if status in REFUSALS:
            return PushRejected(_scrub(REFUSALS[status].format(repo=repo_id, detail=detail), token))
        return PushError(_scrub(f"pushing to {repo_id} failed: the Hub answered HTTP {status}{detail}; "
                                "the validated export is kept locally, retry the push later", token))
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    cause = exc.__cause__
    if cause is not None:   # huggingface_hub wraps upload failures ("Error while uploading X")
        first += f" ({type(cause).__name__}: {(str(cause).splitlines() or [''])[0]})"
    return PushError(_scrub(f"pushing to {repo_id} failed: {type(exc).__name__}: {first}; the validated "
                            "export is kept locally, check HF_ENDPOINT and the network, then retry", token))


def _pushed_commit(api, target: PushTarget, marker: str) -> str | None:
    """The id of a commit on the branch whose title or message carries `marker`, if any."""
    for commit in api.list_repo_commits(target.repo_id, revision=target.branch):
        if marker in (commit.message or "") or marker in (commit.title or ""):
            return commit.commit_id
    return None


def _repo_url(endpoint: str, target: PushTarget) -> str:
    base = f"{endpoint.rstrip('/')}/{target.repo_id}"
    return f"{base}/tree/{target.revision}" if target.revision else base


def push_export(folder: Path, target: PushTarget, card: str, *, token: str | None = None,
                push_id: str | None = None, title: str | None = None,
                progress: ProgressCallback | None = None) -> PushResult:
    """Upload `folder` and `card` (as README.md) to `target` in one commit, unless already there."""
    from huggingface_hub import CommitOperationAdd, HfApi, get_token

    if not (token or get_token()):
        raise PushRejected(f"no Hub token to push {target.repo_id} with: set HF_TOKEN to a token with "
                           "write access (https://huggingface.co/settings/tokens)")
    secret = token or get_token()
    api = HfApi(token=token)
    marker = MARKER_PREFIX + (push_id or export_digest(folder))
    files = list(_files(folder))
    repo_url = _repo_url(api.endpoint, target)
    try:
        emit(progress, STAGE, 0.0, f"preparing {target.repo_id}" + (" (private)" if target.private else ""),
             repo_id=target.repo_id, revision=target.branch)
        api.create_repo(target.repo_id, private=target.private, exist_ok=True)
        if target.revision and target.revision != DEFAULT_BRANCH:
            api.create_branch(target.repo_id, branch=target.revision, exist_ok=True)
        earlier = _pushed_commit(api, target, marker)
        if earlier is not None:
            emit(progress, STAGE, 1.0, f"already pushed to {target.repo_id} in commit {earlier[:12]}; nothing sent",
                 repo_id=target.repo_id, revision=target.branch, commit=earlier, created=False)
            commit_url = f"{api.endpoint}/{target.repo_id}/commit/{earlier}"
            return PushResult(target.repo_id, target.branch, earlier, commit_url, repo_url, created=False,
                              files=len(files) + 1)
        size = sum(path.stat().st_size for _, path in files)
        emit(progress, STAGE, 0.1, f"uploading {len(files) + 1} files ({size / 1e6:.1f} MB) to {target.repo_id}",
             repo_id=target.repo_id, files=len(files) + 1, bytes=size)
        operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path)) for rel, path in files]
        operations.append(CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=card.encode("utf-8")))
        info = api.create_commit(target.repo_id, operations, revision=target.revision,
                                 commit_message=title or f"Upload {folder.name} with quantgate",
                                 commit_description=f"Pushed by quantgate after validation.\n\n{marker}\n")
    except PushError:
        raise
    except Exception as exc:  # noqa: BLE001 - every Hub or network failure becomes one clear PushError
        raise _hub_error(exc, target.repo_id, secret) from None
    emit(progress, STAGE, 1.0, f"pushed to {target.repo_id} ({target.branch}) in commit {info.oid[:12]}",
         repo_id=target.repo_id, revision=target.branch, commit=info.oid, commit_url=info.commit_url, created=True)
    log.info("pushed %s to %s (%s) in commit %s", folder, target.repo_id, target.branch, info.oid)
    return PushResult(target.repo_id, target.branch, info.oid, info.commit_url, repo_url, created=True,
                      files=len(operations))


def check_repo_id(repo_id: str) -> str:
    """`repo_id` if it is a Hub repo id (org/name), else UsageError."""
    if not HUB_REPO_ID.match(repo_id) or ".." in repo_id or repo_id.endswith((".git", ".")):
        raise UsageError(f"push target {repo_id!r} is not a Hub repo id; use ORG/NAME, e.g. my-org/model-NVFP4")
    return repo_id


def publish_export(folder: Path, target: PushTarget, *, source: str, source_revision: str | None, recipe: str,
                   token: str | None = None, push_id: str | None = None,
                   progress: ProgressCallback | None = None) -> tuple[PushResult, str]:
    """Render the card for the validated export in `folder` and push both; returns (result, card)."""
    from quantgate.exporter.model_card import REPORT_FILE, CardFacts, render_card
    from quantgate.validators import __version__

    report = json.loads((folder / REPORT_FILE).read_text(encoding="utf-8"))
    if not report.get("ok"):
        raise UsageError(f"{folder} failed validation; a failed export is never pushed")
    card = render_card(folder, CardFacts(repo_id=target.repo_id, revision=target.revision, source=source,
                                         source_revision=source_revision, recipe=recipe, version=__version__))
    source_name = source if HUB_REPO_ID.match(source) and not Path(source).exists() else Path(source).name
    title = (f"{report.get('scheme') or recipe} ({report.get('dialect')}) export of {source_name}, "
             f"validated by quantgate {__version__}")
    return push_export(folder, target, card, token=token, push_id=push_id, title=title, progress=progress), card


def publish_html(push: dict) -> str:
    """An HTML section that links the pushed repo and commit (appended to a job's HTML report)."""
    e = html.escape
    return (f'<section id="published"><h2>Published</h2><p>Pushed to <a href="{e(push["repo_url"])}">'
            f'{e(push["repo_id"])}</a> (branch {e(push["revision"])}) in commit <a href="{e(push["commit_url"])}">'
            f'<code>{e(push["commit"][:12])}</code></a>'
            + ("" if push.get("created", True) else " (already there: nothing was sent again)") + ".</p></section>")
