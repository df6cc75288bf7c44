"""The response cache: settings, the generated configs, the server's command line, the comparison's
judgement (no server here: tests/e2e/test_response_cache.py runs the real one)."""

from __future__ import annotations

import dataclasses

import pytest

from rankserve.builder import configs
from rankserve.errors import ConfigError, ServeError
from rankserve.loadtest.cache_compare import judge, max_score_difference, model_counts, scrape_cache
from rankserve.server.embedded import find_triton, server_command
from rankserve.settings import MIN_RESPONSE_CACHE_BYTES, PRESETS, BuildSettings, LoadTestSettings, RuntimeSettings, ServeSettings

KEY = "a-test-admin-key-0123"

VARIANTS = {"fp32": RuntimeSettings(), "int8": RuntimeSettings("openvino")}


def test_cache_size_is_off_by_default_and_validated():
    assert ServeSettings().response_cache_bytes == 0
    assert ServeSettings(response_cache_bytes=MIN_RESPONSE_CACHE_BYTES).response_cache_bytes == 4096
    for bad in (-1, 1, 100, MIN_RESPONSE_CACHE_BYTES - 1):
        with pytest.raises(ConfigError, match="response_cache_bytes must be 0 \\(off\\) or >= 4096"):
            ServeSettings(response_cache_bytes=bad)


def test_only_the_public_ensembles_are_marked_cacheable():
    models = configs.cpu_repository(BuildSettings(), VARIANTS, "int8")
    cached = {name for name, c in models.items() if c.HasField("response_cache") and c.response_cache.enable}
    assert cached == {"ranker", "ranker_fp32", "ranker_int8"}
    for name in cached:  # what Triton reads back from the file
        assert configs.parse(configs.to_text(models[name])).response_cache.enable
        assert "response_cache {\n  enable: true\n}" in configs.to_text(models[name])
    off = configs.cpu_repository(BuildSettings(response_cache=False), VARIANTS, "int8")
    assert not any(c.HasField("response_cache") for c in off.values())
    assert "response_cache" not in "".join(configs.to_text(c) for c in off.values())


def test_tensorrt_ensembles_are_cacheable_too():
    engines = {"fp16": [{"inputs": ["input_ids", "attention_mask"], "gpu": {"compute_capability": "9.0"},
                         "plan_file": "rank_trt_fp16/1/model.sm90.plan"}]}
    models = configs.gpu_models(PRESETS["tiny"], engines)
    assert models["ranker_trt_fp16"].response_cache.enable
    assert not any(models[m].HasField("response_cache") for m in ("rank_trt_fp16", "tokenize_gpu"))
    off = configs.gpu_models(dataclasses.replace(PRESETS["tiny"], response_cache=False), engines)
    assert not off["ranker_trt_fp16"].HasField("response_cache")


def test_server_command_adds_the_cache_flags_only_when_a_size_is_set(tmp_path):
    install = find_triton()
    plain = server_command(install, tmp_path, tmp_path, ServeSettings(), KEY)
    assert not any("cache" in a for a in plain)
    on = server_command(install, tmp_path, tmp_path, ServeSettings(response_cache_bytes=256 * 2**20), KEY)
    assert on[:len(plain)] == plain
    assert on[len(plain):] == [f"--cache-config=local,size={256 * 2**20}", f"--cache-directory={install.caches}"]
    assert (install.caches / "local" / "libtritoncache_local.so").exists()


def test_a_missing_cache_library_is_a_clear_error(tmp_path):
    install = dataclasses.replace(find_triton(), caches=tmp_path)
    with pytest.raises(ServeError, match="libtritoncache_local.so"):
        server_command(install, tmp_path, tmp_path, ServeSettings(response_cache_bytes=2**20), KEY)
    assert server_command(install, tmp_path, tmp_path, ServeSettings(), KEY)  # no cache: no library needed


METRICS = """# HELP nv_cache_num_hits_per_model Number of cache hits per model
nv_cache_num_hits_per_model{model="ranker",version="1"} 3
nv_cache_num_misses_per_model{model="ranker",version="1"} 2
nv_cache_num_hits_per_model{model="ranker_fp32",version="1"} 0
nv_cache_util 0.25
nv_cache_num_entries 17
nv_cache_num_evictions 23
"""


def test_cache_metrics_are_read_from_tritons_text(tmp_path):
    path = tmp_path / "metrics"
    path.write_text(METRICS)
    m = scrape_cache(path.as_uri())
    assert m["models"]["ranker"] == {"hits": 3.0, "misses": 2.0} and m["models"]["ranker_fp32"] == {"hits": 0.0, "misses": 0.0}
    assert (m["util"], m["num_entries"], m["num_evictions"]) == (0.25, 17.0, 23.0)
    later = {"models": {"ranker": {"hits": 10.0, "misses": 4.0}}}
    assert model_counts(m, later, "ranker") == {"hits": 7, "misses": 2, "hit_ratio": 7 / 9}
    assert model_counts(m, m, "other") == {"hits": 0, "misses": 0, "hit_ratio": 0.0}


def _arm(pairs_per_s, probes, hits, *, util=0.01, growth=2.0, failures=0, first=None):
    summary = {"requests": 100, "failures": failures, "requests_per_s": pairs_per_s / 100, "pairs_per_s": pairs_per_s,
               "p50_ms": 100.0, "p95_ms": 150.0, "p99_ms": 200.0, "mean_candidates": 100.0}
    return {"summary": summary, "run_counts": {"hits": hits, "misses": 10, "hit_ratio": hits / (hits + 10)},
            "probes": probes, "probes_first": first if first is not None else probes,
            "probe_counts": {"hits": len(probes) if hits else 0, "misses": 0 if hits else len(probes)},
            "probe_first_counts": {"hits": 0, "misses": len(probes)}, "head": probes,
            "cache": {"util": util} if hits else {}, "server_rss_mb": {"growth": growth}}


def test_the_comparison_checks_identity_bounds_and_the_speedup():
    answers = [[(1, 0.5), (0, -0.25)], [(0, 1.0)]]
    settings = LoadTestSettings(scenario="zipf")
    good = judge({"off": _arm(1000, answers, 0), "on": _arm(4000, answers, 90)}, settings, 2**20, 3.0, 2)
    assert good["passed"] and good["ratios"]["pairs_per_s"] == 4.0 and good["on"]["hit_ratio"] == 0.9
    slow = judge({"off": _arm(1000, answers, 0), "on": _arm(2000, answers, 90)}, settings, 2**20, 3.0, 2)
    assert slow["violations"] == ["speedup"]
    assert judge({"off": _arm(1000, answers, 0), "on": _arm(2000, answers, 90)}, settings, 2**20, 0.0, 2)["passed"]
    changed = [[(1, 0.5), (0, -0.2500001)], [(0, 1.0)]]
    assert judge({"off": _arm(1000, answers, 0), "on": _arm(4000, changed, 90)}, settings, 2**20, 3.0, 2)["violations"] == ["identical"]
    stale_first = judge({"off": _arm(1000, answers, 0), "on": _arm(4000, answers, 90, first=changed)}, settings, 2**20, 3.0, 2)
    assert stale_first["violations"] == ["identical"]
    over = judge({"off": _arm(1000, answers, 0, growth=1.0), "on": _arm(4000, answers, 90, growth=3.5)}, settings, 2**20, 3.0, 2)
    assert over["violations"] == ["bounded"]  # grew 2.5 MiB more than without a cache of 1 MiB
    assert judge({"off": _arm(1000, answers, 0), "on": _arm(4000, answers, 90, util=1.5)}, settings, 2**20, 3.0, 2)["violations"] == ["bounded"]
    assert "off_has_no_hits" in judge({"off": _arm(1000, answers, 5), "on": _arm(4000, answers, 90)}, settings, 2**20, 3.0, 2)["violations"]


def test_ranking_comparison_counts_order_and_the_largest_score_difference():
    a = [[(1, 0.5), (0, -0.25)], [(2, 1.0), (3, 0.0)]]
    b = [[(1, 0.5), (0, -0.2501)], [(3, 0.2), (2, 0.1)]]
    same, diff = max_score_difference(a, b)
    assert same == 1 and diff == pytest.approx(0.9)
    assert max_score_difference(a, a) == (2, 0.0)


@pytest.mark.parametrize("argv, message", [
    (["--compare-response-cache", "64MiB", "--host", "http://127.0.0.1:8000"], "no --host"),
    (["--compare-response-cache", "0"], "needs a cache size"),
    (["--compare-response-cache", "100"], "response_cache_bytes must be 0 (off) or >= 4096"),
    (["--compare-response-cache", "lots"], "--compare-response-cache: not a memory size"),
    (["--compare-response-cache", "64MiB", "--warmup", "-1"], "--warmup must be >= 0"),
    (["--zipf", "-1"], "zipf_s must be in [0, 10]"),
])
def test_loadtest_cache_options_are_refused_before_anything_starts(argv, message, capsys):
    from rankserve import cli

    assert cli.main(["loadtest", *argv]) == 2
    assert message in capsys.readouterr().err


def test_loadtest_zipf_flag_takes_an_optional_exponent():
    from rankserve import cli

    assert cli.parser().parse_args(["loadtest", "--zipf"]).zipf == LoadTestSettings().zipf_s == 1.0
    assert cli.parser().parse_args(["loadtest", "--zipf", "0.8"]).zipf == 0.8
    assert cli.parser().parse_args(["loadtest"]).zipf is None  # the random scenario
