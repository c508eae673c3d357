"""Writing outputs safely: a temporary directory, renamed into place only when every format is complete.

While being written, files are private (0600, directories 0700); finished results are 0644/0755.
Every published output carries a marker file, and `--overwrite` replaces only a directory that has
one (or an older output's slimc_report.json): a directory slimc did not write is never deleted.
Private directories beside the output (`.<name>.tmp-*` while writing, `.<name>.old-*` while swapping)
are named after the writing process and host, so a later run cleans up after a run that was killed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from slimc import __version__
from slimc.environment import existing_ancestor, free_disk_bytes, human_size
from slimc.errors import SPACE_ERRNOS, ExportError, describe_os_error

MARKER_FILE = ".slimc-output"
REPORT_FILE = "slimc_report.json"  # also proves an output of a slimc that wrote no marker yet
# Private directories beside the output: being written, replaced output, scratch space of a running compile,
# the blocks a streamed compile finished (kept while its Program lives).
STAGING, ASIDE, SCRATCH, SPILL = "tmp", "old", "work", "spill"


def check_output_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse an existing output unless asked to replace it and slimc wrote it; refuse a parent that is a file
    or not writable. Runs before the model is loaded, so a bad --out costs nothing."""
    if out_dir.exists() and not overwrite:
        raise ExportError(f"output directory {out_dir} already exists; choose another --out or pass --overwrite to replace it")
    if out_dir.exists():
        check_replaceable(out_dir)
    parent = out_dir.resolve().parent
    for ancestor in (parent, *parent.parents):
        if ancestor.exists():
            if not ancestor.is_dir():
                raise ExportError(f"cannot create {out_dir}: {ancestor} is a file")
            check_writable(ancestor, out_dir)
            break


def check_replaceable(out_dir: Path) -> None:
    """Only a directory slimc published may be replaced: anything else may hold the user's files."""
    if not out_dir.is_dir():
        raise ExportError(f"output path {out_dir} exists and is not a directory")
    if not any((out_dir / name).is_file() for name in (MARKER_FILE, REPORT_FILE)):
        raise ExportError(
            f"--overwrite replaces only outputs of slimc, and {out_dir} was not written by slimc (it has no "
            f"{MARKER_FILE} or {REPORT_FILE}); choose another --out, or remove the directory yourself"
        )


def check_writable(directory: Path, out_dir: Path) -> None:
    """Create and remove a probe directory where the output will be staged: a permission problem shows now,
    not after the whole compile."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{out_dir.name}.probe-", dir=directory))
    except OSError as error:
        raise ExportError(f"cannot write the output {out_dir}: creating a directory in {directory} failed "
                          f"({error.strerror}); make {directory} writable or choose another --out") from None


def check_disk_space(out_dir: Path, needed_bytes: int) -> None:
    free = free_disk_bytes(out_dir)
    if free < needed_bytes:
        raise ExportError(
            f"not enough disk space for the output: about {human_size(needed_bytes)} needed, "
            f"{human_size(free)} free under {existing_ancestor(out_dir)}; free space or choose another --out"
        )


def remove_dead_runs(out_dir: Path) -> None:
    """Clean up after runs on this host whose process is gone: remove their staging directories, and put back
    an output they had moved aside but not yet replaced (else remove it: its replacement was published)."""
    out_dir = out_dir.resolve()
    if not out_dir.parent.is_dir():
        return
    for path in sorted(p for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}.")):
        kind, owner = _private_dir_owner(path, out_dir.name)
        if owner is None or not path.is_dir() or _alive(*owner):
            continue
        with contextlib.suppress(OSError):  # another run may be cleaning up the same directory
            if kind == ASIDE and not out_dir.exists():
                path.rename(out_dir)
            else:
                shutil.rmtree(path)


@contextlib.contextmanager
def staged_output(out_dir: Path, overwrite: bool, needed_bytes: int = 0) -> Iterator[Path]:
    """Yield a private temporary directory beside `out_dir`; on success it replaces `out_dir`.

    A full disk or a permission error while writing is an ExportError naming the output (`needed_bytes`:
    the size estimate it quotes); whatever fails, the staging directory is removed."""
    out_dir = out_dir.resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=_private_prefix(out_dir, STAGING), dir=out_dir.parent))
    old_umask = os.umask(0o077)
    try:
        yield staging
        (staging / MARKER_FILE).write_text(f"written by slimc {__version__}; `slimc compile --overwrite` may replace "
                                           "this directory\n", encoding="utf-8")
        _publish_permissions(staging)
        _swap_into_place(staging, out_dir, overwrite)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, OSError) and (message := _write_error(error, out_dir, needed_bytes)):
            raise ExportError(message) from error
        raise
    finally:
        os.umask(old_umask)


@contextlib.contextmanager
def scratch_directory(out_dir: Path) -> Iterator[Path]:
    """A private directory beside `out_dir` for the compile's own files (offloaded weights), removed when the
    compile ends, or by the next run if this process dies (`remove_dead_runs`)."""
    out_dir = out_dir.resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=_private_prefix(out_dir, SCRATCH), dir=out_dir.parent))
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def spill_directory(out_dir: Path) -> Path:
    """A private directory beside `out_dir` for a streamed compile's finished blocks; its owner
    (`BlockWeights.spill_into`) removes it, or the next run does if this process dies (`remove_dead_runs`)."""
    out_dir = out_dir.resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=_private_prefix(out_dir, SPILL), dir=out_dir.parent))


@contextlib.contextmanager
def staged_file(path: Path) -> Iterator[Path]:
    """Yield a temporary name beside `path` (same suffix) to write; on success it replaces `path` in one rename,
    so an interrupted write never leaves a half-written file under the real name."""
    path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=_private_prefix(path, STAGING), suffix=path.suffix, dir=path.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        temporary.chmod(0o644)
        os.replace(temporary, path)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        if isinstance(error, OSError) and (message := _write_error(error, path, 0)):
            raise ExportError(message) from error
        raise


def _swap_into_place(staging: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the finished output into place. An existing one is first renamed aside and deleted only once
    the new one is in place; if that fails it is put back, so there is always a complete output."""
    if not out_dir.exists():
        staging.rename(out_dir)
        return
    if not overwrite:
        raise ExportError(f"output directory {out_dir} appeared while writing; pass --overwrite to replace it")
    check_replaceable(out_dir)
    aside = out_dir.parent / f"{_private_prefix(out_dir, ASIDE)}{os.urandom(4).hex()}"
    out_dir.rename(aside)
    try:
        staging.rename(out_dir)
    except BaseException:
        aside.rename(out_dir)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _write_error(error: OSError, target: Path, needed_bytes: int) -> str | None:
    """The user's side of an OSError while writing `target`: a full disk (with the sizes), or no permission."""
    if error.errno in SPACE_ERRNOS:
        needed = f"about {human_size(needed_bytes)} needed, " if needed_bytes else ""
        return (f"the disk ran out of space while writing {target} ({needed}{human_size(free_disk_bytes(target))} free under "
                f"{existing_ancestor(target)}); nothing was published and the partial output was removed: free space "
                "or choose another location")
    message = describe_os_error(error, target)
    return f"writing {target} failed: {message}" if message else None


def _private_prefix(out: Path, kind: str) -> str:
    """`.<name>.<kind>-<host>-<pid>-`: the writer's host and process, so a later run knows when it is gone."""
    return f".{out.name}.{kind}-{_host()}-{os.getpid()}-"


def _host() -> str:
    """This host's name without '-' (which separates the parts of a private directory's name)."""
    return "".join(c if c.isalnum() or c in "._" else "_" for c in socket.gethostname())


def _private_dir_owner(path: Path, name: str) -> tuple[str, tuple[str, int] | None]:
    """(kind, (host, pid)) of a private directory named by `_private_prefix`; owner None for other names."""
    kind, _, rest = path.name.removeprefix(f".{name}.").partition("-")
    parts = rest.rsplit("-", 2)  # host-pid-random: the host has no '-', the random part has none either
    if kind not in (STAGING, ASIDE, SCRATCH, SPILL) or len(parts) != 3 or not parts[1].isdigit():
        return kind, None
    return kind, (parts[0], int(parts[1]))


def _alive(host: str, pid: int) -> bool:
    """Whether the process may still be running: always, for another host's (it cannot be checked from here)."""
    if host != _host() or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        pass
    return True


def _publish_permissions(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
