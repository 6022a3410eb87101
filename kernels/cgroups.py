"""Per-kernel cgroups for memory, pids and CPU, on cgroup v1 or v2, controller by controller.

Hosts differ: some mount everything as v2, some (this kind of VM among them) offer the
pids and memory controllers only on v1 hierarchies. Each controller is used where the
host has it; kernel cgroups sit under the fork server's own cgroup of that hierarchy,
so an operator's limit on the server bounds all its kernels too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass

from kernels.isolation import Limits

CONTROLLERS = ("memory", "pids", "cpu")


def _mounts() -> tuple[str | None, dict[str, str]]:
    """The cgroup2 mount point, and each v1 controller's mount point."""
    v2, v1 = None, {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            mountpoint = left.split()[4]
            fstype, _source, options = right.split()[:3]
            if fstype == "cgroup2" and v2 is None:
                v2 = mountpoint
            elif fstype == "cgroup":
                for option in options.split(","):
                    if option in CONTROLLERS:
                        v1.setdefault(option, mountpoint)
    return v2, v1


def _own_paths() -> tuple[str | None, dict[str, str]]:
    """This process's cgroup path in the v2 hierarchy and in each v1 controller's."""
    v2, v1 = None, {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            hierarchy, controllers, path = line.rstrip("\n").split(":", 2)
            if hierarchy == "0":
                v2 = path
            for name in controllers.split(","):
                if name in CONTROLLERS:
                    v1[name] = path
    return v2, v1


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


@dataclass(frozen=True)
class Place:
    controller: str
    base: str  # the directory kernel cgroups are made in
    v2: bool


class Cgroups:
    """Where this host lets us make kernel cgroups; `places` is empty where it lets us make none."""

    def __init__(self, wanted: tuple[str, ...] = CONTROLLERS) -> None:
        self.places: list[Place] = []
        self.notes: list[str] = []
        try:
            v2_mount, v1_mounts = _mounts()
            v2_path, v1_paths = _own_paths()
        except OSError as exc:
            self.notes.append(f"no cgroups: {exc}")
            return
        for controller in wanted:
            place = self._find(controller, v2_mount, v2_path, v1_mounts, v1_paths)
            if place is None:
                self.notes.append(f"no writable {controller} cgroup controller")
            else:
                self.places.append(place)

    def _find(
        self, controller: str, v2_mount: str | None, v2_path: str | None, v1_mounts: dict, v1_paths: dict
    ) -> Place | None:
        if v2_mount and v2_path is not None:
            own = os.path.join(v2_mount, v2_path.lstrip("/"))
            with contextlib.suppress(OSError):
                with open(os.path.join(own, "cgroup.controllers")) as f:
                    available = f.read().split()
                if controller in available:
                    # v2 allows controllers on children only when enabled here, and
                    # refuses that while this cgroup holds processes (unless it is the
                    # root): a delegated cgroup with no processes of its own is needed.
                    _write(os.path.join(own, "cgroup.subtree_control"), f"+{controller}")
                    return self._usable(Place(controller, os.path.join(own, "cellgate"), True))
        if controller in v1_mounts and controller in v1_paths:
            own = os.path.join(v1_mounts[controller], v1_paths[controller].lstrip("/"))
            return self._usable(Place(controller, os.path.join(own, "cellgate"), False))
        return None

    @staticmethod
    def _usable(place: Place) -> Place | None:
        try:
            os.makedirs(place.base, exist_ok=True)
            probe = os.path.join(place.base, f"probe-{os.getpid()}")
            os.mkdir(probe)
            os.rmdir(probe)
        except OSError:
            return None
        if place.v2:
            with contextlib.suppress(OSError):
                _write(os.path.join(place.base, "cgroup.subtree_control"), f"+{place.controller}")
        return place

    @property
    def controllers(self) -> tuple[str, ...]:
        return tuple(p.controller for p in self.places)

    def verify(self, limits: Limits) -> tuple[tuple[str, ...], list[str]]:
        """The fences that hold, found by making a cgroup with `limits` and reading every
        limit back (a write a host accepts is not always one it applies): names among
        memory, swap, pids and cpu, and a note for each that does not hold."""
        held: list[str] = []
        notes: list[str] = []
        try:
            group = self.create(f"probe-{os.getpid()}", limits)
        except OSError as exc:
            return (), [f"kernel cgroups cannot be made: {exc}"]
        try:
            for place, path in group.paths:
                for name, ok in _read_back(place, path, limits).items():
                    if ok:
                        held.append(name)
                    else:
                        notes.append(f"the {name} limit does not hold in cgroups")
        finally:
            group.remove()
        return tuple(held), notes

    def create(self, name: str, limits: Limits) -> KernelCgroup:
        group = KernelCgroup([(p, os.path.join(p.base, name)) for p in self.places])
        for place, path in group.paths:
            os.makedirs(path, exist_ok=True)
            _limit(place, path, limits)
        return group


def _limit(place: Place, path: str, limits: Limits) -> None:
    c = place.controller
    if c == "memory" and limits.memory:
        if place.v2:
            _write(os.path.join(path, "memory.max"), str(limits.memory))
            with contextlib.suppress(OSError):
                _write(os.path.join(path, "memory.swap.max"), "0")
        else:
            _write(os.path.join(path, "memory.limit_in_bytes"), str(limits.memory))
            with contextlib.suppress(OSError):  # no swap accounting on many hosts
                _write(os.path.join(path, "memory.memsw.limit_in_bytes"), str(limits.memory))
    elif c == "pids" and limits.pids:
        _write(os.path.join(path, "pids.max"), str(limits.pids))
    elif c == "cpu" and limits.cpus:
        period = 100_000
        quota = int(limits.cpus * period)
        if place.v2:
            _write(os.path.join(path, "cpu.max"), f"{quota} {period}")
        else:
            _write(os.path.join(path, "cpu.cfs_period_us"), str(period))
            _write(os.path.join(path, "cpu.cfs_quota_us"), str(quota))


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _host_has_swap() -> bool:
    with open("/proc/swaps") as f:
        return len(f.read().splitlines()) > 1  # a header, then one line per swap area


def _read_back(place: Place, path: str, limits: Limits) -> dict[str, bool]:
    c, page = place.controller, os.sysconf("SC_PAGE_SIZE")
    if c == "memory":
        if not limits.memory:
            return {"memory": False, "swap": False}
        want = limits.memory // page * page
        if place.v2:
            memory = _read(os.path.join(path, "memory.max")) == str(want)
            swap = _read(os.path.join(path, "memory.swap.max")) == "0"
        else:
            memory = _read(os.path.join(path, "memory.limit_in_bytes")) == str(want)
            swap = _read(os.path.join(path, "memory.memsw.limit_in_bytes")) == str(want)
        return {"memory": memory, "swap": memory and (swap or not _host_has_swap())}
    if c == "pids":
        return {"pids": bool(limits.pids) and _read(os.path.join(path, "pids.max")) == str(limits.pids)}
    quota = str(int(limits.cpus * 100_000))
    if place.v2:
        cpu = _read(os.path.join(path, "cpu.max")).split()[:1] == [quota]
    else:
        cpu = _read(os.path.join(path, "cpu.cfs_quota_us")) == quota
    return {"cpu": bool(limits.cpus) and cpu}


@dataclass
class KernelCgroup:
    paths: list[tuple[Place, str]]

    def open_procs(self) -> list[int]:
        """The groups' `cgroup.procs`, opened now for a join later: a kernel that pivots
        into its own filesystem view takes its reaper's view of /sys with it."""
        return [os.open(os.path.join(path, "cgroup.procs"), os.O_WRONLY) for _, path in self.paths]

    @staticmethod
    def join_by(fd: int, pid: int) -> None:
        try:
            os.write(fd, str(pid).encode())
        finally:
            os.close(fd)

    def pids(self) -> set[int]:
        found: set[int] = set()
        for _, path in self.paths:
            with contextlib.suppress(OSError), open(os.path.join(path, "cgroup.procs")) as f:
                found.update(int(line) for line in f if line.strip())
        return found

    def oom_killed(self) -> bool:
        for place, path in self.paths:
            if place.controller != "memory":
                continue
            name = "memory.events" if place.v2 else "memory.oom_control"
            with contextlib.suppress(OSError), open(os.path.join(path, name)) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill" and int(value) > 0:
                        return True
        return False

    def remove(self) -> None:
        """Kill whatever is still inside, then remove the groups. Bounded: a process the
        kernel cannot stop from dying is gone within a few rounds."""
        for place, path in self.paths:
            if place.v2:
                with contextlib.suppress(OSError):
                    _write(os.path.join(path, "cgroup.kill"), "1")
        for _ in range(100):
            left = self.pids()
            if not left:
                break
            for pid in left:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)
        for _, path in self.paths:
            for _ in range(50):
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError:  # EBUSY while the last processes finish dying
                    time.sleep(0.01)
