"""``rankserve health``: is this host's tritonserver able to serve every model? For container
probes (Kubernetes liveness, docker compose health check), run next to the server.

Triton 2.51 answers ``/v2/models/<model>/ready`` with 200 after a model's Python-backend stub died
(measured: every request then fails with "Stub process ... is not healthy"), so an HTTP probe
alone keeps a broken replica in service. This check adds the stubs: each Python-backend model of
the repository must have as many running stubs as its configuration has instances.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from rankserve.server.processes import served_repository, server_pids, stub_processes


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


def url_port(url: str) -> int | None:
    """The port of a server URL in any form the SDK takes (:func:`rankserve_client.parse_url`)."""
    from rankserve_client import parse_url

    protocol, address, tls = parse_url(url, None)
    host, sep, port = address.rpartition(":")
    if sep and port.isdigit() and not host.endswith(":"):
        return int(port)
    return 443 if tls else 8000 if protocol == "http" else 8001


def _probe(url: str, model: str | None) -> tuple[bool, bool]:
    """(live, ``model`` ready or no model asked) through the SDK (every URL form, HTTP or gRPC)."""
    from rankserve_client import RankerClient

    with RankerClient(url, check_api=False, retries=0, timeout=3) as client:
        live = client.is_live()
        return live, live and (model is None or client.is_ready(model))


def check(url: str, repo: str | Path | None = None, model: str | None = None, proc: Path = Path("/proc")) -> tuple[list[str], str]:
    """(problems, summary line) for the server at ``url`` (``host:port``, ``http://``, ``https://``,
    ``grpc://``, ``grpcs://``) serving ``repo`` on this host (None: the repository of the
    tritonserver listening on the URL's port); with ``model``, that model must also report ready
    (a readiness check rather than a liveness one)."""
    try:
        live, ready = _probe(url, model)
    except ValueError as exc:  # a URL the SDK refuses
        return [str(exc)], ""
    if not live:
        return [f"tritonserver at {url} is not live"], ""
    if not ready:
        return [f"model {model} is not ready"], ""
    if repo is None:
        found = served_repository(url_port(url), proc)
        if found is None:
            return [f"cannot tell which repository the server at {url} serves (no tritonserver of this user listens on its "
                    "port here): pass --model-repository"], ""
        server, repo = found
    else:
        servers = server_pids(repo, proc)
        if len(servers) != 1:
            return [f"expected one tritonserver serving {repo} on this host, found {len(servers)}"], ""
        server = servers[0]
    running = Counter(s.model for s in stub_processes(server, proc))
    expected = expected_stubs(repo)
    problems = stub_problems(expected, running)
    return problems, f"server live ({repo}), {sum(min(running[m], n) for m, n in expected.items())}/{sum(expected.values())} Python-backend stubs running"
