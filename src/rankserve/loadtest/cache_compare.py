"""``rankserve loadtest --compare-response-cache SIZE``: the same workload against the embedded
server without and then with Triton's response cache, in one run.

Each arm starts its own server on the same repository and runs the same Locust scenario (the
``zipf`` scenario is the one a cache is for). Reported per arm: pairs/s, requests/s, p50/p99, and
for the cache: hit ratio during the run (Triton's ``nv_cache_num_hits_per_model`` and
``..._misses_...`` of the model under test), entries, evictions and bytes used. Checked:

* identical answers: probe requests (queries of the workload with candidate lists of their own, so
  they do not warm the cache for the measured run) are sent one at a time to the cache-off server,
  and to the cache-on server before its run (computed) and after it (answered from the cache, which
  the hit counter confirms); ids and scores must be bitwise equal across the three. The most
  popular workload requests are compared too (computed under load on the cache-on server, so
  batch composition can move scores: by up to a logit with dynamic INT8, whose activation
  scale is taken over the batch; reported, not checked);
* bounded memory: the cache's bytes used never exceed the setting, and the server process grows
  during the cached run by at most the cache size more than during the uncached run;
* the speedup: pairs/s with the cache over pairs/s without, against ``min_speedup``.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

from rankserve.loadtest.run import SUMMARY_KEYS, run_locust
from rankserve.loadtest.timeline import process_rss_bytes
from rankserve.loadtest.workload import Workload
from rankserve.settings import LoadTestSettings

METRICS_INTERVAL_S = 2.0
"""Triton refreshes its cache-wide gauges (``nv_cache_util``, entries, evictions) every
``--metrics-interval-ms`` (2000 by default); the per-model hit and miss counters are immediate."""

_PER_MODEL = re.compile(r'^nv_cache_num_(hits|misses)_per_model\{model="([^"]+)",version="[^"]*"\} ([0-9.e+-]+)$', re.M)
_GLOBAL = re.compile(r'^nv_cache_(util|num_entries|num_evictions|num_lookups|num_hits|num_misses) ([0-9.e+-]+)$', re.M)


def scrape_cache(metrics_url: str) -> dict:
    """Triton's response-cache metrics: ``{"models": {model: {"hits", "misses"}}, "util",
    "num_entries", ...}`` (the cache-wide ones only when the server has a cache)."""
    with urllib.request.urlopen(metrics_url, timeout=5) as r:
        text = r.read().decode()
    out: dict = {"models": {}}
    for kind, model, value in _PER_MODEL.findall(text):
        out["models"].setdefault(model, {"hits": 0.0, "misses": 0.0})[kind] = float(value)
    for name, value in _GLOBAL.findall(text):
        out[name] = float(value)
    return out


def model_counts(before: dict, after: dict, model: str) -> dict[str, int]:
    """Hits and misses of ``model`` between two scrapes, and the hit ratio."""
    b, a = before["models"].get(model, {}), after["models"].get(model, {})
    hits = int(a.get("hits", 0) - b.get("hits", 0))
    misses = int(a.get("misses", 0) - b.get("misses", 0))
    return {"hits": hits, "misses": misses, "hit_ratio": hits / (hits + misses) if hits + misses else 0.0}


def answers(url: str, model: str, requests: list[tuple[str, list[str]]]) -> list[list[tuple[int, float]]]:
    """Each request sent alone, in turn: its ranking as (id, score) pairs."""
    from rankserve_client import RankerClient

    with RankerClient(url, model=model, timeout=120) as client:
        return [[(int(r.id), r.score) for r in client.rank(query, texts)] for query, texts in requests]


def max_score_difference(a: list[list[tuple[int, float]]], b: list[list[tuple[int, float]]]) -> tuple[int, float]:
    """How many rankings list the same ids in the same order, and the largest score difference of
    the same id across all of them."""
    same_order = sum(1 for x, y in zip(a, b) if [i for i, _ in x] == [i for i, _ in y])
    diff = 0.0
    for x, y in zip(a, b):
        scores = dict(y)
        diff = max([diff] + [abs(s - scores[i]) for i, s in x if i in scores])
    return same_order, diff


def compare_response_cache(settings: LoadTestSettings, out: Path, repo: Path, cache_bytes: int, min_speedup: float = 3.0,
                           probes: int = 8, warmup_s: int = 0, log=print) -> dict:
    """Run ``settings`` against the embedded server on ``repo`` without a response cache (``out/off``)
    and with one of ``cache_bytes`` (``out/on``); the comparison goes to ``out/comparison.json``.

    ``warmup_s``: each arm first runs the same workload this long (``out/<arm>/warmup``), reported
    but not compared, so the measured run sees a cache that has already met the popular queries, as
    a server that has been up a while would (the hit ratio of a run from an empty cache depends on
    how many requests it sends against how many distinct requests there are)."""
    from rankserve.server.embedded import EmbeddedServer, free_serve_settings

    workload = Workload.default(settings)
    probe_requests = [workload.fixed_request(int(q), salt=1) for q in workload.popular[:probes]]
    head = [workload.fixed_request(int(q)) for q in workload.popular[:probes]]
    arms: dict[str, dict] = {}
    for arm, size in (("off", 0), ("on", cache_bytes)):
        serve = free_serve_settings(response_cache_bytes=size)
        with EmbeddedServer(repo, serve, out / arm / "tritonserver.log") as server:
            url = f"http://{server.http_url}" if settings.protocol == "http" else f"grpc://{server.grpc_url}"
            pid = server.process.pid
            result: dict = {"response_cache_bytes": size}
            if size:  # computed (misses), each alone: what the cache will answer after the run
                start = scrape_cache(server.metrics_url)
                result["probes_first"] = answers(url, settings.model, probe_requests)
                result["probe_first_counts"] = model_counts(start, scrape_cache(server.metrics_url), settings.model)
            log(f"response cache {'off' if not size else f'{size / 2**20:g} MiB'}: {settings.users} users for "
                f"{settings.duration_s} s on {url}")
            if warmup_s:
                log(f"  warm-up: {warmup_s} s")
                start = scrape_cache(server.metrics_url)
                warm = run_locust(url, replace(settings, duration_s=warmup_s), out / arm / "warmup", server.metrics_url)
                result["warmup"] = {**{k: warm[k] for k in SUMMARY_KEYS},
                                    **model_counts(start, scrape_cache(server.metrics_url), settings.model)}
            rss_before, before = process_rss_bytes(pid), scrape_cache(server.metrics_url)
            summary = run_locust(url, settings, out / arm, server.metrics_url, pid)
            after, rss_after = scrape_cache(server.metrics_url), process_rss_bytes(pid)
            result["run_counts"] = model_counts(before, after, settings.model)
            result["probes"] = answers(url, settings.model, probe_requests)
            result["probe_counts"] = model_counts(after, scrape_cache(server.metrics_url), settings.model)
            result["head"] = answers(url, settings.model, head)
            time.sleep(METRICS_INTERVAL_S + 0.5)  # the cache-wide gauges are refreshed on Triton's metrics interval
            final = scrape_cache(server.metrics_url)
            result["cache"] = {k: final[k] for k in ("util", "num_entries", "num_evictions") if k in final}
            if size and "util" in final:
                result["cache"]["used_bytes"] = final["util"] * size
            result["server_rss_mb"] = {"before": rss_before / 2**20, "after": rss_after / 2**20,
                                       "growth": (rss_after - rss_before) / 2**20}
            result["summary"] = {k: summary[k] for k in SUMMARY_KEYS}
            arms[arm] = result
    comparison = judge(arms, settings, cache_bytes, min_speedup, probes)
    if warmup_s:
        comparison["warmup"] = {"duration_s": warmup_s, "off": arms["off"]["warmup"], "on": arms["on"]["warmup"],
                                "pairs_per_s_ratio": _ratio(arms["on"]["warmup"]["pairs_per_s"], arms["off"]["warmup"]["pairs_per_s"])}
    (out / "comparison.json").write_text(json.dumps(comparison, indent=2) + "\n")
    return comparison


def judge(arms: dict[str, dict], settings: LoadTestSettings, cache_bytes: int, min_speedup: float, probes: int) -> dict:
    """The comparison and its checks from the two arms' results."""
    off, on = arms["off"], arms["on"]
    so, sn = off["summary"], on["summary"]
    speedup = _ratio(sn["pairs_per_s"], so["pairs_per_s"])
    head_same, head_diff = max_score_difference(off["head"], on["head"])
    checks = {
        "identical": on["probes_first"] == off["probes"] == on["probes"],
        "probes_from_cache": on["probe_counts"]["hits"] == probes and on["probe_first_counts"]["misses"] == probes,
        "off_has_no_hits": off["run_counts"]["hits"] == 0 and off["probe_counts"]["hits"] == 0,
        "bounded": on["cache"].get("util", 2.0) <= 1.0
                   and on["server_rss_mb"]["growth"] <= off["server_rss_mb"]["growth"] + cache_bytes / 2**20,
        "no_failures": so["failures"] == 0 and sn["failures"] == 0,
    }
    if min_speedup:
        checks["speedup"] = speedup >= min_speedup
    violations = [name for name, ok in checks.items() if not ok]
    return {
        "scenario": settings.scenario, "zipf_s": settings.zipf_s if settings.scenario == "zipf" else None,
        "model": settings.model, "users": settings.users, "duration_s": settings.duration_s,
        "response_cache_bytes": cache_bytes,
        "off": {**so, "server_rss_mb": off["server_rss_mb"]},
        "on": {**sn, **on["run_counts"], "cache": on["cache"], "server_rss_mb": on["server_rss_mb"]},
        "ratios": {"pairs_per_s": speedup, "p50": _ratio(sn["p50_ms"], so["p50_ms"]), "p99": _ratio(sn["p99_ms"], so["p99_ms"])},
        "probes": {"requests": probes, "first_pass": on["probe_first_counts"], "second_pass": on["probe_counts"]},
        "head": {"requests": probes, "same_order": head_same, "max_abs_score_difference": head_diff},
        "min_speedup": min_speedup, "checks": checks, "passed": not violations, "violations": violations,
    }


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def format_comparison(c: dict) -> str:
    off, on, r = c["off"], c["on"], c["ratios"]
    scenario = f"zipf s={c['zipf_s']:g}" if c["scenario"] == "zipf" else c["scenario"]
    lines = [f"{scenario}, model {c['model']}, {c['users']} users, {c['duration_s']} s per arm; "
             f"response cache {c['response_cache_bytes'] / 2**20:g} MiB",
             "  cache  run        requests  failures   req/s   pairs/s   p50 ms   p99 ms  hit ratio"]
    rows = []
    if c.get("warmup"):
        w = c["warmup"]
        rows += [("off", f"warm-up {w['duration_s']} s", w["off"], "-"), ("on", f"warm-up {w['duration_s']} s", w["on"], f"{w['on']['hit_ratio']:.3f}")]
    rows += [("off", "measured", off, "-"), ("on", "measured", on, f"{on['hit_ratio']:.3f}")]
    for name, run, arm, ratio in rows:
        lines.append(f"  {name:<5}  {run:<10} {arm['requests']:>8} {arm['failures']:>9} {arm['requests_per_s']:7.1f} {arm['pairs_per_s']:9.0f} "
                     f"{arm['p50_ms']:8.0f} {arm['p99_ms']:8.0f}  {ratio:>9}")
    if c.get("warmup"):
        lines.append(f"  warm-up on / off (from an empty cache): pairs/s x{c['warmup']['pairs_per_s_ratio']:.2f}")
    lines.append(f"  measured on / off: pairs/s x{r['pairs_per_s']:.2f}, p50 x{r['p50']:.3f}, p99 x{r['p99']:.3f}")
    cache = on["cache"]
    if "used_bytes" in cache:
        lines.append(f"  cache after the run: {cache['num_entries']:.0f} entries, {cache['used_bytes'] / 2**20:.2f} MiB of "
                     f"{c['response_cache_bytes'] / 2**20:g} MiB used ({cache['util']:.2%}), {cache['num_evictions']:.0f} evictions; "
                     f"server process grew {on['server_rss_mb']['growth']:+.1f} MiB (without cache {off['server_rss_mb']['growth']:+.1f} MiB)")
    p, h = c["probes"], c["head"]
    lines.append(f"  probes: {p['requests']} requests computed alone, then answered by the cache ({p['second_pass']['hits']} hits): "
                 f"{'bitwise identical' if c['checks']['identical'] else 'DIFFERENT'} to the server without cache")
    lines.append(f"  most popular workload requests: {h['same_order']}/{h['requests']} in the same order as without cache, "
                 f"largest score difference {h['max_abs_score_difference']:.2g} (cached under load: batch composition)")
    checks = ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in c["checks"].items())
    target = f" (target pairs/s x{c['min_speedup']:g})" if c["min_speedup"] else ""
    lines.append(f"checks{target}: {checks}: {'PASS' if c['passed'] else 'FAIL'}")
    return "\n".join(lines)

