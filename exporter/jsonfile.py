"""Versioned JSON files the exporter writes and reads back (activation stats, sensitivity scores).

Every such file is one JSON object with a `format` name and an integer `version`. Writing is
atomic (temp file + rename), so a crash never leaves half a file behind; reading turns a missing,
unreadable or malformed file, another format or a newer version into the caller's typed error
(a `UsageError`, CLI exit 2) naming the file.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["check_format", "read_json", "write_json_atomic"]


def write_json_atomic(path: Path, data: Mapping[str, Any], indent: int = 1, *, allow_nan: bool = False) -> Path:
    """Write `data` as JSON (NaN/inf refused) to a hidden temp file, then rename it onto `path`.

    The one JSON writer of the exporter: stats, scores, and the exports' config files."""
    text = json.dumps(data, indent=indent, allow_nan=allow_nan)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def read_json(path: Path, *, error: type[Exception], what: str) -> Any:
    """The decoded contents of `path`; `error` (e.g. "activation stats file {path} does not exist")
    when it is missing, unreadable or not valid JSON. `what` names the kind of file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"cannot read {what} {path}: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None


def check_format(
    raw: Any,
    *,
    fmt: str,
    newest: int,
    kind: str,
    redo: str,
    bad: Callable[[str], Exception],
) -> Mapping[str, Any]:
    """Check a decoded file's `format` and `version` (1 to `newest`); returns it as a mapping.

    kind: how the file is named in errors ("activation-stats", "scores");
    redo: how to make a file this quantgate reads ("re-run calibration");
    bad:  builds the caller's typed error from a problem (it prefixes the file name).
    """
    if not isinstance(raw, Mapping):
        raise bad("not a JSON object")
    if raw.get("format") != fmt:
        raise bad(f"not a quantgate {kind} file (format is {raw.get('format')!r}, expected {fmt!r})")
    version = raw.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise bad(f"invalid version {version!r}")
    if version > newest:
        raise bad(
            f"written by a newer quantgate (format version {version}, this one reads <= {newest}); "
            f"upgrade quantgate or {redo}"
        )
    return raw
