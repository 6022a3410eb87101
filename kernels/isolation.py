"""The Linux primitives that fence a kernel in, and a probe of which this host allows.

Everything here runs in the fork server or in a freshly forked kernel before any user
code: namespaces (`unshare` through ctypes, since Python 3.11 has no `os.unshare`),
mounts, resource limits, dropping to an unprivileged uid, and a seccomp filter.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import resource
import socket
from dataclasses import asdict, dataclass
from typing import Any

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWCGROUP = 0x02000000
KERNEL_NAMESPACES = CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS  # always together

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
    1,
    2,
    4,
    8,
    32,
    4096,
    16384,
    1 << 18,
)
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
MNT_DETACH = 2
# statvfs flags of a mount, and the mount flags a remount inside a user namespace must
# keep (the kernel locks them on a mount made by a more privileged namespace).
_LOCKED = {2: MS_NOSUID, 4: MS_NODEV, 8: MS_NOEXEC, 1024: MS_NOATIME, 2048: MS_NODIRATIME, 4096: MS_RELATIME}
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}.get(os.uname().machine, 155)
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def mount(source: str, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(
        _libc.mount(
            source.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {target}",
    )


def prctl(option: int, value: int) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0), "prctl")


def enter_user_namespace(flags: int) -> None:
    """Without root: a user namespace that maps only our own uid and gid (so the files a
    kernel writes are still the server user's), with the other namespaces in `flags`
    owned by it. It grants capabilities inside those namespaces only."""
    uid, gid = os.getuid(), os.getgid()
    unshare(CLONE_NEWUSER | flags)
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)


def enter_namespaces(flags: int, userns: bool) -> None:
    """The namespaces in `flags`, owned by a user namespace of our own without root."""
    if userns:
        enter_user_namespace(flags)
    elif flags:
        unshare(flags)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_capabilities() -> None:
    """Every capability, in every set: a kernel in its own user namespace holds them all
    there until now."""
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(header), data), "capset")


@dataclass(frozen=True)
class Limits:
    """Per-kernel limits. Sizes in bytes; 0 switches one off."""

    cpu_seconds: int = 600  # RLIMIT_CPU: SIGXCPU at the soft limit, SIGKILL 5 s later
    address_space: int = 4 << 30  # RLIMIT_AS: allocations past it raise MemoryError
    file_size: int = 64 << 20  # RLIMIT_FSIZE: a write past it fails with EFBIG
    processes: int = 64  # RLIMIT_NPROC, counted per uid (threads too): only with a uid pool
    open_files: int = 256  # RLIMIT_NOFILE
    memory: int = 1 << 30  # cgroup memory limit (RSS + page cache): the OOM killer acts past it
    pids: int = 128  # cgroup pids limit
    cpus: float = 1.0  # cgroup CPU quota, in CPUs
    tmp_size: int = 64 << 20  # each private tmpfs (/tmp, /var/tmp, /dev/shm)
    disk: int = 256 << 20  # the working directory's own tmpfs: bytes...
    inodes: int = 20_000  # ...and files and directories


# Every fence a kernel can have, and what kernel code can do where it is missing: the
# start-up WARNING and /health say this, so that an operator knows what a node lets
# untrusted code do.
FENCES: dict[str, str] = {
    "fork_server": "run as a plain process of the server's user, with no fence at all",
    "uid_per_kernel": "read and change other kernels' files, and anything of the server's user it can reach",
    "pid_namespace": "see the host's processes, signal the server's, and read their /proc entries",
    "mount_namespace": "share /tmp, /var/tmp and /dev/shm with the host and other kernels",
    "filesystem_view": "read the server's files, the data directory and whatever else of the host its user may",
    "disk_quota": "fill the host's disk and inodes through its working directory",
    "egress_rules": "reach the cloud metadata address and every address of the node, its own ports included",
    "ipc_namespace": "use the host's System V shared memory, semaphores and message queues",
    "network_namespace": "reach the network, the node's own ports included",
    "cgroup_memory": "use memory up to its address-space limit per process, with no cap across its processes",
    "cgroup_swap": "use swap past its memory limit",
    "cgroup_pids": "start processes up to its rlimit only, which without a uid of its own is the server's count",
    "cgroup_cpu": "use every core of the node",
    "seccomp": "call mount, unshare, ptrace, bpf, io_uring, keyrings and the other interfaces the filter refuses",
}


@dataclass(frozen=True)
class Isolation:
    """What the fork server applies to each kernel: asked for, then cut to what the host allows."""

    uids: tuple[int, int] | None = None  # inclusive range; None: kernels keep the server's uid
    user_namespace: bool = False  # without root: the namespaces below are owned by one of the kernel's own
    filesystem_view: bool = False  # only the system, Python and its own home, after a pivot_root
    pid_namespace: bool = False
    mount_namespace: bool = False  # private /proc, /tmp, /var/tmp, /dev/shm
    network_namespace: bool = False
    ipc_namespace: bool = False
    cgroups: tuple[str, ...] = ()  # controllers in force, their limits read back: memory, swap, pids, cpu
    seccomp: bool = False
    network_wanted: bool = True  # --network-isolation: without it no network namespace is asked for
    disk_quota: bool = False  # the working directory is a size- and inode-limited tmpfs
    egress_rules: bool = False  # without network isolation: nftables rules on the kernels' uids

    @property
    def fences(self) -> dict[str, bool]:
        """Each fence that was asked for, and whether it holds."""
        held = {
            "fork_server": True,
            "uid_per_kernel": self.uids is not None,
            "pid_namespace": self.pid_namespace,
            "mount_namespace": self.mount_namespace,
            "filesystem_view": self.filesystem_view,
            "disk_quota": self.disk_quota,
            "ipc_namespace": self.ipc_namespace,
            "cgroup_memory": "memory" in self.cgroups,
            "cgroup_swap": "swap" in self.cgroups,
            "cgroup_pids": "pids" in self.cgroups,
            "cgroup_cpu": "cpu" in self.cgroups,
            "seccomp": self.seccomp,
        }
        if self.network_wanted:
            held["network_namespace"] = self.network_namespace
        else:  # the host's network, fenced by the host's firewall where root allows
            held["egress_rules"] = self.egress_rules
        return held

    @property
    def enabled(self) -> bool:
        return bool(self.uids or self.pid_namespace or self.seccomp)

    @property
    def namespace_flags(self) -> int:
        flags = KERNEL_NAMESPACES if self.pid_namespace else 0
        return flags | (CLONE_NEWNET if self.network_namespace else 0)

    def report(self) -> dict[str, Any]:
        out = asdict(self)
        del out["network_wanted"]
        out["enabled"] = self.enabled
        out["uids"] = f"{self.uids[0]}-{self.uids[1]}" if self.uids else None
        out["cgroups"] = list(self.cgroups)
        out["fences"] = fences = self.fences
        out["missing"] = [name for name, held in fences.items() if not held]
        out["level"] = level(out["missing"], self.enabled)
        return out


def level(missing: list[str], enabled: bool) -> str:
    """`full` when every fence asked for holds, `none` when none does, else `partial`."""
    if not enabled or "fork_server" in missing:
        return "none"
    return "partial" if missing else "full"


def warning(report: dict[str, Any]) -> str | None:
    """The one start-up WARNING for a node that is not fully isolated: what its kernels can do."""
    if report["level"] == "full":
        return None
    can = "; ".join(FENCES[name] for name in report["missing"] if name in FENCES)
    why = "; ".join(report.get("notes", []))
    return (
        f"kernel isolation is {report['level']}: missing {', '.join(report['missing'])} ({why}). "
        f"Kernel code can {can}. Do not serve untrusted users from this node."
    )


def set_limits(limits: Limits, with_uid_pool: bool) -> None:
    """Soft and hard limits alike, so the kernel cannot raise them again."""
    pairs = [
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_AS, limits.address_space),
        (resource.RLIMIT_FSIZE, limits.file_size),
        (resource.RLIMIT_NOFILE, limits.open_files),
    ]
    if with_uid_pool:  # per uid: without a uid of its own it would count the server's processes
        pairs.append((resource.RLIMIT_NPROC, limits.processes))
    for which, value in pairs:
        if value:
            resource.setrlimit(which, (value, value))
    if limits.cpu_seconds:
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 5))


def drop_privileges(uid: int) -> None:
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)


def private_mounts(keep: list[str], tmp_size: int) -> None:
    """In a fresh mount and PID namespace: a /proc that shows only this kernel's processes
    and empty, size-bounded /tmp, /var/tmp and /dev/shm that die with it. The paths in
    `keep` (the kernel's own directory, the Python installation) stay reachable even
    when they lie under one of those."""
    mount("none", "/", None, MS_REC | MS_PRIVATE)
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    fds = {path: os.open(path, os.O_PATH | os.O_DIRECTORY) for path in keep if os.path.isdir(path)}
    try:
        for target in ("/tmp", "/var/tmp", "/dev/shm"):
            if not os.path.isdir(target):
                continue
            mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, f"size={tmp_size},mode=1777")
            for path, fd in fds.items():
                if os.path.commonpath([path, target]) == target:
                    os.makedirs(path, mode=0o755, exist_ok=True)
                    mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
    finally:
        for fd in fds.values():
            os.close(fd)


def _bind(source: str, target: str, readonly: bool) -> None:
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "a"):
            pass
    mount(source, target, None, MS_BIND | MS_REC)
    if readonly:
        locked = 0
        flags = os.statvfs(source).f_flag
        for st, ms in _LOCKED.items():
            if flags & st:
                locked |= ms
        mount("none", target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | locked)


def restricted_view(home: str, readonly: list[str], limits: Limits, owner: int | None) -> None:
    """Make the kernel's whole filesystem what it needs and nothing else, then pivot into
    it: the system's programs and libraries and the Python installation read-only, its
    own home read-write, fresh /tmp, /var/tmp and /dev/shm, a few devices and its own
    /proc. The server's files, the data directory, other kernels' homes and their
    connection files are not in it. Runs in the kernel's own mount and PID namespaces,
    before it drops its privileges."""
    new = "/tmp/.cellgate-view"  # /tmp is this kernel's private tmpfs already
    os.makedirs(new, exist_ok=True)
    mount("tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    # The private tmpfs first: a kernel home or a Python under /tmp is bound on top.
    for target in ("/tmp", "/var/tmp", "/dev/shm"):
        os.makedirs(new + target, exist_ok=True)
        options = f"size={limits.tmp_size},nr_inodes={limits.inodes or 1_000_000},mode=1777"
        mount("tmpfs", new + target, "tmpfs", MS_NOSUID | MS_NODEV, options)
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):  # merged /usr: keep the link, the target is bound below
            os.symlink(os.readlink(top), new + top)
        elif os.path.isdir(top):
            _bind(top, new + top, readonly=True)
    for path in ("/usr", "/etc", *readonly):
        if os.path.exists(path):
            _bind(path, new + path, readonly=True)
    _bind(home, new + home, readonly=False)
    if limits.disk:
        # The working directory is a tmpfs of its own: the host enforces its bytes and
        # inodes (and, as root, charges its pages to the kernel's memory cgroup). The
        # gateway reaches it through the kernel's root (see kernels/workdir.py).
        uid = os.getuid() if owner is None else owner
        options = f"size={limits.disk},nr_inodes={limits.inodes},mode=0700,uid={uid},gid={uid}"
        mount("tmpfs", new + home + "/work", "tmpfs", MS_NOSUID | MS_NODEV, options)
    for device in ("null", "zero", "full", "random", "urandom", "tty"):
        if os.path.exists(f"/dev/{device}"):
            _bind(f"/dev/{device}", f"{new}/dev/{device}", readonly=False)
    os.makedirs(new + "/proc", exist_ok=True)
    mount("proc", new + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.chdir(new)
    # pivot_root(".", "."): the old root ends up stacked under the new one, and is
    # detached at once; nothing of it stays reachable.
    _check(_libc.syscall(SYS_PIVOT_ROOT, b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", MNT_DETACH), "umount old root")
    os.chdir("/")


SECCOMP_DENIED = (
    "unshare",
    "setns",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "bpf",
    "keyctl",
    "add_key",
    "request_key",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "userfaultfd",
    "perf_event_open",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "open_by_handle_at",
    "kexec_load",
    "init_module",
    "finit_module",
    "delete_module",
    "fanotify_init",
    "move_mount",
    "fsopen",
    "fsmount",
    "open_tree",
    "fspick",
    "fsconfig",
    "mount_setattr",
    "kexec_file_load",
    "pidfd_getfd",
    "process_madvise",
)
PERSONA_QUERY = 0xFFFFFFFF  # personality(0xffffffff) reads the persona and changes nothing


def compile_seccomp(unix_sockets_only: bool) -> bytes:
    """The filter as a BPF program, built once in the fork server: compiling costs about
    10 ms, loading the result in each kernel almost nothing.

    What it refuses (EPERM), a kernel never needs: namespaces in any form, ptrace and
    other processes' memory or descriptors, bpf, keyrings, io_uring, userfaultfd, perf
    events, mounts in every API, kexec, kernel modules, and personas other than Linux's."""
    import tempfile

    import pyseccomp as sc

    f = sc.SyscallFilter(sc.ALLOW)
    eperm = sc.ERRNO(errno.EPERM)
    for name in SECCOMP_DENIED:
        f.add_rule(eperm, name)
    # clone with any namespace flag; clone3 passes its flags in memory seccomp cannot
    # read, so it answers ENOSYS and glibc falls back to clone.
    for flag in (CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET, CLONE_NEWCGROUP):
        f.add_rule(eperm, "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    # personality: only the default persona (0) and the query. A rule compares an
    # argument once, so "neither 0 nor all ones" is said as "two adjacent bits differ"
    # (or a bit above 32 is set): one rule per pair of bits.
    f.add_rule(eperm, "personality", sc.Arg(0, sc.GT, PERSONA_QUERY))
    for bit in range(31):
        for differ in (1 << bit, 2 << bit):
            f.add_rule(eperm, "personality", sc.Arg(0, sc.MASKED_EQ, 3 << bit, differ))
    if unix_sockets_only:
        # EOPNOTSUPP, not EPERM: libzmq treats EPERM from getifaddrs as a bug and aborts,
        # and takes EOPNOTSUPP as "no such interface".
        f.add_rule(sc.ERRNO(errno.EOPNOTSUPP), "socket", sc.Arg(0, sc.NE, socket.AF_UNIX))
    with tempfile.TemporaryFile() as out:
        f.export_bpf(out)
        out.seek(0)
        return out.read()


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2


def load_seccomp(program: bytes) -> None:
    """The last step before user code. NO_NEW_PRIVS first: the kernel requires it of an
    unprivileged filter, and it keeps setuid binaries from granting anything."""
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0), "seccomp")


def _try_in_child(action: Any) -> bool:
    """Run `action` in a throwaway child, so that probing changes nothing here."""
    pid = os.fork()
    if pid == 0:
        try:
            action()
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def _namespaces_work(flags: int, userns: bool) -> None:
    """Make the namespaces a kernel gets and mount what its PID 1 mounts (a host may
    allow the one and refuse the other)."""
    enter_namespaces(flags, userns)
    pid = os.fork()
    if pid == 0:
        try:
            mount("none", "/", None, MS_REC | MS_PRIVATE)
            mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
            mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "size=1m")
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise OSError("the namespaces could not be set up")


def probe(
    wanted: bool, network: bool, uids: tuple[int, int] | None, controllers: tuple[str, ...], limits: Limits
) -> tuple[Isolation, list[str], bytes]:
    """What of the wanted isolation this host gives, a note for each part it does not,
    and the seccomp program when seccomp is in."""
    if not wanted:
        return Isolation(network_wanted=network), ["isolation is switched off (--isolation off)"], b""
    notes: list[str] = []
    root = os.geteuid() == 0
    flags = KERNEL_NAMESPACES
    if root:
        userns = False
        ns = _try_in_child(lambda: _namespaces_work(flags, False))
        if not ns:
            notes.append("the host refuses PID, mount and IPC namespaces")
    else:
        notes.append("not running as root: no uid per kernel, no cgroups (memory and processes rest on rlimits)")
        userns = ns = _try_in_child(lambda: _namespaces_work(flags, True))
        if not ns:
            notes.append("the host refuses unprivileged user namespaces: no namespaces and no private filesystem")
    net = bool(network and ns and _try_in_child(lambda: _namespaces_work(flags | CLONE_NEWNET, userns)))
    if network and ns and not net:
        notes.append("the host refuses network namespaces")
    program = b""
    try:
        program = compile_seccomp(net)
        seccomp = _try_in_child(lambda: load_seccomp(program))
    except (ImportError, RuntimeError, OSError) as exc:
        seccomp = False
        notes.append(f"no seccomp: {exc}")
    if not seccomp and not any(n.startswith("no seccomp") for n in notes):
        notes.append("no seccomp: the filter did not load")
    iso = Isolation(
        uids=uids if root else None,
        user_namespace=userns,
        filesystem_view=ns,
        pid_namespace=ns,
        mount_namespace=ns,
        network_namespace=net,
        ipc_namespace=ns,
        cgroups=controllers,
        seccomp=seccomp,
        network_wanted=network,
        disk_quota=ns and limits.disk > 0,
    )
    return iso, notes, program if seccomp else b""
