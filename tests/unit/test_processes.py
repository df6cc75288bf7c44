"""Reading a tritonserver's stubs from /proc, and the restart budget of ``rankserve serve``."""

from pathlib import Path

from rankserve.server.processes import (SHM_PREFIX, alive, parse_stub_args, port_owner, remove_shm_regions, served_repository,
                                        server_pids, stub_processes)
from rankserve.server.supervisor import RestartBudget

# as ps shows a Triton 2.51 stub (measured)
STUB_ARGS = ["/tmp/x/backends/python/triton_python_backend_stub", "/repo/rank/1/model.py",
             f"{SHM_PREFIX}_64eb5a50-5df7", "1048576", "1048576", "2398", "/tmp/x/backends/python", "336", "rank_0_0", "DEFAULT"]


def test_a_stub_command_line_names_model_instance_and_region():
    stub = parse_stub_args(7, STUB_ARGS)
    assert (stub.pid, stub.model, stub.instance, stub.shm_region) == (7, "rank", "rank_0_0", f"{SHM_PREFIX}_64eb5a50-5df7")
    assert parse_stub_args(8, ["/usr/bin/tritonserver", "--model-repository=/repo"]) is None


def _proc(root: Path, pid: int, state: str, ppid: int, args: list[str], comm: str = "triton_python_b") -> None:
    d = root / str(pid)
    d.mkdir(parents=True)
    (d / "stat").write_text(f"{pid} ({comm}) {state} {ppid} {ppid} {ppid} 0 -1 4194304 0\n")
    (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in args) + b"\0")


def test_stubs_are_the_servers_children_and_zombies_are_dead(tmp_path):
    _proc(tmp_path, 10, "S", 1, ["/bin/tritonserver", "--model-repository=/models"], comm="tritonserver")
    _proc(tmp_path, 20, "S", 1, ["/bin/tritonserver", "--model-repository=/elsewhere"], comm="tritonserver")
    _proc(tmp_path, 11, "S", 10, STUB_ARGS)
    _proc(tmp_path, 12, "Z", 10, STUB_ARGS[:8] + ["tokenize_0_0", "DEFAULT"])
    _proc(tmp_path, 13, "S", 99, STUB_ARGS, comm="a (weird) name")
    (tmp_path / "self").mkdir()
    assert [s.pid for s in stub_processes(10, tmp_path)] == [11]
    assert alive(11, tmp_path) and not alive(12, tmp_path) and not alive(14, tmp_path)
    assert [s.pid for s in stub_processes(99, tmp_path)] == [13]  # a command name with spaces and parentheses
    assert server_pids("/models", tmp_path) == [10] and server_pids("/other", tmp_path) == []


def _listen(root: Path, pid: int, port: int, inode: int) -> None:
    """``pid`` holds a socket listening on ``port`` (as /proc/net/tcp and /proc/PID/fd show it)."""
    net = root / "net"
    net.mkdir(exist_ok=True)
    head = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
    table = net / "tcp"
    rows = table.read_text() if table.exists() else head
    table.write_text(rows + f"   0: 0100007F:{port:04X} 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 {inode}\n")
    fd = root / str(pid) / "fd"
    fd.mkdir(exist_ok=True)
    (fd / "3").symlink_to(f"socket:[{inode}]")


def test_the_owner_and_repository_of_a_port_are_read_from_the_listener_or_the_server_behind_its_proxy(tmp_path):
    _proc(tmp_path, 30, "S", 1, ["/venv/bin/python", "-m", "rankserve", "serve", "--model-repository", "/models"], comm="python")
    _proc(tmp_path, 31, "S", 30, ["/bin/tritonserver", "--model-repository=/models", "--http-port=40000"], comm="tritonserver")
    _proc(tmp_path, 32, "S", 31, STUB_ARGS)
    _proc(tmp_path, 40, "S", 1, ["/bin/tritonserver", "--model-repository=/direct"], comm="tritonserver")
    _proc(tmp_path, 50, "S", 1, ["/usr/bin/nc", "-l", "9000"], comm="nc")
    _listen(tmp_path, 30, 8000, 111)  # serve's proxy holds the public port
    _listen(tmp_path, 40, 8100, 222)
    _listen(tmp_path, 50, 9000, 333)
    assert port_owner(8000, tmp_path) == "pid 30 (python -m rankserve serve --model-repository /models)"
    assert served_repository(8000, tmp_path) == (31, "/models")  # the tritonserver behind the proxy
    assert served_repository(8100, tmp_path) == (40, "/direct")
    assert served_repository(9000, tmp_path) is None and port_owner(9000, tmp_path) == "pid 50 (nc -l 9000)"
    assert port_owner(8200, tmp_path) is None and served_repository(8200, tmp_path) is None  # nobody listens


def test_only_named_triton_regions_are_removed(tmp_path):
    (tmp_path / f"{SHM_PREFIX}_a").write_bytes(b"x")
    (tmp_path / "other").write_bytes(b"x")
    assert remove_shm_regions([f"{SHM_PREFIX}_a", f"{SHM_PREFIX}_gone", "other", f"{SHM_PREFIX}/../x"], tmp_path) == [f"{SHM_PREFIX}_a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]


def test_restart_budget_is_a_sliding_window():
    budget = RestartBudget(max_restarts=2, window_s=60)
    assert budget.allow(0) and budget.allow(10)
    assert not budget.allow(20)  # a third within 60 s
    assert budget.allow(61)  # the first left the window
    assert not RestartBudget(0, 60).allow(0)
