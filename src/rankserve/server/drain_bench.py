"""What a client sees when one ``rankserve serve`` stops under load while a second one serves.

    python -m rankserve.server.drain_bench --model-repository model_repository --protocol http --retries 3

Starts two ``rankserve serve`` processes on free ports, runs Locust headless (the repository's
``loadtest/locustfile.py``: the Python SDK with ``--retries``, given both servers' addresses
``scheme://A,B``; with ``--one-server`` only the first one's), sends SIGTERM to the first server
after ``--stop-after`` seconds, and prints: the seconds from SIGTERM to that process's exit, the
requests and failed requests Locust counted, and each failure's message. ``--serve-src``
starts the servers from another checkout's ``src`` (e.g. the code before a change, to compare);
the clients always use this checkout's SDK.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from rankserve.server.embedded import free_serve_settings

LOCUSTFILE = Path(__file__).resolve().parents[3] / "loadtest" / "locustfile.py"


class ServeProcess:
    """``rankserve serve`` in a subprocess on free ports, its output collected."""

    def __init__(self, src: str | None, repo: Path, drain_timeout: float | None, log_dir: Path) -> None:
        self.settings = s = free_serve_settings()
        extra = ["--drain-timeout", str(drain_timeout)] if drain_timeout is not None else []
        env = {**os.environ, "PYTHONPATH": src} if src else None
        self.proc = subprocess.Popen([sys.executable, "-m", "rankserve", "serve", "--model-repository", str(repo),
                                      "--http-port", str(s.http_port), "--grpc-port", str(s.grpc_port),
                                      "--metrics-port", str(s.metrics_port), "--log-file", str(log_dir / "tritonserver.log"), *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while "Ctrl-C or SIGTERM stops it" not in self.output:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"rankserve serve did not start:\n{self.output}")
            time.sleep(0.1)

    def address(self, protocol: str) -> str:
        return f"127.0.0.1:{self.settings.http_port if protocol == 'http' else self.settings.grpc_port}"

    def stop(self, timeout: float = 120) -> float:
        """SIGTERM; the seconds until the process exited."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return time.monotonic() - started


def locust_failures(prefix: Path) -> tuple[int, int, dict[str, int]]:
    """(requests, failures, failure message -> count) from Locust's CSV files."""
    requests = failures = 0
    with open(f"{prefix}_stats.csv", newline="") as f:
        for row in csv.DictReader(f):
            if row["Name"] == "Aggregated":
                requests, failures = int(row["Request Count"]), int(row["Failure Count"])
    messages: dict[str, int] = {}
    if Path(f"{prefix}_failures.csv").exists():
        with open(f"{prefix}_failures.csv", newline="") as f:
            for row in csv.DictReader(f):
                messages[row["Error"][:200]] = messages.get(row["Error"][:200], 0) + int(row["Occurrences"])
    return requests, failures, messages


def run(repo: Path, protocol: str, retries: int, users: int, seconds: int, stop_after: float, one_server: bool,
        drain_timeout: float | None, src: str | None, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    servers: list[ServeProcess] = []
    try:
        for i in range(1 if one_server else 2):  # one after the other: each start prepares the repository
            servers.append(ServeProcess(src, repo, drain_timeout, out / f"server{i}"))
            servers[-1].wait_ready()
        scheme = "http" if protocol == "http" else "grpc"
        host = f"{scheme}://" + ",".join(s.address(protocol) for s in servers)
        env = {**os.environ, "RANKSERVE_LOADTEST_RETRIES": str(retries), "RANKSERVE_LOADTEST_RETRY_BACKOFF": "0.1",
               "RANKSERVE_LOADTEST_CANDIDATES_MEAN": "20", "RANKSERVE_LOADTEST_CANDIDATES_SIGMA": "0"}
        user = "RankerHttpUser" if protocol == "http" else "RankerGrpcUser"
        locust = subprocess.Popen([sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), user, "--headless", "--host", host,
                                   "-u", str(users), "-r", str(users), "-t", f"{seconds}s", "--csv", str(out / "locust"),
                                   "--only-summary", "--stop-timeout", "30"],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(stop_after)
        exit_s = servers[0].stop()
        try:
            log, _ = locust.communicate(timeout=seconds + 60)
        except subprocess.TimeoutExpired:  # Locust wrote its statistics but did not exit (seen with gRPC users)
            locust.kill()
            log = locust.communicate()[0] + "\n(locust did not exit: killed)"
        (out / "locust.log").write_text(log)
        requests, failures, messages = locust_failures(out / "locust")
    finally:
        for server in servers:
            if server.proc.poll() is None:
                server.stop()
    (out / "server0.out").write_text(servers[0].output)
    result = {"protocol": protocol, "retries": retries, "servers": len(servers), "users": users,
              "sigterm_to_exit_s": round(exit_s, 2), "exit_code": servers[0].proc.returncode,
              "requests": requests, "failures": failures, "failure_messages": messages}
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repository", default="model_repository")
    p.add_argument("--protocol", choices=["http", "grpc"], default="http")
    p.add_argument("--retries", type=int, default=3, help="SDK retries per request (0: none)")
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--seconds", type=int, default=25, help="Locust run length")
    p.add_argument("--stop-after", type=float, default=8.0, help="seconds into the run to SIGTERM the first server")
    p.add_argument("--one-server", action="store_true", help="the clients know only the server that stops")
    p.add_argument("--drain-timeout", type=float, help="passed to the stopped server's serve (default: its own)")
    p.add_argument("--serve-src", help="run `rankserve serve` from this src folder (PYTHONPATH; default: this checkout)")
    p.add_argument("--out", help="folder for Locust's files and the servers' logs (default: a temporary one)")
    args = p.parse_args(argv)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="rankserve-drain-"))
    result = run(Path(args.model_repository), args.protocol, args.retries, args.users, args.seconds, args.stop_after,
                 args.one_server, args.drain_timeout, args.serve_src, out)
    print(f"{result['protocol']}: {result['servers']} servers, retries {result['retries']}, {result['users']} users: "
          f"SIGTERM to exit {result['sigterm_to_exit_s']:.2f} s (exit code {result['exit_code']}); "
          f"{result['requests']} requests, {result['failures']} failed")
    for message, count in sorted(result["failure_messages"].items(), key=lambda kv: -kv[1]):
        print(f"  {count:>6}  {message}")
    print(f"files: {out}")


if __name__ == "__main__":
    main()
