"""`quantgate-healthcheck`: the container's HEALTHCHECK, probing the server where it really listens.

A HEALTHCHECK that reads only `QUANTGATE_PORT` probes the wrong port once `docker run IMAGE --port
9000` overrides it on the command line. This reads the command line of the serve process (PID 1 in
the container, `/proc/<pid>/cmdline`), parses it with the CLI's own parser and probes `/healthz` on
the address it binds: the `--host`/`--port` flags, else `QUANTGATE_HOST`/`QUANTGATE_PORT`, else the
defaults. A wildcard bind address (0.0.0.0, ::) is probed on loopback.

Exit 0 healthy, 1 unhealthy (the reason on stderr), as Docker expects. Standard library only.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["main", "probe_url", "serve_argv"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
WILDCARDS: dict[str, str] = {"": DEFAULT_HOST, "0.0.0.0": DEFAULT_HOST, "::": "::1", "[::]": "::1"}
PROBE_TIMEOUT_S = 4.0


def serve_argv(cmdline: bytes) -> list[str]:
    """The arguments after `serve` in a NUL-separated /proc cmdline (empty when `serve` is absent)."""
    argv = [part.decode("utf-8", "replace") for part in cmdline.split(b"\0") if part]
    return argv[argv.index("serve") + 1:] if "serve" in argv else []


def probe_url(argv: Sequence[str], env: Mapping[str, str]) -> str:
    """`http://HOST:PORT/healthz` for a server started with `quantgate serve ARGV` in `env`."""
    from quantgate.service.cli import build_parser  # argparse only: no fastapi, no pydantic

    args, _ = build_parser().parse_known_args(["serve", *argv])
    host = args.host if args.host is not None else env.get("QUANTGATE_HOST", DEFAULT_HOST)
    port = args.port if args.port is not None else int(env.get("QUANTGATE_PORT", "") or DEFAULT_PORT)
    host = WILDCARDS.get(host, host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}/healthz"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quantgate-healthcheck", description=__doc__.splitlines()[0])
    parser.add_argument("--pid", default="1", help="process id of `quantgate serve` (default 1)")
    options = parser.parse_args(argv)
    try:
        cmdline = Path(f"/proc/{options.pid}/cmdline").read_bytes()
        url = probe_url(serve_argv(cmdline), os.environ)
    except (OSError, ValueError, SystemExit) as exc:
        print(f"quantgate-healthcheck: cannot read the serve command line: {exc}", file=sys.stderr)
        return 1
    try:
        with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S) as response:  # noqa: S310 - http only
            healthy = response.status == 200
    except (OSError, urllib.error.URLError) as exc:
        print(f"quantgate-healthcheck: {url}: {exc}", file=sys.stderr)
        return 1
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
