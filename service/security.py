"""Path confinement, Hub-id recognition, bearer tokens, request size limits and secret redaction.

Local paths are resolved with `os.path.realpath` (every symlink followed, `..` collapsed) before
they are compared with the allowed roots, so neither `../` nor a symlink can leave them. Paths
that do not exist yet (outputs) are resolved through their deepest existing parent.
"""

from __future__ import annotations

import hmac
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "BodySizeLimit",
    "PathNotAllowed",
    "classify_source",
    "redact",
    "resolve_under_roots",
    "token_matches",
]

# A Hub repo id: "org/name" (optionally "hf://org/name"), no path traversal, no leading dot/dash.
HUB_REPO_ID = re.compile(r"^(?:hf://)?[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
LOCAL_PREFIXES = ("/", "./", "../", "~", "file://")
REDACTED = "[REDACTED]"


class PathNotAllowed(Exception):
    """A local path resolves outside every allowed root (-> 403)."""

    def __init__(self, given: str, resolved: Path) -> None:
        self.given = given
        self.resolved = resolved
        super().__init__(f"path {given!r} resolves to {str(resolved)!r}, which is outside the allowed roots")


def is_local_reference(value: str) -> bool:
    """True for anything that names a local path rather than a Hub repo or dataset id."""
    return value.startswith(LOCAL_PREFIXES) or ".." in value or "\\" in value or not HUB_REPO_ID.match(value)


def classify_source(value: str) -> str:
    """'hub' for a Hub repo id, 'local' for a path (which must then pass `resolve_under_roots`)."""
    return "local" if is_local_reference(value) else "hub"


def _resolve(path: str, base: Path) -> Path:
    """Absolute, symlink-free form of `path` (relative paths are taken relative to `base`)."""
    if path.startswith("file://"):
        path = path[len("file://") :]
    expanded = Path(os.path.expanduser(path))
    if not expanded.is_absolute():
        expanded = base / expanded
    return Path(os.path.realpath(expanded))


def resolve_under_roots(path: str, roots: Sequence[Path]) -> Path:
    """The resolved path if it lies under one of `roots` (already resolved), else PathNotAllowed.

    Relative paths are taken relative to the first root (the data dir).
    """
    resolved = _resolve(path, roots[0])
    for root in roots:
        if resolved == root or resolved.is_relative_to(root):
            return resolved
    raise PathNotAllowed(path, resolved)


def token_matches(presented: str, tokens: Iterable[str]) -> bool:
    """Constant-time comparison against every configured token (no early exit on a match)."""
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(presented.encode(), token.encode())
    return matched


def redact(text: str, secrets: Iterable[str]) -> str:
    """`text` with every secret (of 4+ characters) replaced by [REDACTED]."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, REDACTED)
    return text


class BodySizeLimit:
    """ASGI middleware: request bodies over `max_bytes` get 413, declared or streamed (chunked)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._reject(send)
            return
        received = 0
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not response_started:
                await self._reject(send)

    async def _reject(self, send: Send) -> None:
        body = b'{"detail":"request body larger than %d bytes"}' % self.max_bytes
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _BodyTooLarge(HTTPException):
    """Raised from `receive`; an HTTPException so FastAPI's body parsing re-raises it as a 413."""

    def __init__(self) -> None:
        super().__init__(status_code=413, detail="request body too large")
