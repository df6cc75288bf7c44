"""The TypeScript SDK's own tests (node:test) against the real server, run from pytest."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.triton
TS = Path(__file__).resolve().parents[2] / "clients" / "typescript"


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed: the TypeScript SDK cannot run here")
def test_typescript_sdk_against_the_server(server):
    assert (TS / "dist" / "test" / "client.test.js").exists(), "build the SDK first: `make ts` (part of `make test`)"
    out = subprocess.run(["node", "--test", "dist/test/client.test.js"], cwd=TS, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "RANKSERVE_URL": f"http://{server.http_url}"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "# pass 7" in out.stdout and "# fail 0" in out.stdout and "# skipped 0" in out.stdout


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed: the TypeScript SDK cannot run here")
def test_typescript_sdk_retries_budget_and_status_classification():
    """No server: a local listener answers as a gateway would (HTML 413, 429, 503 with Retry-After)."""
    assert (TS / "dist" / "test" / "transport.test.js").exists(), "build the SDK first: `make ts` (part of `make test`)"
    out = subprocess.run(["node", "--test", "dist/test/transport.test.js"], cwd=TS, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "# pass 8" in out.stdout and "# fail 0" in out.stdout and "# skipped 0" in out.stdout
