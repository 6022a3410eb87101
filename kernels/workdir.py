"""Safe access to a kernel's directory from the trusted side.

Everything under a kernel's home is written by untrusted code, which may change it
while we look. So: no path is ever followed through a link (a walk opens each directory
with O_NOFOLLOW relative to its parent's descriptor and lists it through that
descriptor, so a directory swapped for a symlink mid-walk is refused, never entered);
only regular files with a single link are read or written, and a file is read only if
it is still the one the scan saw; nothing is opened that could block (FIFOs, devices);
every walk is bounded in entries and depth; and all of it runs on a few worker threads
of its own, so a slow call holds up file work and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import stat
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
MAX_DEPTH = 8  # how deep a scan looks for files to report
ENTRIES_PER_FILE = 20  # a scan reads at most this many entries per file it may report
REMOVE_DEPTH = 32  # directories held open at once while removing a tree
WORKERS = 4

T = TypeVar("T")
_executor = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="kernel-files")


@dataclass(frozen=True)
class Rooted:
    """A directory in a kernel's own mount namespace: `path` as the kernel sees it, under
    `root` (its /proc/<pid>/root). Reached one component at a time, never following a
    link: an absolute link there would resolve against the gateway's root."""

    root: str
    path: str


Directory = str | Rooted  # a path the gateway sees, or one inside a kernel's namespace


def _open_dir(workdir: Directory) -> int:
    if isinstance(workdir, str):
        return os.open(workdir, DIR_FLAGS)
    fd = os.open(workdir.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # the one link we follow
    try:
        for part in workdir.path.strip("/").split("/"):
            nxt = os.open(part, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


@functools.cache
def default_root() -> str:
    """This process's own kernel root, made fresh: a fixed shared path would be left
    behind by one run and refused to, or trusted by, the next run under another user.
    0711: kernels under their own uids pass through to their homes, nobody lists it."""
    root = tempfile.mkdtemp(prefix="cellgate-kernels-")
    os.chmod(root, 0o711)
    return root


class UnsafeFile(Exception):
    """The path is a link, not a regular file, changed under us, or otherwise not ours to touch."""


class QuotaFull(Exception):
    """The kernel's working directory has no room left (its disk quota)."""


FULL = (errno.ENOSPC, errno.EDQUOT)  # what a write past the disk quota fails with


class FileTooLarge(Exception):
    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


@dataclass(frozen=True)
class FileState:
    size: int
    mtime_ns: int
    inode: int


async def run(fn: Callable[..., T], *args: Any, timeout: float | None = 30.0) -> T:
    """Run blocking work on a kernel's files on the file workers, within `timeout`."""
    future = asyncio.get_running_loop().run_in_executor(_executor, fn, *args)
    try:
        return await asyncio.wait_for(future, timeout)
    except TimeoutError:
        raise UnsafeFile(f"gave up after {timeout:g} s") from None


def scan(workdir: Directory, limit: int) -> dict[str, FileState]:
    """Regular files under workdir (relative path -> state), links never followed. At
    most `limit` files and `limit * ENTRIES_PER_FILE` entries are looked at."""
    found: dict[str, FileState] = {}
    budget = max(limit, 1) * ENTRIES_PER_FILE
    stack: list[tuple[int, str, Any]] = []  # open directories: fd, relative path, iterator

    def enter(fd: int, rel: str) -> None:
        try:
            stack.append((fd, rel, os.scandir(fd)))
        except OSError:
            os.close(fd)

    try:
        enter(_open_dir(workdir), "")
        while stack and budget > 0 and len(found) < limit:
            fd, rel, entries = stack[-1]
            entry = next(entries, None)
            if entry is None:
                entries.close()
                os.close(fd)
                stack.pop()
                continue
            budget -= 1
            path = f"{rel}/{entry.name}" if rel else entry.name
            try:
                if entry.is_dir(follow_symlinks=False):
                    if len(stack) < MAX_DEPTH:
                        enter(os.open(entry.name, DIR_FLAGS, dir_fd=fd), path)
                elif entry.is_file(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    found[path] = FileState(st.st_size, st.st_mtime_ns, st.st_ino)
            except OSError:  # gone, or swapped for a link since it was listed
                continue
    except OSError:
        pass
    finally:
        for fd, _, entries in stack:
            entries.close()
            os.close(fd)
    return dict(sorted(found.items()))


def _open_parent(workdir: Directory, rel: str) -> tuple[int, str]:
    """An fd of the directory holding rel, reached without following any link."""
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise UnsafeFile(f"{rel!r} is not a plain relative path")
    try:
        fd = _open_dir(workdir)
    except OSError as exc:
        raise UnsafeFile(f"the working directory: {exc.strerror}") from None
    try:
        for part in parts[:-1]:
            nxt = os.open(part, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except OSError as exc:
        os.close(fd)
        raise UnsafeFile(f"{rel!r}: {exc.strerror}") from None
    return fd, parts[-1]


def _check(fd: int, rel: str) -> os.stat_result:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeFile(f"{rel!r} is not a regular file")
    if st.st_nlink != 1:
        raise UnsafeFile(f"{rel!r} has other hard links")
    return st


def read_file(workdir: Directory, rel: str, cap: int, seen: FileState | None = None) -> bytes:
    """The bytes of one regular file; UnsafeFile for links, special files or a file that
    is not the one `seen` (a scan's record of it), FileTooLarge above cap."""
    parent, name = _open_parent(workdir, rel)
    try:
        fd = os.open(name, os.O_RDONLY | FILE_FLAGS, dir_fd=parent)
    except OSError as exc:
        raise UnsafeFile(f"{rel!r}: {exc.strerror}") from None
    finally:
        os.close(parent)
    with os.fdopen(fd, "rb") as f:
        st = _check(fd, rel)
        if seen is not None and st.st_ino != seen.inode:
            raise UnsafeFile(f"{rel!r} was replaced while being stored")
        if st.st_size > cap:
            raise FileTooLarge(st.st_size)
        data = f.read(cap + 1)
    if len(data) > cap:
        raise FileTooLarge(len(data))
    return data


def write_file(workdir: Directory, name: str, data: bytes) -> FileState:
    """Create or replace a plain file directly in workdir (for uploads). A FIFO, device
    or link in its place is refused at once, never opened to wait on."""
    parent, base = _open_parent(workdir, name)
    try:
        try:
            st = os.stat(base, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISREG(st.st_mode):
                raise UnsafeFile(f"{name!r} exists and is not a regular file")
        # O_NONBLOCK: a FIFO swapped in since the check fails (ENXIO) or opens at once,
        # and is then refused; no O_TRUNC until the file is proven plain.
        try:
            fd = os.open(base, os.O_WRONLY | os.O_CREAT | FILE_FLAGS, 0o644, dir_fd=parent)
        except OSError as exc:
            if exc.errno in FULL:  # no inode left
                raise QuotaFull(f"{name!r}: the kernel's working directory is full") from None
            raise UnsafeFile(f"{name!r}: {exc.strerror}") from None
        try:
            with os.fdopen(fd, "wb") as f:
                _check(fd, name)
                os.set_blocking(fd, True)
                f.truncate(0)
                f.write(data)
                f.flush()
                st = os.fstat(fd)
        except OSError as exc:
            if exc.errno not in FULL:
                raise
            # The kernel's disk quota: what was written so far would only take its room.
            with contextlib.suppress(OSError):
                os.unlink(base, dir_fd=parent)
            raise QuotaFull(f"{name!r}: the kernel's working directory is full") from None
    finally:
        os.close(parent)
    return FileState(st.st_size, st.st_mtime_ns, st.st_ino)


def remove_tree(path: str) -> None:
    """Remove a kernel's directory, however wide or deep, through directory fds only.

    At most REMOVE_DEPTH directories are held open: a directory deeper than that is
    moved up to the top (a rename within one file system) and removed from there.
    What cannot be removed is left, and nothing else is ever touched.
    """
    try:
        top = os.open(path, DIR_FLAGS)
    except OSError:
        return
    stuck: set[tuple[int, int]] = set()  # directories that would not go: never entered again
    moved = 0
    stack: list[tuple[int, str]] = [(top, "")]  # fd, its name in the directory below it on the stack
    try:
        while stack:
            fd, _ = stack[-1]
            child: tuple[int, str] | None = None
            with contextlib.suppress(OSError), os.scandir(fd) as entries:
                for entry in entries:
                    try:
                        if not entry.is_dir(follow_symlinks=False):
                            os.unlink(entry.name, dir_fd=fd)
                            continue
                        st = entry.stat(follow_symlinks=False)
                        if (st.st_dev, st.st_ino) in stuck:
                            continue
                        if len(stack) >= REMOVE_DEPTH:
                            moved += 1
                            os.rename(entry.name, f".removing-{moved}", src_dir_fd=fd, dst_dir_fd=top)
                            continue
                        child = (os.open(entry.name, DIR_FLAGS, dir_fd=fd), entry.name)
                        break
                    except OSError:
                        continue
            if child is not None:
                stack.append(child)
                continue
            fd, name = stack.pop()
            st = os.fstat(fd)
            os.close(fd)
            if stack:
                try:
                    os.rmdir(name, dir_fd=stack[-1][0])
                except OSError:
                    stuck.add((st.st_dev, st.st_ino))
    finally:
        for fd, _ in stack:
            os.close(fd)
    with contextlib.suppress(OSError):
        os.rmdir(path)
