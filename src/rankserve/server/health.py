"""``rankserve health``: is this host's tritonserver able to serve every model? For container
probes (Kubernetes liveness, docker compose health check), run next to the server.

Triton 2.51 answers ``/v2/models/<model>/ready`` with 200 after a model's Python-backend stub died
(measured: every request then fails with "Stub process ... is not healthy"), so an HTTP probe
alone keeps a broken replica in service. This check adds the stubs: each Python-backend model of
the repository must have as many running stubs as its configuration has instances.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

from rankserve.server.processes import server_pids, stub_processes


def expected_stubs(repo: str | Path) -> dict[str, int]:
    """Stub processes each Python-backend model of ``repo`` runs: one per instance."""
    from rankserve.builder.configs import parse

    expected = {}
    for path in sorted(Path(repo).glob("*/config.pbtxt")):
        config = parse(path)
        if config.backend != "python":
            continue
        groups = config.instance_group or [None]
        expected[path.parent.name] = sum(1 if g is None else max(g.count, 1) * max(len(g.gpus), 1) for g in groups)
    return expected


def stub_problems(expected: dict[str, int], running: Counter) -> list[str]:
    """One line per model with fewer running stubs than instances."""
    return [f"model {m}: {running.get(m, 0)} of {n} Python-backend stubs running" for m, n in sorted(expected.items())
            if running.get(m, 0) < n]


def _ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def check(url: str, repo: str | Path, model: str | None = None, proc: Path = Path("/proc")) -> tuple[list[str], str]:
    """(problems, summary line) for the server at ``url`` serving ``repo`` on this host; with
    ``model``, that model must also report ready (a readiness check rather than a liveness one)."""
    url = url.rstrip("/")
    if not _ok(f"{url}/v2/health/live"):
        return [f"tritonserver at {url} is not live"], ""
    if model and not _ok(f"{url}/v2/models/{model}/ready"):
        return [f"model {model} is not ready"], ""
    servers = server_pids(repo, proc)
    if len(servers) != 1:
        return [f"expected one tritonserver serving {repo} on this host, found {len(servers)}"], ""
    running = Counter(s.model for s in stub_processes(servers[0], proc))
    expected = expected_stubs(repo)
    problems = stub_problems(expected, running)
    return problems, f"server live, {sum(min(running[m], n) for m, n in expected.items())}/{sum(expected.values())} Python-backend stubs running"
