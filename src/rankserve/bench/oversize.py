"""Over-size requests, what a refusal costs the server: the tokenize stub's CPU seconds and memory
per refused request, with its BYTES inputs read by the bounded deserializer (as served) and by the
Python backend's own one (as before issue 17), side by side in one run on copies of one repository.

``python -m rankserve.bench.oversize --model-repository DIR [--requests 5] [--texts 300000]``
prints a table; medians over the requests. The request is the issue's: ``--texts`` two-byte texts.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

HOOK = "        pb_utils.deserialize_bytes_tensor = bounded_deserializer("


def _cpu_s(pid: int) -> float:
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mib(pid: int) -> float:
    return next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if line.startswith("VmRSS:")) / 1024


def _unbounded(repo: Path, out: Path) -> Path:
    """A copy of ``repo`` whose tokenize stub decodes BYTES inputs with the backend's own deserializer."""
    shutil.copytree(repo, out)
    model = out / "tokenize" / "1" / "model.py"
    lines = model.read_text().splitlines(keepends=True)
    model.write_text("".join(line for line in lines if not line.startswith(HOOK)))
    return out


def measure(repo: Path, requests: int, texts: int) -> dict:
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    from rankserve.server.embedded import EmbeddedServer, free_serve_settings

    body = np.array([b"ab"] * texts, dtype=object)
    with EmbeddedServer(repo, free_serve_settings(exit_timeout_s=10)) as server:
        stubs = [s.pid for s in server.stubs if s.model == "tokenize"]  # its instances: either may take a request
        client = httpclient.InferenceServerClient(server.http_url, network_timeout=300, connection_timeout=300)
        cpu, wall, refused, messages = [], [], 0, set()
        rss_before = sum(_rss_mib(pid) for pid in stubs)
        for _ in range(requests):
            inputs = [httpclient.InferInput("query", [1], "BYTES"), httpclient.InferInput("texts", [texts], "BYTES")]
            inputs[0].set_data_from_numpy(np.array([b"sofa"], dtype=object))
            inputs[1].set_data_from_numpy(body)
            c0, t0 = sum(_cpu_s(pid) for pid in stubs), time.perf_counter()
            try:
                client.infer("tokenize", inputs)
            except InferenceServerException as exc:
                refused += str(exc.status()) == "400"
                messages.add(exc.message().split("] ", 1)[-1][:90])
            wall.append(time.perf_counter() - t0)
            cpu.append(sum(_cpu_s(pid) for pid in stubs) - c0)
        client.close()
        return {"refused": refused, "served": requests - refused, "cpu_s": statistics.median(cpu),
                "wall_s": statistics.median(wall), "rss_growth_mib": sum(_rss_mib(pid) for pid in stubs) - rss_before,
                "message": sorted(messages)[0] if messages else "", "healthy": server.health_problem() is None}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-repository", required=True)
    p.add_argument("--requests", type=int, default=5)
    p.add_argument("--texts", type=int, default=300_000)
    args = p.parse_args(argv)
    wire_mb = args.texts * 6 / 1e6
    with tempfile.TemporaryDirectory(prefix="rankserve-oversize-") as tmp:
        arms = {"before (backend's deserializer)": _unbounded(Path(args.model_repository), Path(tmp) / "before"),
                "now (bounded deserializer)": Path(args.model_repository)}
        rows = {name: measure(repo, args.requests, args.texts) for name, repo in arms.items()}
    print(f"{args.requests} requests of {args.texts:,} two-byte texts ({wire_mb:.1f} MB serialized) to the tokenize stage; medians")
    print(f"{'':34} {'refused':>8} {'served':>7} {'stub CPU s/req':>15} {'wall s/req':>11} {'stub RSS growth MiB':>20}  healthy")
    for name, r in rows.items():
        print(f"{name:34} {r['refused']:>8} {r['served']:>7} {r['cpu_s']:>15.3f} {r['wall_s']:>11.3f} {r['rss_growth_mib']:>20.1f}  {r['healthy']}")
    for name, r in rows.items():
        print(f"  {name}: {r['message']}")


if __name__ == "__main__":
    main()
