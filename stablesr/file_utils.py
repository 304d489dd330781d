"""Atomic writes: the one place that turns "write a file" into "a complete file appears, or nothing does".

Every writer of the package (images, latents, JSON/CSV/HTML reports, tar shards, converted model folders, training
checkpoints) goes through these helpers, so a crash or a SIGKILL at any point leaves either the previous file or the
complete new one, never a half-written one:

- [`atomic_write_path`]: a temporary path in the destination folder for writers that need a file name (Pillow,
  safetensors, tarfile); on success it is flushed to disk and moved into place, on any failure it is removed.
- [`atomic_write`]: the same around an open file object.
- [`atomic_write_text`] / [`atomic_write_bytes`]: one-call versions.
- [`replace_dir`]: a finished temporary folder moved into place (model folders, checkpoints).
- [`remove_stale_temporaries`]: clean the hidden temporaries a killed writer left behind.

Temporary names are hidden (``.NAME.<random>.tmp``) and live in the destination folder, so the final rename stays on
one file system and is atomic.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO

__all__ = [
    "TMP_SUFFIX",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_path",
    "atomic_write_text",
    "fsync_dir",
    "fsync_file",
    "remove_stale_temporaries",
    "replace_dir",
    "temporary_name",
]

TMP_SUFFIX = ".tmp"


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
def atomic_write_path(path: str | os.PathLike[str], *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to; publish it atomically when the block ends cleanly.

    The parent folder is created. On success the temporary file is ``fsync``ed and renamed to ``path`` (with
    ``overwrite=False`` an existing ``path``, or one that appeared meanwhile, raises `FileExistsError` and is left
    untouched). On any exception (including `KeyboardInterrupt`) the temporary file is removed and ``path`` is not
    changed.

    Args:
        path: The final file.
        overwrite: Replace an existing file (default); otherwise refuse.

    Raises:
        `FileExistsError`: ``overwrite=False`` and the file exists. `IsADirectoryError`: ``path`` is a folder.
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
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


@contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb", *, overwrite: bool = True,
                 encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file for writing (``"wb"`` or ``"w"``) and publish it as ``path`` when the block ends cleanly.

    See [`atomic_write_path`] for the guarantees.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    if mode == "w" and encoding is None:
        encoding = "utf-8"
    with atomic_write_path(path, overwrite=overwrite) as tmp:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
        fd = os.open(tmp, flags, 0o666)  # 0o666 & ~umask, like a normally created file
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, overwrite: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_write(path, "wb", overwrite=overwrite) as handle:
        handle.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, overwrite: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with atomic_write(path, "w", overwrite=overwrite) as handle:
        handle.write(text)
    return Path(path)


def replace_dir(tmp_dir: str | os.PathLike[str], final_dir: str | os.PathLike[str], *, overwrite: bool = False) -> None:
    """Move a completely written folder ``tmp_dir`` to ``final_dir`` (a sibling, same file system).

    An existing non-empty ``final_dir`` raises `FileExistsError` unless ``overwrite``; it is then renamed aside first
    and removed only after the new folder is in place, so there is always one complete folder at ``final_dir``'s
    name or at its aside name.
    """
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    if final_dir.exists():
        if final_dir.is_dir() and not any(final_dir.iterdir()):
            final_dir.rmdir()
        elif not overwrite:
            raise FileExistsError(f"{final_dir} exists and is not empty; pass overwrite to replace it")
        else:
            old = final_dir.with_name(f".{final_dir.name}.old-{secrets.token_hex(4)}")
            os.replace(final_dir, old)
            os.replace(tmp_dir, final_dir)
            fsync_dir(final_dir.parent)
            shutil.rmtree(old, ignore_errors=True)
            return
    os.replace(tmp_dir, final_dir)
    fsync_dir(final_dir.parent)


def remove_stale_temporaries(folder: str | os.PathLike[str], name: str | None = None) -> list[Path]:
    """Delete hidden temporaries (``.NAME.<hex>.tmp``) that a killed writer left in ``folder``.

    With ``name``, only those of that final file name. Only call this when no other process writes to the folder.
    Returns the removed paths.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = f".{name}.*{TMP_SUFFIX}" if name else f".*{TMP_SUFFIX}"
    removed = []
    for tmp in folder.glob(pattern):
        with suppress(OSError):
            if tmp.is_dir():
                shutil.rmtree(tmp)
            else:
                tmp.unlink()
            removed.append(tmp)
    return removed
