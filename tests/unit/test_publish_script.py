"""deploy/docker/publish.sh (`rankserve-publish` in the models and TensorRT images): a release
appears whole or not at all, is never overwritten, and a re-run is harmless. Run with busybox's
sh and tools (the models image is busybox) where installed, and with the system's sh."""

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "docker" / "publish.sh"
BUSYBOX = shutil.which("busybox")


def _open_dir() -> Path:
    """A folder every user can enter (pytest's own are root's only): the script also runs as uid 10001."""
    path = Path(tempfile.mkdtemp(prefix="rankserve-publish-"))
    path.chmod(0o755)
    return path


def _shells(bin_dir: Path) -> list:
    shells = [["sh"]]
    if BUSYBOX:  # every tool the script calls from busybox, as in the image
        for tool in ("sh", "cp", "mv", "rm", "mkdir", "cmp", "diff", "chmod", "hostname", "id", "sleep", "cat", "echo",
                     "sha256sum", "sed"):
            (bin_dir / tool).symlink_to(BUSYBOX)
        shells.append(["env", f"PATH={bin_dir}", "sh"])
    return shells


@pytest.fixture
def tmp_path():
    path = _open_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=["sh", "busybox"])
def publish(request):
    bin_dir = _open_dir()
    request.addfinalizer(lambda: shutil.rmtree(bin_dir, ignore_errors=True))
    shells = _shells(bin_dir)
    if request.param == "busybox" and len(shells) < 2:
        pytest.skip("busybox is not installed (`make system` installs it)")
    shell = shells[0 if request.param == "sh" else 1]

    def run(*args, env=None, user=None):
        prefix = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"] if user else []
        return subprocess.run(prefix + shell + [str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=60,
                              env={**os.environ, **(env or {})})
    return run


def _bundle(path: Path, manifest: str = '{"models": {"ranker": 1}}') -> Path:
    (path / "model_repository" / "rank" / "1").mkdir(parents=True)
    (path / "model_repository" / "manifest.json").write_text(manifest)
    (path / "model_repository" / "gate.sha256").write_text(  # what `rankserve publish --stamp-only` writes
        f"{hashlib.sha256(manifest.encode()).hexdigest()}  manifest.json\n")
    (path / "model_repository" / "rank" / "1" / "model.onnx").write_bytes(os.urandom(4096))
    (path / "artifacts" / "data").mkdir(parents=True)
    (path / "artifacts" / "data" / "heldout.jsonl").write_text("{}\n")
    return path


def _tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_release_is_published_whole_and_a_rerun_does_nothing(publish, tmp_path):
    bundle, volume = _bundle(tmp_path / "bundle"), tmp_path / "volume"
    out = publish("0.1.0", bundle, volume)
    assert out.returncode == 0 and "published release 0.1.0" in out.stdout, out.stderr
    release = volume / "releases" / "0.1.0"
    assert _tree(release) == _tree(bundle)
    assert [p.name for p in (volume / "releases").iterdir()] == ["0.1.0"]  # no staging folder left
    again = publish("0.1.0", bundle, volume)
    assert again.returncode == 0 and "already published" in again.stdout


def test_a_release_is_never_overwritten(publish, tmp_path):
    volume = tmp_path / "volume"
    assert publish("0.1.0", _bundle(tmp_path / "a"), volume).returncode == 0
    before = _tree(volume / "releases" / "0.1.0")
    other = publish("0.1.0", _bundle(tmp_path / "b", '{"models": {"ranker": 2}}'), volume)
    assert other.returncode == 1 and "never overwritten" in other.stderr
    assert _tree(volume / "releases" / "0.1.0") == before


def test_a_derived_release_is_built_in_a_copy_and_appears_only_when_done(publish, tmp_path):
    """The GPU engines Job: build in a staging copy of the release, publish <release>-gpu whole; a
    failed build publishes nothing and leaves the source release as it was."""
    volume = tmp_path / "volume"
    assert publish("0.1.0", _bundle(tmp_path / "bundle"), volume).returncode == 0
    source = volume / "releases" / "0.1.0"
    before = _tree(source)
    failed = publish("0.1.0-gpu", source, volume, "--", "sh", "-c", "echo half > model_repository/rank/1/model.plan; exit 3")
    assert failed.returncode == 1 and "not published" in failed.stderr
    assert sorted(p.name for p in (volume / "releases").iterdir()) == ["0.1.0"]
    build = "echo plan > model_repository/rank/1/model.plan && echo '{\"engines\": 1}' > model_repository/manifest.json"
    done = publish("0.1.0-gpu", source, volume, "--", "sh", "-c", build)
    assert done.returncode == 0, done.stderr
    gpu = volume / "releases" / "0.1.0-gpu" / "model_repository"
    assert (gpu / "rank" / "1" / "model.plan").read_text() == "plan\n" and "engines" in (gpu / "manifest.json").read_text()
    assert subprocess.run(["sha256sum", "-c", "gate.sha256"], cwd=gpu, capture_output=True).returncode == 0  # names source.json
    assert (gpu / "gate.sha256").read_text().endswith("  source.json\n")
    assert _tree(source) == before  # the source release is untouched
    again = publish("0.1.0-gpu", source, volume, "--", "false")  # the Job re-run by a sync: nothing to build
    assert again.returncode == 0 and "already published" in again.stdout


def test_a_repository_without_a_valid_gate_stamp_is_not_published(publish, tmp_path):
    """The stamp `rankserve publish --stamp-only` writes once the accuracy gate passed: missing, or
    stale (the manifest changed since), the release is refused and nothing appears."""
    bundle, volume = _bundle(tmp_path / "bundle"), tmp_path / "volume"
    stamp = bundle / "model_repository" / "gate.sha256"
    good = stamp.read_text()
    stamp.unlink()
    out = publish("0.1.0", bundle, volume)
    assert out.returncode == 1 and "gate of this repository was not checked" in out.stderr
    stamp.write_text(good)
    (bundle / "model_repository" / "manifest.json").write_text('{"models": {"ranker": 3}}')
    out = publish("0.1.0", bundle, volume)
    assert out.returncode == 1 and "does not match its manifest" in out.stderr
    assert not (volume / "releases").exists() or list((volume / "releases").iterdir()) == []


def test_the_stamp_rankserve_writes_is_the_one_the_script_checks(publish, tmp_path):
    """A real gated manifest stamped by rankserve.releases.write_gate_stamp publishes; a failed gate gets no stamp."""
    import json

    from rankserve import releases

    bundle = _bundle(tmp_path / "bundle")
    repo = bundle / "model_repository"
    (repo / "gate.sha256").unlink()
    gate = {"passed": True, "strict": True}
    from rankserve.builder.repository import model_entry

    for name in ("rank", "ranker"):  # every model folder listed, as the builder lists them
        (repo / name / "1").mkdir(parents=True, exist_ok=True)
        (repo / name / "config.pbtxt").write_text(f'name: "{name}"\n')
    (repo / "manifest.json").write_text(json.dumps({"manifest_format": 2,
                                                    "models": {n: model_entry(repo, n) for n in ("rank", "ranker")},
                                                    "default_variant": "fp32",
                                                    "variants": {"fp32": {"loaded": True, "gate": gate}},
                                                    "serving": {"loaded": ["fp32"]}}))
    releases.write_gate_stamp(repo)
    out = publish("0.1.0", bundle, tmp_path / "volume")
    assert out.returncode == 0, out.stderr
    published = tmp_path / "volume" / "releases" / "0.1.0" / "model_repository"
    assert (published / "gate.sha256").read_text() == releases.gate_stamp_line(published)


def test_it_waits_for_the_source_then_says_what_is_missing(publish, tmp_path):
    out = publish("0.1.0-gpu", tmp_path / "releases" / "0.1.0", tmp_path, "--", "true", env={"RANKSERVE_WAIT_S": "5"})
    assert out.returncode == 1 and "waiting for" in out.stdout and "not a published release" in out.stderr


@pytest.mark.parametrize("name", ["", "Release", "-x", ".hidden", "a/b", "x" * 41])
def test_bad_release_names_are_refused(publish, tmp_path, name):
    out = publish(name, _bundle(tmp_path / "bundle"), tmp_path / "volume")
    assert out.returncode == 2 and not (tmp_path / "volume").exists()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv to act as uid 10001")
def test_a_volume_the_job_cannot_write_gets_a_clear_error(publish, tmp_path):
    """NFS-type volumes ignore fsGroup: a root-owned export is not writable by uid 10001."""
    bundle, volume = _bundle(tmp_path / "bundle"), tmp_path / "volume"
    volume.mkdir()
    out = publish("0.1.0", bundle, volume, user=10001)
    assert out.returncode == 1 and "cannot write" in out.stderr and "uid 10001" in out.stderr, out.stderr
    os.chown(volume, 10001, 10001)
    assert publish("0.1.0", bundle, volume, user=10001).returncode == 0
