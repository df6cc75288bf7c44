"""What the TCP proxy of ``rankserve serve --releases`` costs: the same requests to one embedded
server, directly and through the proxy, interleaved in blocks so both see the same machine state.

    python -m rankserve.server.proxy_bench --model-repository model_repository --seconds 20

Prints p50 / p95 latency and requests/s for each path, over HTTP and gRPC, at 1 and N threads.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import numpy as np

from rankserve.server.embedded import EmbeddedServer, free_port, free_serve_settings
from rankserve.server.proxy import TcpProxy
from rankserve.server.supervisor import backend_of

TEXTS = [f"product {i}: a solid oak dining table with {i % 7} matching chairs and a walnut finish" for i in range(20)]


def _block(url: str, threads: int, seconds: float) -> tuple[list[float], int]:
    from rankserve_client import RankerClient

    latencies: list[float] = []
    stop = time.monotonic() + seconds

    def work() -> None:
        with RankerClient(url, retries=0, check_api=False) as client:
            while time.monotonic() < stop:
                t = time.perf_counter()
                client.rank("oak dining table", TEXTS)
                latencies.append(1000 * (time.perf_counter() - t))

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return latencies, len(latencies)


def measure(repo: Path, seconds: float, threads: int, blocks: int = 4) -> list[str]:
    lines = []
    with EmbeddedServer(repo, free_serve_settings()) as server:
        proxy = TcpProxy("127.0.0.1", {"http": free_port(), "grpc": free_port(), "metrics": free_port()}).start()
        try:
            proxy.set_backend(backend_of(server))
            for protocol in ("http", "grpc"):
                direct_url = f"{protocol}://{server.http_url if protocol == 'http' else server.grpc_url}"
                proxied_url = f"{protocol}://127.0.0.1:{proxy.listen[protocol]}"
                for n in sorted({1, threads}):
                    _block(direct_url, n, 1.0)  # warm up both paths
                    _block(proxied_url, n, 1.0)
                    got = {"direct": ([], 0), "proxy": ([], 0)}
                    for _ in range(blocks):  # interleaved: drift on a shared machine hits both alike
                        for name, url in (("direct", direct_url), ("proxy", proxied_url)):
                            lat, count = _block(url, n, seconds / (2 * blocks))
                            got[name] = (got[name][0] + lat, got[name][1] + count)
                    span = seconds / 2
                    stats = {k: (float(np.percentile(v[0], 50)), float(np.percentile(v[0], 95)), v[1] / span) for k, v in got.items()}
                    d, p = stats["direct"], stats["proxy"]
                    lines.append(f"{protocol:<4} {n} thread(s): direct p50 {d[0]:.2f} ms p95 {d[1]:.2f} ms {d[2]:.0f} req/s | "
                                 f"proxy p50 {p[0]:.2f} ms p95 {p[1]:.2f} ms {p[2]:.0f} req/s | p50 {p[0] - d[0]:+.2f} ms, "
                                 f"req/s {100 * (p[2] / d[2] - 1):+.1f}%")
        finally:
            proxy.stop()
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-repository", default="model_repository")
    p.add_argument("--seconds", type=float, default=20.0, help="per protocol and thread count, both paths together")
    p.add_argument("--threads", type=int, default=4)
    args = p.parse_args(argv)
    for line in measure(Path(args.model_repository), args.seconds, args.threads):
        print(line, flush=True)


if __name__ == "__main__":
    main()
