"""``make demo``: the whole path on the embedded default, reusing whatever is already built.

data -> fine-tuned ranker (cached) -> model repository (cached when the ranker and settings match)
-> embedded tritonserver -> real held-out WANDS queries ranked over HTTP and gRPC -> clean stop.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rankserve.builder.repository import MANIFEST, build_repository, sha256, verify_repository
from rankserve_client import RankerClient
from rankserve.data.catalog import LABEL_NAMES, Dataset
from rankserve.errors import BuildError
from rankserve.server.embedded import EmbeddedServer, free_serve_settings, port_free
from rankserve.settings import CPU_VARIANTS, GPU_VARIANTS, BuildSettings, DataSettings, ServeSettings, TrainSettings
from rankserve.train.pipeline import format_report, make_dataset, train_ranker

DEMO_QUERIES = 5
SHOWN = 5


def serve_settings() -> ServeSettings:
    """The default ports when they are free, else free ones (a demo must not fail on a busy 8000)."""
    d = ServeSettings()
    if all(port_free(p) for p in (d.http_port, d.grpc_port, d.metrics_port)):
        return d
    return free_serve_settings()


def ensure_dataset(work: Path, settings: DataSettings = DataSettings()) -> Dataset:
    data_dir = work / "data"
    if (data_dir / "judgments.jsonl").exists():
        print(f"== data: reusing {data_dir}")
        return Dataset.load(data_dir)
    print(f"== data: generating the demo catalog around the WANDS queries -> {data_dir}")
    return make_dataset(data_dir, settings)


def ensure_ranker(work: Path, dataset: Dataset, retrain: bool) -> Path:
    ranker_dir = work / "ranker"
    report_path = ranker_dir / "training_report.json"
    if report_path.exists() and (ranker_dir / "model.safetensors").exists() and not retrain:
        print(f"== ranker: reusing {ranker_dir} (--retrain to train again)")
        print(format_report(json.loads(report_path.read_text())))
        return ranker_dir
    print("== ranker: fine-tuning all-MiniLM-L6-v2 as a cross-encoder on the demo pairs")
    print(format_report(train_ranker(dataset, ranker_dir, TrainSettings())))
    return ranker_dir


def _up_to_date(repo: Path, ranker_dir: Path, settings: BuildSettings) -> bool:
    if not (repo / MANIFEST).exists():
        return False
    try:
        manifest = verify_repository(repo)
    except BuildError:
        return False
    files = {p.name: sha256(p) for p in sorted(ranker_dir.resolve().iterdir()) if p.is_file()}
    same_settings = manifest.get("settings") == json.loads(json.dumps(settings.to_dict()))
    return manifest["ranker"]["files"] == files and same_settings


DEMO_BUILD = BuildSettings(variants=CPU_VARIANTS + GPU_VARIANTS)


def ensure_repository(repo: Path, ranker_dir: Path, dataset: Dataset, work: Path, settings: BuildSettings = DEMO_BUILD) -> dict:
    if _up_to_date(repo, ranker_dir, settings):
        print(f"== build: {repo} is up to date with {ranker_dir} (manifest checksums match)")
        return verify_repository(repo)
    print(f"== build: {ranker_dir} -> {repo}, variants {', '.join(settings.variants)}")
    return build_repository(ranker_dir, repo, settings, dataset=dataset, work_dir=work / "variants")


def show_variants(manifest: dict) -> None:
    print(f"\n| variant | runtime, precision | NDCG@10 | vs FP32 | top-10 overlap | Kendall tau | pairs/s (build, b=32) |")
    print("|---|---|---|---|---|---|---|")
    for name, v in manifest["variants"].items():
        g = v["gate"]
        runtime = f"{v['runtime']}, {v['precision']}" if v["served_on_cpu"] else "GPU only (TensorRT)"
        speeds = v["build_speed_pairs_per_s"]
        speed = f"{max(speeds.values()):.0f}" if speeds else "n/a"
        print(f"| {name}{' (default)' if name == manifest['default_variant'] else ''} | {runtime} | {g['ndcg']:.4f} | "
              f"{-100 * g['relative_drop']:+.2f}% | {g['top_k_overlap']:.3f} | {g['kendall_tau']:.3f} | {speed} |")
    for skipped in manifest.get("skipped_variants", []):
        print(f"| {skipped} | skipped on this CPU | | | | | |")


def show_rankings(server: EmbeddedServer, dataset: Dataset) -> None:
    by_query = dataset.by_query()
    queries = dataset.split("heldout")[:DEMO_QUERIES]
    with RankerClient(f"http://{server.http_url}") as http, RankerClient(f"grpc://{server.grpc_url}") as grpc:
        for q in queries:
            judgments = by_query[q.query_id]
            texts = [dataset.products[j.product_id].text for j in judgments]
            t0 = time.perf_counter()
            over_http = http.rank(q.text, texts)
            t1 = time.perf_counter()
            over_grpc = grpc.rank(q.text, texts, top_k=SHOWN)
            t2 = time.perf_counter()
            agree = [r.id for r in over_http[:SHOWN]] == [r.id for r in over_grpc]
            print(f"\nquery: {q.text!r}  (WANDS class: {q.query_class}; held out from training)")
            print(f"  {len(texts)} candidates; HTTP {1000 * (t1 - t0):.0f} ms, gRPC top-{SHOWN} {1000 * (t2 - t1):.0f} ms; "
                  f"HTTP and gRPC agree: {'yes' if agree else 'NO'}")
            for r in over_http[:SHOWN]:
                label = LABEL_NAMES[judgments[r.id].label]
                print(f"  {r.rank}. {r.score:+7.3f}  [{label:>10}]  {r.text}")


def run_demo(work: Path, repo: Path, retrain: bool = False) -> None:
    started = time.perf_counter()
    dataset = ensure_dataset(work)
    ranker_dir = ensure_ranker(work, dataset, retrain)
    show_variants(ensure_repository(repo, ranker_dir, dataset, work))
    settings = serve_settings()
    print(f"== serve: starting tritonserver on {settings.host} (HTTP {settings.http_port}, gRPC {settings.grpc_port})")
    t0 = time.perf_counter()
    with EmbeddedServer(repo, settings) as server:
        print(f"   ready in {time.perf_counter() - t0:.1f} s: {', '.join(server.models)}")
        show_rankings(server, dataset)
        print("\n== stop: shutting tritonserver down")
    print(f"demo finished in {time.perf_counter() - started:.0f} s; `make report` measures every variant side by side")
