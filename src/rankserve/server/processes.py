"""The processes of a running tritonserver, read from ``/proc``: its Python-backend stubs and their
shared-memory regions.

Triton 2.51 does not notice a stub that died until a request reaches it (the request then fails
with "Stub process ... is not healthy") and keeps reporting the model ready, so the supervisor in
``rankserve serve`` watches the stubs itself. A server killed outright leaves its stubs' regions
in ``/dev/shm``; :func:`remove_shm_regions` removes exactly those the server's stubs used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

STUB_BINARY = "triton_python_backend_stub"
SHM_PREFIX = "triton_python_backend_shm_region"


@dataclass(frozen=True)
class StubProcess:
    pid: int
    model: str
    instance: str
    shm_region: str


def parse_stub_args(pid: int, args: list[str]) -> StubProcess | None:
    """A stub from its command line (``stub model.py shm_region ... instance_name ...``), or None."""
    if not args or not args[0].endswith(STUB_BINARY):
        return None
    region = next((a for a in args[1:] if a.startswith(SHM_PREFIX)), "")
    model = Path(args[1]).parent.parent.name if len(args) > 1 else ""
    instance = args[8] if len(args) > 8 else model
    return StubProcess(pid, model, instance, region)


def _stat(pid: int, proc: Path) -> tuple[str, int, int, str] | None:
    """(state, parent pid, process group, command name) of ``pid``, or None when it is gone."""
    try:
        text = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    return fields[0], int(fields[1]), int(fields[2]), text[text.index("(") + 1:text.rindex(")")]


def group_pids(pgid: int, proc: Path = Path("/proc")) -> list[int]:
    """Live processes of process group ``pgid`` (the embedded server leads its own: server and stubs)."""
    pids = []
    for entry in proc.iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name), proc)
            if stat is not None and stat[2] == pgid and stat[0] not in ("Z", "X"):
                pids.append(int(entry.name))
    return pids


def alive(pid: int, proc: Path = Path("/proc")) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    stat = _stat(pid, proc)
    return stat is not None and stat[0] not in ("Z", "X")


def _cmdline(pid: int, proc: Path) -> list[str] | None:
    """The command line of ``pid`` (empty arguments dropped), or None when it cannot be read."""
    try:
        return [a for a in (proc / str(pid) / "cmdline").read_bytes().decode(errors="replace").split("\0") if a]
    except OSError:
        return None


def children(pid: int, proc: Path = Path("/proc")) -> list[int]:
    """The live child processes of ``pid``."""
    out = []
    for entry in proc.iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name), proc)
            if stat is not None and stat[1] == pid and stat[0] not in ("Z", "X"):
                out.append(int(entry.name))
    return sorted(out)


def stub_processes(server_pid: int, proc: Path = Path("/proc")) -> list[StubProcess]:
    """The live Python-backend stubs of the tritonserver process ``server_pid`` (its children)."""
    stubs = []
    for pid in children(server_pid, proc):
        stub = parse_stub_args(pid, _cmdline(pid, proc) or [])
        if stub is not None:
            stubs.append(stub)
    return sorted(stubs, key=lambda s: s.instance)


def tritonserver_repositories(pid: int, proc: Path = Path("/proc")) -> list[str]:
    """The ``--model-repository`` paths of ``pid`` when it is a live tritonserver, else []."""
    stat = _stat(pid, proc)
    if stat is None or stat[3] != "tritonserver" or stat[0] in ("Z", "X"):
        return []
    return [a.split("=", 1)[1] for a in _cmdline(pid, proc) or [] if a.startswith("--model-repository=")]


def server_pids(model_repository: str | Path, proc: Path = Path("/proc")) -> list[int]:
    """The running ``tritonserver`` processes serving ``model_repository``."""
    wanted = Path(model_repository).resolve()
    return sorted(int(e.name) for e in proc.iterdir() if e.name.isdigit()
                  and any(Path(r).resolve() == wanted for r in tritonserver_repositories(int(e.name), proc)))


def dead_stubs(stubs: list[StubProcess], proc: Path = Path("/proc")) -> list[StubProcess]:
    return [s for s in stubs if not alive(s.pid, proc)]


def remove_shm_regions(regions: list[str], shm: Path = Path("/dev/shm")) -> list[str]:
    """Unlink the named regions still present in ``shm``; the names removed."""
    removed = []
    for name in regions:
        if not name.startswith(SHM_PREFIX) or "/" in name:
            continue
        try:
            (shm / name).unlink()
            removed.append(name)
        except FileNotFoundError:
            pass
    return removed


_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp


def listening_inodes(port: int, proc: Path = Path("/proc")) -> set[str]:
    """The socket inodes listening on TCP ``port`` (any address, IPv4 or IPv6), from ``/proc/net/tcp*``."""
    inodes = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (proc / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == _LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def listening_pid(port: int, proc: Path = Path("/proc")) -> int | None:
    """The process of this user listening on TCP ``port``, or None when it cannot be told (no
    listener, or another user's process: its descriptors are not readable)."""
    wanted = {f"socket:[{inode}]" for inode in listening_inodes(port, proc)}
    if not wanted:
        return None
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd) in wanted:
                    return int(entry.name)
            except OSError:
                continue
    return None


def port_owner(port: int, proc: Path = Path("/proc")) -> str | None:
    """``pid N (command line)`` of the process of this user listening on TCP ``port``, or None
    (:func:`listening_pid`)."""
    pid = listening_pid(port, proc)
    if pid is None:
        return None
    words = " ".join(_cmdline(pid, proc) or []).split()
    shown = " ".join([Path(words[0]).name, *words[1:]]) if words else "?"
    return f"pid {pid} ({shown[:80]}{'...' if len(shown) > 80 else ''})"


def served_repository(port: int, proc: Path = Path("/proc")) -> tuple[int, str] | None:
    """(tritonserver pid, model repository) of the server listening on ``port`` of this host: the
    tritonserver itself, or the one ``rankserve serve`` runs behind its proxy on that port."""
    pid = listening_pid(port, proc)
    if pid is None:
        return None
    for candidate in [pid, *children(pid, proc)]:
        repos = tritonserver_repositories(candidate, proc)
        if repos:
            return candidate, repos[0]
    return None
