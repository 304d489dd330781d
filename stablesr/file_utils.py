"""Atomic writes: the one place that turns "write a file" into "a complete file appears, or nothing does".

Every writer of the package (images, latents, JSON/CSV/HTML reports, tar shards, converted model folders, training
checkpoints) goes through these helpers, so a crash or a SIGKILL at any point leaves either the previous file or the
complete new one, never a half-written one:

- [`atomic_write_path`]: a temporary path in the destination folder for writers that need a file name (Pillow,
  safetensors, tarfile); on success it is flushed to disk and moved into place, on any failure it is removed.
- [`atomic_write`]: the same around an open file object.
- [`atomic_write_text`] / [`atomic_write_bytes`]: one-call versions.
- [`atomic_write_dir`]: the same for a folder (converted model folders).
- [`replace_dir`]: a finished temporary folder moved into place (model folders, checkpoints).
- [`remove_stale_temporaries`]: clean the hidden temporaries a killed writer left behind.

Temporary names are hidden (``.NAME.<random>.tmp``) and live in the destination folder, so the final rename stays on
one file system and is atomic.

A write that fails for lack of room (``ENOSPC``, ``EDQUOT``, ``EFBIG``, also when a library reports it only as text,
like safetensors' "(os error 28)") raises [`DiskFullError`]: it names the path, the bytes needed and the space free,
and the temporary is gone, so callers can stop a batch instead of failing every remaining file the same way.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO

__all__ = [
    "DISK_FULL_ERRNOS",
    "TMP_SUFFIX",
    "DiskFullError",
    "as_disk_full",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_dir",
    "atomic_write_path",
    "atomic_write_text",
    "format_bytes",
    "fsync_dir",
    "fsync_file",
    "fsync_tree",
    "remove_stale_temporaries",
    "replace_dir",
    "temporary_name",
]

TMP_SUFFIX = ".tmp"
# No room for the write: the disk is full, the user's quota is used up, or the file would be larger than allowed.
DISK_FULL_ERRNOS = frozenset(code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EFBIG) if code)
# Below this much free space, an error that does not say why it failed (torch.save: "unexpected pos ...") is taken
# for a full disk.
_NEARLY_FULL_BYTES = 1 << 20


# ------------------------------------------------------------------------------------------------------ full disks


def format_bytes(size: int) -> str:
    """``size`` in decimal units, e.g. ``"950 bytes"``, ``"12.3 MB"``."""
    if size < 1000:
        return f"{size} bytes"
    for unit in ("kB", "MB", "GB", "TB"):
        size /= 1000
        if size < 1000 or unit == "TB":
            return f"{size:.1f} {unit}"
    raise AssertionError("unreachable")


def _file_size_limit() -> int | None:
    """This process's largest allowed file (``ulimit -f``, RLIMIT_FSIZE) in bytes, or None when unlimited."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def _free_space(path: Path) -> tuple[int | None, Path | None]:
    """Bytes free to this user on the file system holding ``path`` (or its nearest existing parent), and its mount."""
    probe = Path(os.path.abspath(path))
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return None, None
    mount = probe
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    return free, mount


class DiskFullError(OSError):
    """There was no room to write ``path``: the disk or the quota is full, or the file is larger than allowed.

    Raised by the writers of this module (and [`as_disk_full`]) in place of the underlying ``ENOSPC`` / ``EDQUOT`` /
    ``EFBIG`` error, which stays attached as ``__cause__``. Nothing was left at ``path`` by the failed write. A batch
    should stop on it: the next file would fail the same way.

    Attributes:
        path (`Path`): The file or folder that could not be written.
        needed (`int` or `None`): Bytes the write needed (``at_least``: more than that many), when known.
        at_least (`bool`): ``needed`` is a lower bound (the bytes written before the failure), not the full size.
        free (`int` or `None`): Bytes free on the file system holding ``path`` when the error was raised.
        mount (`Path` or `None`): That file system's mount point.
        limit (`int` or `None`): For ``EFBIG``: the process's file size limit (``ulimit -f``), when there is one.
    """

    def __init__(self, path: str | os.PathLike[str], needed: int | None = None, code: int = errno.ENOSPC,
                 at_least: bool = False):
        self.path = Path(path)
        self.needed = needed
        self.at_least = at_least
        self.free, self.mount = _free_space(self.path)
        self.limit = _file_size_limit() if code == errno.EFBIG else None
        super().__init__(code, self._message(code), str(self.path))
        self.args = (str(self.path), needed, code, at_least)  # what pickling passes back to __init__

    def _message(self, code: int) -> str:
        need = None
        if self.needed is not None:
            need = f"needs {'more than' if self.at_least else 'about'} {format_bytes(self.needed)}"
        if code == errno.EFBIG:
            limit = (f"{format_bytes(self.limit)} per file (`ulimit -f`)" if self.limit is not None
                     else "the file system's largest file")
            detail = "; ".join(x for x in (f"the file is larger than allowed here: {limit}", need) if x)
            return (f"no space left to write '{self.path}' ({detail}): raise the limit or choose another output "
                    "folder")
        free = f"{format_bytes(self.free)} free on {self.mount}" if self.free is not None else None
        quota = " within your disk quota" if code == getattr(errno, "EDQUOT", None) else ""
        detail = "; ".join(x for x in (need, free) if x)
        return (f"no space left to write '{self.path}'{quota}{f' ({detail})' if detail else ''}: free space or "
                "choose another output folder")

    def __str__(self) -> str:
        return self.strerror


def _disk_full_code(err: BaseException) -> int | None:
    """The errno among [`DISK_FULL_ERRNOS`] behind ``err`` or the errors it was raised from, else None.

    Also reads the text of libraries that report the OS error only in their message (safetensors: "... (os error
    28)"; C++ libraries: "No space left on device").
    """
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
            return err.errno
        text = str(err)
        for code in DISK_FULL_ERRNOS:
            if f"os error {code})" in text or f"[Errno {code}]" in text or os.strerror(code) in text:
                return code
        err = err.__cause__ or err.__context__
    return None


def _sizes(path: Path) -> tuple[int, int]:
    """Total bytes and largest file under ``path`` (a file or a folder); (0, 0) when it is missing."""
    if path.is_file():
        size = path.stat().st_size
        return size, size
    total = largest = 0
    for root, _, files in os.walk(path):
        for name in files:
            with suppress(OSError):
                size = os.stat(os.path.join(root, name)).st_size
                total, largest = total + size, max(largest, size)
    return total, largest


def as_disk_full(err: BaseException, path: str | os.PathLike[str], *, needed: int | None = None,
                 partial: str | os.PathLike[str] | None = None, remove_partial: bool = False) -> DiskFullError | None:
    """The [`DiskFullError`] that explains ``err``, raised while writing ``path``, or None when lack of room is not
    the cause.

    ``partial`` is the temporary file or folder being written, still in place. It tells I/O errors that carry no
    errno apart (torch.save raises a RuntimeError "unexpected pos ..."): a file that stopped at the process's file
    size limit, or a file system left with almost no free space, means the disk was the cause. Its size is also the
    lower bound reported when ``needed`` (the full size, if known) is not given. With ``remove_partial`` it is then
    removed (whatever the cause), before the free space is measured for the message.

    Example:
        ```py
        try:
            write_everything(tmp)
        except Exception as err:
            full = as_disk_full(err, final, partial=tmp, remove_partial=True)
            if full is not None:
                raise full from err
            raise
        ```
    """
    if isinstance(err, DiskFullError):
        return err
    partial = Path(partial) if partial is not None and os.path.lexists(partial) else None
    cause = None
    if isinstance(err, Exception):  # not KeyboardInterrupt, SystemExit
        with suppress(OSError):  # looking into the partial output must never hide the original error
            cause = _diagnose(err, partial)
    if remove_partial and partial is not None:
        if partial.is_dir() and not partial.is_symlink():
            shutil.rmtree(partial, ignore_errors=True)
        else:
            with suppress(OSError):
                partial.unlink()
    if cause is None:
        return None
    code, written = cause
    if needed is not None and needed > written:
        return DiskFullError(path, needed, code)
    return DiskFullError(path, written if partial is not None else None, code, at_least=True)


def _diagnose(err: Exception, partial: Path | None) -> tuple[int, int] | None:
    """``(errno, bytes written to partial)`` when lack of room made ``err``, else None."""
    written, largest = _sizes(partial) if partial is not None else (0, 0)
    code = _disk_full_code(err)
    if code is None and partial is not None and isinstance(err, (OSError, RuntimeError)):
        limit = _file_size_limit()
        free, _ = _free_space(partial)
        if limit is not None and largest >= limit:
            code = errno.EFBIG
        elif free is not None and free < _NEARLY_FULL_BYTES:
            code = errno.ENOSPC
    return None if code is None else (code, written)


def temporary_name(path: str | os.PathLike[str]) -> Path:
    """A fresh hidden sibling of ``path``: ``.NAME.<12 hex>.tmp`` in the same folder."""
    path = Path(path)
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}{TMP_SUFFIX}")


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush a closed file's data to disk."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (a rename into it) to disk; a no-op where folders cannot be opened (Windows)."""
    if os.name != "posix":
        return
    with suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(folder: str | os.PathLike[str]) -> None:
    """Flush every file and sub-folder entry under ``folder`` to disk (before renaming a finished folder into place)."""
    for root, _, files in os.walk(folder):
        for name in files:
            fsync_file(os.path.join(root, name))
        fsync_dir(root)


def _exists_message(path: Path) -> str:
    return f"'{path}' already exists; pass overwrite=True (CLI: --overwrite) to replace it"


def _publish(tmp: Path, path: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails if the destination appeared meanwhile: never clobbers a file made concurrently
    except FileExistsError:
        raise FileExistsError(_exists_message(path)) from None
    except OSError:  # no hard links on this file system: check, then rename
        if path.exists() or path.is_symlink():
            raise FileExistsError(_exists_message(path)) from None
        os.replace(tmp, path)
    else:
        os.unlink(tmp)


@contextmanager
def atomic_write_path(path: str | os.PathLike[str], *, overwrite: bool = True, size: int | None = None) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to; publish it atomically when the block ends cleanly.

    The parent folder is created. On success the temporary file is ``fsync``ed and renamed to ``path`` (with
    ``overwrite=False`` an existing ``path``, or one that appeared meanwhile, raises `FileExistsError` and is left
    untouched). On any exception (including `KeyboardInterrupt`) the temporary file is removed and ``path`` is not
    changed; a failure for lack of room is raised as [`DiskFullError`].

    Args:
        path: The final file.
        overwrite: Replace an existing file (default); otherwise refuse.
        size: The file's size when known in advance, for the [`DiskFullError`] message.

    Raises:
        `FileExistsError`: ``overwrite=False`` and the file exists. `IsADirectoryError`: ``path`` is a folder.
        [`DiskFullError`]: no room to write it.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"cannot write '{path}': it is a directory")
    if not overwrite and (path.exists() or path.is_symlink()):
        raise FileExistsError(_exists_message(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"the writer of '{path}' did not create its temporary file {tmp}")
        fsync_file(tmp)
        _publish(tmp, path, overwrite)
    except BaseException as err:
        full = as_disk_full(err, path, needed=size, partial=tmp, remove_partial=True)
        if full is not None and full is not err:
            raise full from err
        raise
    fsync_dir(path.parent)


@contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb", *, overwrite: bool = True,
                 encoding: str | None = None, size: int | None = None) -> Iterator[IO]:
    """Open a temporary file for writing (``"wb"`` or ``"w"``) and publish it as ``path`` when the block ends cleanly.

    See [`atomic_write_path`] for the guarantees.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    if mode == "w" and encoding is None:
        encoding = "utf-8"
    with atomic_write_path(path, overwrite=overwrite, size=size) as tmp:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
        fd = os.open(tmp, flags, 0o666)  # 0o666 & ~umask, like a normally created file
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, overwrite: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_write(path, "wb", overwrite=overwrite, size=len(data)) as handle:
        handle.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, overwrite: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with atomic_write(path, "w", overwrite=overwrite, size=len(text.encode("utf-8"))) as handle:
        handle.write(text)
    return Path(path)


def _lock_dir(folder: Path, *, blocking: bool) -> int | None:
    """An ``flock``ed descriptor of ``folder`` (the lock lives as long as the process holds it open, so it ends when
    the process dies, even by SIGKILL); None where there is no ``flock`` (Windows).

    Raises `BlockingIOError` when another process holds it and not ``blocking``, another `OSError` where the file
    system cannot lock folders.
    """
    try:
        import fcntl
    except ImportError:
        return None
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _locked_temporary_dir(path: Path) -> tuple[Path, int | None]:
    while True:
        tmp = temporary_name(path)
        tmp.mkdir()
        try:
            fd = _lock_dir(tmp, blocking=True)
        except FileNotFoundError:
            continue  # a cleaner took it for abandoned before it was locked: take another name
        except OSError:
            return tmp, None  # no folder locks here: unprotected, as without flock
        if fd is None or tmp.is_dir():
            return tmp, fd
        os.close(fd)


@contextmanager
def atomic_write_dir(path: str | os.PathLike[str], *, overwrite: bool = False, size: int | None = None) -> Iterator[Path]:
    """Yield a fresh temporary folder to write the folder ``path`` into; move it into place when the block ends
    cleanly.

    The temporary folder is a hidden sibling (``.NAME.<hex>.tmp``). On success its files are ``fsync``ed and it
    replaces ``path`` through [`replace_dir`]; on any exception it is removed and ``path`` is not changed, a failure
    for lack of room being raised as [`DiskFullError`]. While the block runs the folder is locked (``flock``), so
    [`remove_stale_temporaries`] in another process leaves it alone and removes it only once its writer is dead.

    Args:
        path: The final folder.
        overwrite: Replace an existing non-empty folder; otherwise `FileExistsError` (checked before and after).
        size: The bytes that will be written when known, for the [`DiskFullError`] message.
    """
    path = Path(path)
    if not overwrite and path.exists() and not (path.is_dir() and not any(path.iterdir())):
        raise FileExistsError(f"{path} exists and is not empty; pass overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, lock = _locked_temporary_dir(path)
    try:
        yield tmp
        fsync_tree(tmp)
        replace_dir(tmp, path, overwrite=overwrite)
    except BaseException as err:
        full = as_disk_full(err, path, needed=size, partial=tmp, remove_partial=True)
        if full is not None and full is not err:
            raise full from err
        raise
    finally:
        if lock is not None:
            os.close(lock)


def replace_dir(tmp_dir: str | os.PathLike[str], final_dir: str | os.PathLike[str], *, overwrite: bool = False) -> None:
    """Move a completely written folder ``tmp_dir`` to ``final_dir`` (a sibling, same file system).

    An existing non-empty ``final_dir`` raises `FileExistsError` unless ``overwrite``; it is then renamed aside to a
    hidden temporary name first and removed only after the new folder is in place, so there is always one complete
    folder at ``final_dir``'s name or at its aside name, and an aside left by a killed process is cleaned by
    [`remove_stale_temporaries`] like any temporary.
    """
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    if final_dir.exists():
        if final_dir.is_dir() and not any(final_dir.iterdir()):
            final_dir.rmdir()
        elif not overwrite:
            raise FileExistsError(f"{final_dir} exists and is not empty; pass overwrite to replace it")
        else:
            old = final_dir.with_name(f".{final_dir.name}.old-{secrets.token_hex(4)}{TMP_SUFFIX}")
            os.replace(final_dir, old)
            os.replace(tmp_dir, final_dir)
            fsync_dir(final_dir.parent)
            shutil.rmtree(old, ignore_errors=True)
            return
    os.replace(tmp_dir, final_dir)
    fsync_dir(final_dir.parent)


def remove_stale_temporaries(folder: str | os.PathLike[str], name: str | None = None) -> list[Path]:
    """Delete hidden temporaries (``.NAME.<hex>.tmp``) that a killed writer left in ``folder``.

    With ``name``, only those of that final file name. Temporary folders of [`atomic_write_dir`] are removed only
    when their writer is gone (it holds a lock on them), so that is safe at any time; temporary files carry no such
    lock: call this for files only when no other process writes them. Returns the removed paths.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = f".{name}.*{TMP_SUFFIX}" if name else f".*{TMP_SUFFIX}"
    removed = []
    for tmp in folder.glob(pattern):
        with suppress(OSError):  # BlockingIOError: a live writer holds it
            if tmp.is_dir() and not tmp.is_symlink():
                lock = _lock_dir(tmp, blocking=False)
                try:
                    shutil.rmtree(tmp)
                finally:
                    if lock is not None:
                        os.close(lock)
            else:
                tmp.unlink()
            removed.append(tmp)
    return removed
