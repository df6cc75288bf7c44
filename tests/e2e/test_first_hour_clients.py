"""A newcomer's first hour with the clients (issue 18, items 7-9), as a user meets it: `rankserve rank`
with files that are missing, a directory, not UTF-8, on standard input, with blank lines and a 1.2 MB
candidate, over https:// through the TLS gateway; the TypeScript SDK installed from a packed tarball
into a fresh project, on a model that is not a ranker; and a query the demo ranker's vocabulary cannot
read (unknown-token counts in `rank`'s output, a warning, Triton's metrics). All against the real
tritonserver serving the tiny ranker (which has all-MiniLM-L6-v2's tokenizer)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from rankserve_client import RankerClient

pytestmark = pytest.mark.triton
ROOT = Path(__file__).resolve().parents[2]
TS = ROOT / "clients" / "typescript"
TEXTS = ["Larkin Salon Chair | Massage Chairs", "Oak Dining Table | Dining Tables", "Sky Blue Velvet Pillow | Accent Pillows"]


def rankserve(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "rankserve", *args], input=stdin, capture_output=True, timeout=120)
    return subprocess.CompletedProcess(out.args, out.returncode, out.stdout.decode(), out.stderr.decode())


def rank(server, query: str, texts_file: str, *extra: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return rankserve("rank", "--url", f"http://{server.http_url}", "--query", query, "--texts-file", texts_file, *extra, stdin=stdin)


def one_line_error(out: subprocess.CompletedProcess, *words: str) -> None:
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("rankserve rank: error: ") and all(w in out.stderr for w in words), out.stderr


def test_unusable_texts_files_are_one_clear_line_naming_file_and_cause(server, tmp_path):
    one_line_error(rank(server, "sofa", str(tmp_path / "candidates.txt")), str(tmp_path / "candidates.txt"), "no such file")
    one_line_error(rank(server, "sofa", str(tmp_path)), str(tmp_path), "is a directory")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Oak Table\n\nBañera | Bathtubs\n".encode("latin-1"))
    one_line_error(rank(server, "sofa", str(latin1)), str(latin1), "not UTF-8 at byte 13 (line 3")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    one_line_error(rank(server, "sofa", str(blank)), str(blank), "no candidate texts")


def test_stdin_line_numbers_and_a_huge_candidate_shortened(server, tmp_path):
    huge = "Velvet Pillow " + "x" * 1_200_000
    lines = ["", TEXTS[0], "", "", TEXTS[1], huge, "   ", TEXTS[2]]  # candidates on lines 2, 5, 6 and 8
    data = "\n".join(lines).encode()
    out = rank(server, "salon chair", "-", stdin=data)
    assert out.returncode == 0, out.stderr
    header, *results = out.stdout.strip().splitlines()
    assert "4 candidates" in header and len(results) == 4
    shown = {int(m.group(1)): m.group(2) for m in (re.search(r"\[line (\d+)\] (.*)$", r) for r in results)}
    assert shown == {2: TEXTS[0], 5: TEXTS[1], 6: huge[:80] + f"… ({len(huge):,} chars)", 8: TEXTS[2]}
    assert len(out.stdout) < 2000  # the 1.2 MB text is not echoed
    # the same file from disk ranks the same way, with the same line numbers
    path = tmp_path / "candidates.txt"
    path.write_bytes(data)
    assert rank(server, "salon chair", str(path)).stdout == out.stdout


@pytest.mark.skipif(shutil.which("openssl") is None or not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()),
                    reason="the TLS gateway needs nginx and the openssl CLI (`make system`)")
def test_rank_over_https_through_the_tls_gateway_and_clear_errors_for_bad_urls(server, tmp_path):
    from tls_gateway import Nginx, make_certificates

    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    certs = make_certificates(tmp_path / "certs")
    token = "first-hour-token"
    nginx = Nginx(tmp_path / "nginx", certs, token, server.http_url, server.grpc_url).start()
    try:
        for url in (f"https://127.0.0.1:{nginx.https_port}", f"grpcs://127.0.0.1:{nginx.grpc_port}"):
            out = rankserve("rank", "--url", url, "--ca-file", str(certs.ca), "--header", f"Authorization: Bearer {token}",
                            "--query", "salon chair", "--texts-file", str(texts))
            assert out.returncode == 0, out.stderr
            assert "3 candidates" in out.stdout and "[line 1] Larkin Salon Chair" in out.stdout
    finally:
        nginx.stop()
    # nothing listens there now: a clear error, not a ValueError traceback
    out = rankserve("rank", "--url", f"https://127.0.0.1:{nginx.https_port}", "--query", "sofa", "--texts-file", str(texts))
    one_line_error(out, "Unavailable")
    one_line_error(rankserve("rank", "--url", "ftp://127.0.0.1:1", "--query", "sofa", "--texts-file", str(texts)),
                   "unsupported URL scheme 'ftp'", "https://")


@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed: the TypeScript SDK cannot be packed here")
def test_typescript_sdk_installed_from_its_tarball_and_api_mismatch_on_a_stage_model(server, tmp_path):
    """The README's install path from a fresh clone: `npm ci && npm pack` in clients/typescript, `npm install <tarball>`
    in your project (offline: the SDK has no runtime dependency), then `import ... from "@rankserve/client"`."""
    if not (TS / "node_modules" / ".bin" / "tsc").exists():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=TS, check=True, capture_output=True, timeout=300)
    packed = subprocess.run(["npm", "pack", "--pack-destination", str(tmp_path)], cwd=TS, capture_output=True, text=True, timeout=300)
    assert packed.returncode == 0, packed.stderr
    tarball = tmp_path / packed.stdout.strip().splitlines()[-1]
    project = tmp_path / "my-app"
    project.mkdir()
    (project / "package.json").write_text(json.dumps({"name": "my-app", "version": "1.0.0", "type": "module"}))
    installed = subprocess.run(["npm", "install", "--offline", "--no-audit", "--no-fund", str(tarball)], cwd=project,
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr
    assert not (project / "node_modules" / "@rankserve" / "client").is_symlink()  # a copy, not a link into the clone
    (project / "main.js").write_text("""
import { RankerClient, ApiMismatch } from "@rankserve/client";
const url = process.argv[2];
const ranked = await new RankerClient(url).rank("salon chair", [["a", "Larkin Salon Chair"], ["b", "Oak Table"]]);
console.log("ranked", ranked.map((r) => r.id).sort().join(","));
for (const model of ["tokenize", "postprocess"]) {
  try {
    await new RankerClient(url, { model }).rank("sofa", ["gray sofa"]);
    console.log(model, "no error");
  } catch (err) {
    console.log(model, err instanceof ApiMismatch ? "ApiMismatch" : `${err.name}: ${err.message}`);
  }
}
""")
    out = subprocess.run(["node", "main.js", f"http://{server.http_url}"], cwd=project, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:3] == ["ranked a,b", "tokenize ApiMismatch", "postprocess ApiMismatch"], out.stdout


def _token_metrics(server) -> dict[tuple[str, str], float]:
    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    found = {}
    for name, labels, value in re.findall(r"^(rankserve_(?:unknown_tokens_total|tokens_total|query_unknown_share_\w+))\{([^}]*)\} (\S+)$",
                                          text, re.M):
        if 'model="tokenize"' in labels:  # summed over the two tokenize instances; buckets keyed by float(le)
            part, le = re.search(r'part="(\w+)"', labels), re.search(r'le="([^"]+)"', labels)
            key = part.group(1) if part else str(float(le.group(1))) if le else ""
            found[name, key] = found.get((name, key), 0.0) + float(value)
    return found


def test_a_query_the_ranker_cannot_read_is_counted_shown_and_warned_about(server, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    before = _token_metrics(server)
    chinese = rank(server, "天蓝色抱枕", str(texts))  # "sky-blue pillow": 天 + 4 x [UNK] in an English WordPiece vocabulary
    assert chinese.returncode == 0, chinese.stderr
    assert "unknown tokens: query 4/5 (80%), candidates 0/" in chinese.stdout.splitlines()[0]
    assert "warning" in chinese.stderr and "4/5 (80%)" in chinese.stderr and "Traceback" not in chinese.stderr
    after = _token_metrics(server)
    assert after["rankserve_unknown_tokens_total", "query"] - before.get(("rankserve_unknown_tokens_total", "query"), 0) == 4
    assert after["rankserve_tokens_total", "query"] - before.get(("rankserve_tokens_total", "query"), 0) == 5
    # the histogram of per-request query shares: 0.8 lands above 0.75, below 0.9
    assert after["rankserve_query_unknown_share_bucket", "0.75"] == before.get(("rankserve_query_unknown_share_bucket", "0.75"), 0)
    assert after["rankserve_query_unknown_share_bucket", "0.9"] - before.get(("rankserve_query_unknown_share_bucket", "0.9"), 0) == 1

    english = rank(server, "sky-blue pillow", str(texts))
    assert english.returncode == 0 and english.stderr == ""
    assert "unknown tokens: query 0/4 (0%), candidates 0/" in english.stdout.splitlines()[0]
    final = _token_metrics(server)
    assert final["rankserve_unknown_tokens_total", "query"] == after["rankserve_unknown_tokens_total", "query"]
    assert final["rankserve_tokens_total", "query"] - after["rankserve_tokens_total", "query"] == 4
    assert final["rankserve_query_unknown_share_bucket", "0.0"] - after.get(("rankserve_query_unknown_share_bucket", "0.0"), 0) == 1

    # the SDKs' result carries the counts over both protocols; chunks add up, the query counted once
    for url in (f"http://{server.http_url}", f"grpc://{server.grpc_url}"):
        with RankerClient(url, chunk_size=2) as client:
            ranked = client.rank("天蓝色抱枕", TEXTS + ["😀 pillow"])
            counts = ranked.token_counts
            assert (counts.query_unknown, counts.query_tokens, counts.texts_unknown) == (4, 5, 1) and counts.query_mostly_unknown
            assert len(ranked) == 4 and ranked[0].rank == 1


def test_with_the_response_cache_a_hit_has_the_outputs_its_first_request_asked_for(tiny_repo, tmp_path):
    """Triton's cache key is the model and the inputs, not the outputs asked for: after a client that asked only for
    indices and scores, a hit has no token counts. The SDK then reports None (no error) and `rank` prints no counts."""
    import numpy as np
    import tritonclient.http as th

    from rankserve.server import embedded

    settings = embedded.free_serve_settings(exit_timeout_s=10, response_cache_bytes=16 * 2**20)
    with embedded.EmbeddedServer(tiny_repo, settings, tmp_path / "tritonserver.log") as cached:
        inputs = [th.InferInput("query", [1], "BYTES"), th.InferInput("texts", [len(TEXTS)], "BYTES")]
        inputs[0].set_data_from_numpy(np.array(["天蓝色抱枕".encode()], dtype=object))
        inputs[1].set_data_from_numpy(np.array([t.encode() for t in TEXTS], dtype=object))
        plain = th.InferenceServerClient(cached.http_url)
        plain.infer("ranker", inputs, outputs=[th.InferRequestedOutput("indices"), th.InferRequestedOutput("scores")])
        plain.close()
        for url in (f"http://{cached.http_url}", f"grpc://{cached.grpc_url}"):
            with RankerClient(url) as client:
                hit = client.rank("天蓝色抱枕", TEXTS)
                assert len(hit) == 3 and hit.token_counts is None
                fresh = client.rank("天蓝色抱枕", TEXTS[:2])  # a miss: computed, with the counts
                assert fresh.token_counts is not None and fresh.token_counts.query_unknown == 4
        texts = tmp_path / "texts.txt"
        texts.write_text("\n".join(TEXTS) + "\n")
        out = rankserve("rank", "--url", f"http://{cached.http_url}", "--query", "天蓝色抱枕", "--texts-file", str(texts))
        assert out.returncode == 0 and "unknown tokens" not in out.stdout and out.stderr == ""
