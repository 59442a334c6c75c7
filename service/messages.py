"""One-line messages from pydantic validation errors, for API responses and CLI errors alike.

pydantic prefixes the text of a `ValueError` raised in a validator with "Value error, " and
reports a malformed JSON body as `body.<position>: JSON decode error`; users see neither
spelling: the prefix is dropped and a decode error says where the JSON broke and why.
Inputs are never echoed (a misplaced secret must not bounce into logs or clients).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["error_message", "errors_message", "public_error"]

VALUE_ERROR_PREFIXES: tuple[str, ...] = ("Value error, ", "Assertion failed, ")


def _location(loc: Iterable[Any]) -> str:
    return ".".join(str(part) for part in loc)


def _text(error: Mapping[str, Any]) -> str:
    """The message of one pydantic error dict (`loc`, `msg`, `type`, `ctx`), without its location."""
    if error.get("type") == "json_invalid":
        loc = list(error.get("loc", ()))
        position = f" at character {loc[1]}" if len(loc) > 1 else ""
        reason = (error.get("ctx") or {}).get("error")
        return f"not valid JSON{position}{f' ({reason})' if reason else ''}: JSON decode error; send one JSON object"
    msg = str(error.get("msg", ""))
    for prefix in VALUE_ERROR_PREFIXES:
        msg = msg.removeprefix(prefix)
    return msg


def _where(error: Mapping[str, Any]) -> list[Any]:
    loc = list(error.get("loc", ()))
    return loc[:1] if error.get("type") == "json_invalid" else loc   # body.<position> -> body


def error_message(error: Mapping[str, Any]) -> str:
    """`where: what` for one pydantic error dict."""
    where = _location(_where(error))
    return f"{where}: {_text(error)}" if where else _text(error)


def public_error(error: Mapping[str, Any]) -> dict[str, Any]:
    """The error as the API returns it: location, cleaned message and type, without the input."""
    return {"loc": _where(error), "msg": _text(error), "type": error.get("type", "")}


def errors_message(errors: Iterable[Mapping[str, Any]]) -> str:
    return "; ".join(error_message(error) for error in errors)
