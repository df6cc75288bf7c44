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


def stub_processes(server_pid: int, proc: Path = Path("/proc")) -> list[StubProcess]:
    """The live Python-backend stubs of the tritonserver process ``server_pid`` (its children)."""
    stubs = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        stat = _stat(int(entry.name), proc)
        if stat is None or stat[1] != server_pid or stat[0] in ("Z", "X"):
            continue
        try:
            args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        stub = parse_stub_args(int(entry.name), [a for a in args if a])
        if stub is not None:
            stubs.append(stub)
    return sorted(stubs, key=lambda s: s.instance)


def server_pids(model_repository: str | Path, proc: Path = Path("/proc")) -> list[int]:
    """The running ``tritonserver`` processes serving ``model_repository``."""
    wanted = Path(model_repository).resolve()
    pids = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        stat = _stat(int(entry.name), proc)
        if stat is None or stat[3] != "tritonserver" or stat[0] in ("Z", "X"):
            continue
        try:
            args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        repos = [a.split("=", 1)[1] for a in args if a.startswith("--model-repository=")]
        if any(Path(r).resolve() == wanted for r in repos):
            pids.append(int(entry.name))
    return sorted(pids)


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


def port_owner(port: int, proc: Path = Path("/proc")) -> str | None:
    """``pid N (command line)`` of a process of this user listening on TCP ``port``, or None when
    it cannot be told (no listener, or another user's process: its descriptors are not readable)."""
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
                    args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
                    words = " ".join(args).split()
                    shown = " ".join([Path(words[0]).name, *words[1:]]) if words else "?"
                    return f"pid {entry.name} ({shown[:80]}{'...' if len(shown) > 80 else ''})"
            except OSError:
                continue
    return None
