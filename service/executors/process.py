"""One worker process: launched in its own session (process group), its stderr kept (redacted) in a
log file and a short tail, signalled as a group, and reaped without ever signalling a recycled pgid.

The exit is observed with `waitid(WNOWAIT)`: the leader stays a zombie (so its pid, and with it the
group id, cannot be reused) while leftover group members are killed; only then is it reaped.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import logging
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO

from quantgate.service.security import redact

__all__ = ["WorkerProcess", "describe_exit", "process_alive"]

logger = logging.getLogger(__name__)

STDERR_TAIL_LINES = 40
PR_SET_PDEATHSIG = 1  # linux/prctl.h
MAX_LINE_CHARS = 1 << 20  # a result line carries the whole report; anything longer is not ours


def _die_with_parent_hook() -> Callable[[], None] | None:
    """A pre-exec hook that has the kernel SIGKILL the child when its parent dies (Linux only).

    libc is resolved here, before the fork, so the child only makes one system call.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    prctl = ctypes.CDLL(name, use_errno=True).prctl

    def hook() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)

    return hook


def describe_exit(returncode: int) -> str:
    """Human reason for a worker exit status ("worker killed by SIGKILL (out of memory?)")."""
    if returncode >= 0:
        return f"worker exited with status {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    hint = " (out of memory?)" if -returncode == signal.SIGKILL else ""
    return f"worker killed by {name}{hint}"


def process_alive(pid: int) -> bool:
    """True when `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True


class WorkerProcess:
    """A running `python -m quantgate.service.worker SPEC` in its own process group."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        log_path: Path,
        secrets: Sequence[str],
        cwd: Path | None = None,
        die_with_parent: bool = False,
    ) -> None:
        """`die_with_parent`: the worker (its group leader) is SIGKILLed by the kernel when the
        process that started it dies, for hosts where no later recovery pass could find it."""
        self._secrets = tuple(secrets)
        self._lock = threading.Lock()
        self._reaped = False
        self._kill_timer: threading.Timer | None = None
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self.proc = subprocess.Popen(  # noqa: S603 - argv is our own interpreter and module
            list(argv),
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            start_new_session=True,
            close_fds=True,
            preexec_fn=_die_with_parent_hook() if die_with_parent else None,  # noqa: PLW1509
        )
        self.pid = self.proc.pid
        self.pgid = self.pid  # start_new_session: the worker leads its own session and group
        self._stderr_thread = threading.Thread(
            target=self._pump_stderr, args=(log_path,), name=f"worker-stderr-{self.pid}", daemon=True
        )
        self._stderr_thread.start()

    def _pump_stderr(self, log_path: Path) -> None:
        assert self.proc.stderr is not None
        with open(log_path, "a", encoding="utf-8") as log:
            for line in self.proc.stderr:
                clean = redact(line.rstrip("\n"), self._secrets)[:4000]
                self.stderr_tail.append(clean)
                log.write(clean + "\n")
                log.flush()

    def lines(self) -> Iterator[str]:
        """The worker's stdout, one (redacted) line at a time, until it closes."""
        stream: IO[str] | None = self.proc.stdout
        assert stream is not None
        for line in stream:
            yield redact(line[:MAX_LINE_CHARS].rstrip("\n"), self._secrets)

    def _signal_group(self, sig: signal.Signals) -> None:
        with self._lock:
            if self._reaped:
                return
            try:
                os.killpg(self.pgid, sig)
            except ProcessLookupError:
                pass

    def terminate(self, grace_seconds: float) -> None:
        """SIGTERM the group now and SIGKILL it after `grace_seconds` unless it has exited."""
        logger.info("stopping worker group %d (SIGTERM, SIGKILL in %.1fs)", self.pgid, grace_seconds)
        self._signal_group(signal.SIGTERM)
        with self._lock:
            if self._kill_timer is None and not self._reaped:
                self._kill_timer = threading.Timer(grace_seconds, self.kill)
                self._kill_timer.daemon = True
                self._kill_timer.start()

    def kill(self) -> None:
        self._signal_group(signal.SIGKILL)

    def wait(self) -> int:
        """Block until the leader exits, kill what is left of its group, reap; returns the exit status."""
        try:
            os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT)
        except ChildProcessError:
            pass
        self._signal_group(signal.SIGKILL)  # helpers the worker may have left behind
        with self._lock:
            returncode = self.proc.wait()
            self._reaped = True
            if self._kill_timer is not None:
                self._kill_timer.cancel()
        self._stderr_thread.join(timeout=5)
        return returncode
