"""The session registry interface: session records and each session's replay log.

The registry is the only place a session's durable facts live, so a backend that
shares it between nodes (Redis) lets any node serve any session. The embedded backend
keeps it in this process.
"""

from __future__ import annotations

import hashlib
import secrets
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


def new_token() -> str:
    return secrets.token_urlsafe(32)  # 256 random bits


def token_digest(token: str) -> str:
    # Only a digest is stored: a registry dump does not hand out live sessions.
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class SessionRecord:
    id: str
    token_digest: str
    epoch: str
    kernel_name: str
    client: str
    created: float
    kernel_id: str | None = None
    host: str = ""  # the kernel host that owns its kernel and its life ("": this node)
    origin: str = ""  # the Origin of the page that opened it, as its client said (for operators)
    kind: str = ""  # "jupyter": opened through Jupyter's kernels API, with its own time limits


@dataclass
class LogEntry:
    seq: int
    event: str
    data: Any
    size: int = 0  # approximate bytes, for the log's byte budget


@dataclass
class LogRead:
    epoch: str
    first: int  # lowest seq still held (newest + 1 when empty)
    last: int  # newest seq ever appended (0 when none)
    entries: list[LogEntry] = field(default_factory=list)


class RegistryUnavailable(Exception):
    """The registry cannot be reached (Redis down or refusing)."""


class LogLost(Exception):
    """The registry lost writes to a session's log (a store restart or failover): the
    session must `restore` itself under a new epoch before it appends again."""


class SessionRegistry(ABC):
    backend = "memory"

    async def open(self) -> None:  # noqa: B027 (nothing to check in this process)
        """Check the registry can be reached; RegistryUnavailable, saying why, if not."""

    async def reachable(self) -> bool:
        return True

    @abstractmethod
    async def create(self, record: SessionRecord, per_client: int | None = None) -> bool:
        """Add a session. With `per_client`, only if fewer than that many live sessions
        come from its client address: the count and the add are one atomic step, so
        sessions opened at once, on any node, cannot pass the limit together. False
        when refused."""

    @abstractmethod
    async def get(self, session_id: str) -> SessionRecord | None: ...

    @abstractmethod
    async def list(self, limit: int) -> list[SessionRecord]:
        """Up to `limit` live sessions, in no particular order (for operators)."""

    @abstractmethod
    async def list_client(self, client: str) -> list[SessionRecord]:
        """The live sessions of one client (an address, or a Jupyter API token's owner)."""

    @abstractmethod
    async def note(self, session_id: str, name: str, value: str) -> None:
        """Keep a small string with a live session (nothing if it has ended)."""

    @abstractmethod
    async def notes(self, session_id: str) -> dict[str, str]:
        """What `note` kept for a session."""

    @abstractmethod
    async def find(self, token: str) -> SessionRecord | None:
        """The session a resume token belongs to, or None."""

    @abstractmethod
    async def update(self, record: SessionRecord) -> None: ...

    @abstractmethod
    async def delete(self, session_id: str) -> None: ...

    @abstractmethod
    async def count_client(self, client: str) -> int:
        """Live sessions opened from one client address."""

    @abstractmethod
    async def attach(self, session_id: str, sink: str) -> str:
        """Make `sink` (which node and socket) the session's client; the sink it
        replaced, or "" if it had none."""

    @abstractmethod
    async def detach(self, session_id: str, sink: str, when: float) -> None:
        """`sink` went away at `when` (a UNIX time), unless another has taken over."""

    @abstractmethod
    async def attachment(self, session_id: str) -> tuple[str, float | None]:
        """The session's sink ("" if none), and since when it has had none."""

    @abstractmethod
    async def append(self, session_id: str, events: Sequence[tuple[str, Any, int]], after: int | None) -> int:
        """Add events, each `(event, data, size in bytes)`, to the session's log in one
        step and return the seq of the first (they get consecutive seqs: 1, 2, 3 ...
        over the session's life). The oldest entries go once the log is over its
        limits; the newest always stays.

        `after` is the newest seq the caller has logged. If the log's newest is not
        that, or the session is not there at all, writes were lost: LogLost, and
        nothing is appended. None appends wherever the log is (a writer that does not
        own the log, telling of its kernel host's death)."""

    @abstractmethod
    async def restore(self, record: SessionRecord, last: int) -> None:
        """Put back a session whose log lost writes: `record` as given (with a new
        epoch), and an empty log whose next seq is `last` + 1."""

    @abstractmethod
    async def read(self, session_id: str, after: int) -> LogRead:
        """Every held entry with seq > after, oldest first."""

    async def close(self) -> None:
        return None
