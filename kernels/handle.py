"""The kernel handle: everything a session may do with its kernel, and nothing more.

This is the seam between a session's logic and wherever its kernel runs. `Kernel`
(kernels/kernel.py) is the local implementation: the kernel runs on this host, its
messages come off its own bounded wire and its files are read through directory
descriptors. A remote implementation carries the same calls to a kernel host.

Every message a handle hands its listener has already been bounded and checked by the
trusted side that holds the kernel's key (see "What the trusted side believes" in
docs/ARCHITECTURE.md); the session still never believes one for a lifecycle decision.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from kernels.workdir import FileState


@dataclass(slots=True)
class Incoming:
    """One message from the kernel, as the listener gets it."""

    channel: str
    msg: dict[str, Any]
    size: int  # its bytes on the wire
    truncated: bool = False  # over the message limit: content is a marker, buffers are gone


Listener = Callable[[Incoming], None]
DropListener = Callable[[str, str], None]  # (channel, reason)


class KernelBusy(RuntimeError):
    """The kernel has stopped reading what it is sent."""


@runtime_checkable
class KernelHandle(Protocol):
    id: str
    name: str

    @property
    def alive(self) -> bool: ...

    @property
    def exit_reason(self) -> str:
        """Why it ended, in words for the client."""
        ...

    # -- messages ---------------------------------------------------------------------

    def send(self, channel: str, msg: dict[str, Any]) -> None:
        """Queue a message for the kernel; KernelBusy if it is not reading what it is sent."""
        ...

    def set_listener(self, listener: Listener | None, on_drop: DropListener | None = None) -> None:
        """Where every message the kernel sends goes, in order, and who hears of drops."""
        ...

    def on_exit(self, callback: Callable[[Any], None]) -> None:
        """Called once, with the handle, when the kernel has ended for any reason."""
        ...

    # -- control ----------------------------------------------------------------------

    async def interrupt(self) -> None: ...

    async def kill(self, reason: str) -> None:
        """End it now; `reason` is what `exit_reason` then says."""
        ...

    def cpu_seconds(self) -> float | None:
        """CPU time its processes used so far, as the trusted side measures it."""
        ...

    # -- its working directory ----------------------------------------------------------

    async def list_files(self, limit: int) -> dict[str, FileState]:
        """Regular files under its working directory (relative names), at most `limit`;
        workdir.UnsafeFile if the directory cannot be walked safely."""
        ...

    async def read_file(self, name: str, cap: int, seen: FileState) -> bytes:
        """A file's bytes, if it is still the file `seen` and at most `cap` bytes
        (workdir.FileTooLarge, workdir.UnsafeFile or OSError otherwise)."""
        ...

    async def write_file(self, name: str, data: bytes) -> FileState:
        """Put a client's file in its working directory, never through a link."""
        ...
