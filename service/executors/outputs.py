"""Removing what an unfinished job wrote next to its output path.

The pipeline writes into a hidden sibling `.<name>.tmp-<hex>` and renames it to `<name>` only after
validation passes; a failed validation is kept at `<name>.failed-validation[.N]`. A job that was
cancelled or interrupted leaves at most those. Only entries created after the job's run started
are removed, so nothing a user had there before is ever touched.
"""

from __future__ import annotations

import glob
import logging
import shutil
import time
from pathlib import Path

from quantgate.service.store import Store

__all__ = ["partial_outputs", "purge_expired", "remove_job_outputs"]

logger = logging.getLogger(__name__)

TEMP_PATTERN = ".{name}.tmp-*"  # exporter.pipeline: out.parent / f".{out.name}.tmp-<hex>"
FAILED_PATTERN = "{name}.failed-validation*"  # exporter.pipeline.FAILED_SUFFIX (+ ".N" when taken)
MTIME_SLACK_S = 2.0  # coarse file-system timestamps


def partial_outputs(output: Path) -> list[Path]:
    """Temporary export directories of `output` (never the final path itself)."""
    return sorted(output.parent.glob(TEMP_PATTERN.format(name=glob.escape(output.name))))


def _created_since(path: Path, since: float | None) -> bool:
    if since is None:
        return True
    try:
        return path.lstat().st_mtime >= since - MTIME_SLACK_S
    except FileNotFoundError:
        return False


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)
    logger.info("removed %s", path)


def remove_job_outputs(
    output: Path, *, since: float | None, keep_failed: bool = False, include_final: bool = False
) -> list[Path]:
    """Remove the job's temp dirs (always), failed exports (unless `keep_failed`) and, with
    `include_final`, the final directory; each only if created at or after `since`."""
    targets = partial_outputs(output)
    if not keep_failed:
        targets += sorted(output.parent.glob(FAILED_PATTERN.format(name=glob.escape(output.name))))
    if include_final and output.exists():
        targets.append(output)
    removed = [path for path in targets if _created_since(path, since)]
    for path in removed:
        _remove(path)
    return removed


def purge_expired(store: Store, jobs_dir: Path, retention_days: float) -> list[str]:
    """Retention: delete finished jobs older than `retention_days` (rows, events, job dirs; never
    outputs); returns their ids."""
    purged = store.purge_before(time.time() - retention_days * 86400)
    for job_id in purged:
        shutil.rmtree(jobs_dir / job_id, ignore_errors=True)
    if purged:
        logger.info(
            "retention: removed %d finished job(s) older than %.0f day(s)", len(purged), retention_days
        )
    return purged
