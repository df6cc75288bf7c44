"""A newcomer's first hour, the docs part (issue 18, item 10): the READMEs' transcripts are what the
commands really print, and the commands rankserve suggests work as printed. Each runs the real
commands (``python -m rankserve``, the transcripts' own command lines) against the real tritonserver."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import transcripts  # noqa: E402  (tests/transcripts.py)



def _rankserve(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rankserve", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.mark.triton
def test_the_readme_transcripts_are_what_the_commands_print(tiny_ranker, tmp_path):
    """Build, serve, health, rank over HTTP and gRPC, curl and a curl error, as the READMEs show them,
    run in a fresh folder against a real server; every block equals the run after normalization."""
    blocks = transcripts.find_blocks()
    assert set(blocks) == set(transcripts.SCENARIO)
    (tmp_path / "clone").mkdir()
    generated = transcripts.run_scenario(blocks, transcripts.Workspace(tmp_path / "clone", tiny_ranker))

    build = generated["build"]
    assert "[4/5] variants: skipped" in build and "[5/5]" in build
    assert " 0 pairs/s" not in build and "speed not measured: no --data" in build  # no figure that was never measured
    assert '"model_name":"ranker"' in generated["curl"]
    assert generated["curl-error"].endswith("HTTP 400")
    assert "Traceback" not in "".join(generated.values())

    stale = [d for b in blocks.values() if (d := transcripts.diff(b, generated[b.name]))]
    assert not stale, "\n\n".join(stale) + f"\n\n{transcripts.HINT}"


def _suggested_command(stderr: str) -> str:
    commands = re.findall(r"`(rankserve build [^`]+)`", stderr)
    assert commands, f"no rankserve build command suggested:\n{stderr}"
    return commands[0]


@pytest.mark.slow
@pytest.mark.parametrize("command", [("serve", "--model-repository"), ("publish", "--releases", "rel", "--model-repository"),
                                     ("report", "--model-repository")])
def test_a_missing_repository_suggests_a_build_command_that_works_as_printed(tiny_ranker, tmp_path, command):
    """`rankserve serve|publish|report` on a folder that is no repository name a `rankserve build`
    command; run as printed (its ranker placeholder filled in, as its message says), it builds one."""
    empty = tmp_path / "model_repository"
    empty.mkdir()
    failed = _rankserve(*command, str(empty), cwd=tmp_path)
    assert failed.returncode != 0 and "Traceback" not in failed.stderr, failed.stderr
    suggested = _suggested_command(failed.stderr)
    assert "--ranker " in suggested, suggested  # `rankserve build --out X` alone fails: --ranker is required
    if "RANKER_DIR" in suggested:
        assert "RANKER_DIR: your Hugging Face cross-encoder directory" in failed.stderr
    built = _rankserve(*suggested.replace("RANKER_DIR", str(tiny_ranker)).split()[1:], cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    assert (empty / "manifest.json").is_file()


@pytest.mark.slow
def test_a_repository_from_an_older_rankserve_suggests_a_rebuild_with_its_own_ranker(tiny_ranker, tmp_path):
    """A manifest of an older format records its ranker: the suggested rebuild names it and runs as printed."""
    import json

    repo = tmp_path / "model_repository"
    assert _rankserve("build", "--ranker", str(tiny_ranker), "--out", str(repo)).returncode == 0
    manifest = json.loads((repo / "manifest.json").read_text())
    del manifest["manifest_format"]
    (repo / "manifest.json").write_text(json.dumps(manifest))
    failed = _rankserve("serve", "--model-repository", str(repo))
    assert failed.returncode == 2 and "older rankserve" in failed.stderr, failed.stderr
    suggested = _suggested_command(failed.stderr)
    assert f"--ranker {tiny_ranker}" in suggested and "RANKER_DIR" not in suggested
    assert _rankserve(*suggested.split()[1:]).returncode == 0
    from rankserve.builder.repository import verify_repository

    assert verify_repository(repo)["manifest_format"] == 2
