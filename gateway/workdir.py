"""Safe access to a kernel's working directory from the trusted side.

Everything under the working directory is written by untrusted code. So: no path is
followed through a link (every component is opened with O_NOFOLLOW relative to its
parent's fd), only regular files with a single link are read or written (a hard link
planted to a server file is refused), and every walk is bounded.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_DEPTH = 8


class UnsafeFile(Exception):
    """The path is a link, not a regular file, or otherwise not ours to touch."""


@dataclass(frozen=True)
class FileState:
    size: int
    mtime_ns: int
    inode: int


def scan(workdir: str, limit: int) -> dict[str, FileState]:
    """Regular files under workdir (relative path -> state), links never followed."""
    found: dict[str, FileState] = {}
    stack = [("", 0)]
    seen = 0
    while stack:
        rel, depth = stack.pop()
        try:
            entries = list(os.scandir(os.path.join(workdir, rel) if rel else workdir))
        except OSError:
            continue
        for entry in sorted(entries, key=lambda e: e.name):
            seen += 1
            if seen > limit * 20:  # a directory of millions of entries must not stall us
                return found
            path = f"{rel}/{entry.name}" if rel else entry.name
            try:
                if entry.is_dir(follow_symlinks=False):
                    if depth + 1 < MAX_DEPTH:
                        stack.append((path, depth + 1))
                elif entry.is_file(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    found[path] = FileState(st.st_size, st.st_mtime_ns, st.st_ino)
                    if len(found) >= limit:
                        return found
            except OSError:
                continue
    return found


def _open_parent(workdir: str, rel: str) -> tuple[int, str]:
    """An fd of the directory holding rel, reached without following any link."""
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise UnsafeFile(f"{rel!r} is not a plain relative path")
    fd = os.open(workdir, DIR_FLAGS)
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


def read_file(workdir: str, rel: str, cap: int) -> bytes:
    """The bytes of one regular file; UnsafeFile for links, FileTooLarge above cap."""
    parent, name = _open_parent(workdir, rel)
    try:
        # O_NONBLOCK: a FIFO the kernel left there must not hang the reader.
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=parent)
    except OSError as exc:
        raise UnsafeFile(f"{rel!r}: {exc.strerror}") from None
    finally:
        os.close(parent)
    with os.fdopen(fd, "rb") as f:
        st = _check(fd, rel)
        if st.st_size > cap:
            raise FileTooLarge(st.st_size)
        data = f.read(cap + 1)
    if len(data) > cap:
        raise FileTooLarge(len(data))
    return data


def write_file(workdir: str, name: str, data: bytes) -> FileState:
    """Create or replace a plain file directly in workdir (for uploads)."""
    parent, base = _open_parent(workdir, name)
    try:
        # No O_TRUNC: the file is truncated only after it is proven a plain file.
        fd = os.open(base, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=parent)
    except OSError as exc:
        raise UnsafeFile(f"{name!r}: {exc.strerror}") from None
    finally:
        os.close(parent)
    with os.fdopen(fd, "wb") as f:
        _check(fd, name)
        f.truncate(0)
        f.write(data)
        f.flush()
        st = os.fstat(fd)
    return FileState(st.st_size, st.st_mtime_ns, st.st_ino)


class FileTooLarge(Exception):
    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size
