"""Writing outputs safely: a temporary directory, renamed into place only when every format is complete.

While being written, files are private (0600, directories 0700); finished results are 0644/0755.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from slimc.errors import ExportError


def check_output_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse an existing output unless asked to replace it; refuse a parent that is a file."""
    if out_dir.exists() and not overwrite:
        raise ExportError(f"output directory {out_dir} already exists; choose another --out or pass --overwrite to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"output path {out_dir} exists and is not a directory")
    parent = out_dir.resolve().parent
    for ancestor in (parent, *parent.parents):
        if ancestor.exists():
            if not ancestor.is_dir():
                raise ExportError(f"cannot create {out_dir}: {ancestor} is a file")
            break


def check_disk_space(out_dir: Path, needed_bytes: int) -> None:
    parent = out_dir.resolve().parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if free < needed_bytes:
        raise ExportError(
            f"not enough disk space for the output: about {needed_bytes / 2**30:.2f} GiB needed, "
            f"{free / 2**30:.2f} GiB free under {parent}; free space or choose another --out"
        )


@contextlib.contextmanager
def staged_output(out_dir: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a private temporary directory beside `out_dir`; on success it replaces `out_dir`."""
    out_dir = out_dir.resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    old_umask = os.umask(0o077)
    try:
        yield staging
        _publish_permissions(staging)
        if out_dir.exists():
            if not overwrite:
                raise ExportError(f"output directory {out_dir} appeared while writing; pass --overwrite to replace it")
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        os.umask(old_umask)


def _publish_permissions(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
