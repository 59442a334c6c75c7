"""On / off / auto switches read from the environment (torch-free: the CLI reads them before torch).

`switch(name)` is "on", "off" or "auto" for `1/on/true/yes`, `0/off/false/no` or `auto`/unset;
`count(name, minimum)` is a whole number of at least `minimum`, or None when unset. Anything else is
a `SettingError`: a usage error (the CLI exits 2, the service's job is `bad_input`) that is also a
ValueError. Each setting's meaning lives with its user; the spelling lives here.
"""

from __future__ import annotations

import os

from quantgate.validators.errors import UsageError

ON, OFF, AUTO = "on", "off", "auto"
_SPELLINGS: dict[str, str] = {**dict.fromkeys(("1", "on", "true", "yes"), ON),
                              **dict.fromkeys(("0", "off", "false", "no"), OFF), "auto": AUTO}

#: Calibration and the weight pass at once (exporter.overlap): auto = on CUDA.
OVERLAP_ENV = "QUANTGATE_OVERLAP"


class SettingError(UsageError, ValueError):
    """An environment switch set to something it does not understand."""


def switch(name: str, default: str = AUTO) -> str:
    """ON, OFF or AUTO for environment variable `name` (`default` when unset or empty)."""
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    value = _SPELLINGS.get(raw)
    if value is None:
        raise SettingError(f"{name}={raw!r}: expected auto, 1 or 0")
    return value


def count(name: str, minimum: int = 0) -> int | None:
    """The whole number environment variable `name` holds (at least `minimum`), or None when unset."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < minimum:
        raise SettingError(f"{name}={raw!r}: expected a whole number >= {minimum}")
    return int(raw)
