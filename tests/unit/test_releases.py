"""Releases on one host (rankserve.releases): names, the gate, publishing whole and never over
another release, the atomic ``current`` pointer and its history; and the CLI over them."""

import json
import os
import subprocess
import threading
from pathlib import Path

import pytest

from rankserve import releases as rel
from rankserve.cli import main
from rankserve.errors import BuildError

PASSED = {"passed": True, "strict": True, "relative_drop": 0.0, "max_drop": 0.02}


def _manifest(gates: dict, default: str = "fp32", rule: str = "fastest strict", models: dict | None = None) -> dict:
    return {"manifest_format": 2, "models": models or {}, "default_variant": default, "default_rule": rule,
            "variants": {n: {"loaded": True, "gate": g} for n, g in gates.items()}, "serving": {"loaded": list(gates)}}


def _repo(path: Path, gates: dict | None = None, weights: bytes = b"weights-1", **kw) -> Path:
    """A small repository the real verify_repository accepts: every file of its two model folders
    listed with its checksum."""
    from rankserve.builder.repository import model_entry

    (path / "rank" / "1").mkdir(parents=True)
    (path / "ranker" / "1").mkdir(parents=True)  # an ensemble's empty version folder must travel too
    (path / "rank" / "config.pbtxt").write_text('name: "rank"\n')
    (path / "ranker" / "config.pbtxt").write_text('name: "ranker"\n')
    (path / "rank" / "1" / "model.onnx").write_bytes(weights)
    models = {name: model_entry(path, name) for name in ("rank", "ranker")}
    (path / "manifest.json").write_text(json.dumps(_manifest(gates or {"fp32": PASSED}, models=models, **kw)))
    return path


@pytest.mark.parametrize("name", ["r-0123456789ab", "0.1.0", "ranker-v2"])
def test_release_names_follow_the_publish_script_rule(name):
    assert rel.check_name(name) == name


@pytest.mark.parametrize("name", ["", "-x", ".x", "Upper", "a/b", "a" * 41, "current", "history.json", "a b"])
def test_bad_release_names_are_refused(name):
    with pytest.raises(rel.ReleaseError, match="release name"):
        rel.check_name(name)


def test_the_gate_must_have_passed_for_every_served_variant():
    assert rel.gate_problems(_manifest({"fp32": PASSED, "int8": PASSED})) == []
    failed = {**PASSED, "passed": False, "relative_drop": 0.05}
    assert rel.gate_problems(_manifest({"fp32": PASSED, "int8": failed})) == [
        "variant int8 failed its accuracy gate (NDCG@10 drop 5.00%, limit 2.00%)"]
    assert "no accuracy gate record" in rel.gate_problems(_manifest({"fp32": None}))[0]
    assert "strict gate" in rel.gate_problems(_manifest({"fp32": {**PASSED, "strict": False}}))[0]
    assert rel.gate_problems(_manifest({"pruned": {**PASSED, "strict": False}}, default="pruned", rule="named")) == []
    assert "no default variant" in rel.gate_problems({"variants": {}, "default_variant": None})[0]


def test_publish_copies_the_repository_whole_under_its_content_name(tmp_path):
    repo = _repo(tmp_path / "repo")
    name, new = rel.publish(repo, tmp_path / "releases")
    assert new and name == rel.default_name(rel.content_digest(repo)) and name.startswith("r-") and len(name) == 14
    published = tmp_path / "releases" / name / "model_repository"
    assert rel.content_digest(published) == rel.content_digest(repo)
    assert (published / "ranker" / "1").is_dir()
    assert (published / rel.GATE_STAMP).read_text() == rel.gate_stamp_line(published)
    info = rel.release_info(tmp_path / "releases", name)
    assert info["digest"] == rel.content_digest(repo) and info["gate"]["variants"]["fp32"]["passed"] is True
    assert not os.access(published / "manifest.json", os.W_OK) or os.getuid() == 0
    assert oct((published / "manifest.json").stat().st_mode & 0o777) == "0o444"
    assert [p.name for p in (tmp_path / "releases").iterdir()] == [name]  # no staging folder left


def test_publishing_again_is_a_no_op_and_other_content_under_a_name_is_refused(tmp_path):
    repo, other = _repo(tmp_path / "repo"), _repo(tmp_path / "other", weights=b"weights-2")
    assert rel.publish(repo, tmp_path / "releases", "v1") == ("v1", True)
    before = (tmp_path / "releases" / "v1" / rel.RELEASE_FILE).read_text()
    assert rel.publish(repo, tmp_path / "releases", "v1") == ("v1", False)
    with pytest.raises(rel.ReleaseError, match="never overwritten"):
        rel.publish(other, tmp_path / "releases", "v1")
    assert (tmp_path / "releases" / "v1" / rel.RELEASE_FILE).read_text() == before
    assert rel.content_digest(other) != rel.content_digest(repo)


def test_a_failed_or_missing_gate_or_a_damaged_repository_is_not_published(tmp_path):
    failed = _repo(tmp_path / "failed", {"fp32": {**PASSED, "passed": False}})
    with pytest.raises(rel.ReleaseError, match="failed its accuracy gate"):
        rel.publish(failed, tmp_path / "releases")
    with pytest.raises(rel.ReleaseError, match="no accuracy gate record"):
        rel.publish(_repo(tmp_path / "ungated", {"fp32": None}), tmp_path / "releases")
    damaged = _repo(tmp_path / "damaged")
    (damaged / "rank" / "1" / "model.onnx").write_bytes(b"changed")
    with pytest.raises(BuildError, match="checksum"):
        rel.publish(damaged, tmp_path / "releases")
    with pytest.raises(rel.ReleaseError, match="no manifest.json"):
        rel.publish(tmp_path / "nothing", tmp_path / "releases")
    assert not (tmp_path / "releases").exists() or rel.list_releases(tmp_path / "releases") == []


def test_promote_swaps_the_pointer_and_rollback_walks_the_history_back(tmp_path):
    root = tmp_path / "releases"
    a, _ = rel.publish(_repo(tmp_path / "a"), root)
    b, _ = rel.publish(_repo(tmp_path / "b", weights=b"b"), root)
    c, _ = rel.publish(_repo(tmp_path / "c", weights=b"c"), root)
    assert rel.current(root) is None
    assert rel.promote(root, a) is None
    assert rel.promote(root, b) == a and rel.promote(root, c) == b
    assert os.readlink(root / "current") == c and (root / "current" / "model_repository").is_dir()
    assert rel.history(root) == [a, b, c]
    assert rel.promote(root, c) == c and rel.history(root) == [a, b, c]  # promoting the current one changes nothing
    assert rel.rollback(root) == b and rel.current(root) == b
    assert rel.rollback(root) == a and rel.history(root) == [a]
    with pytest.raises(rel.ReleaseError, match="nothing to roll back"):
        rel.rollback(root)
    with pytest.raises(rel.ReleaseError, match="no release"):
        rel.promote(root, "r-000000000000")
    assert rel.current(root) == a
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".") and p.name != rel.LOCK) == []  # no temporary left


def test_promote_refuses_a_release_changed_after_publishing(tmp_path):
    root = tmp_path / "releases"
    name, _ = rel.publish(_repo(tmp_path / "a"), root)
    onnx = root / name / "model_repository" / "rank" / "1" / "model.onnx"
    onnx.chmod(0o644)
    onnx.write_bytes(b"tampered")
    with pytest.raises(BuildError, match="checksum"):
        rel.promote(root, name)
    manifest = root / name / "model_repository" / "manifest.json"
    manifest.chmod(0o644)
    manifest.write_text(manifest.read_text() + " ")
    with pytest.raises(rel.ReleaseError, match="gate.sha256 is missing or does not match"):
        rel.promote(root, name)
    assert rel.current(root) is None


def test_concurrent_promotions_leave_a_consistent_pointer_and_history(tmp_path):
    root = tmp_path / "releases"
    names = [rel.publish(_repo(tmp_path / str(i), weights=bytes([i])), root)[0] for i in range(4)]
    threads = [threading.Thread(target=rel.promote, args=(root, n)) for n in names * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert rel.current(root) == rel.history(root)[-1]
    assert set(rel.history(root)) <= set(names)


def test_the_gate_stamp_is_what_sha256sum_checks(tmp_path):
    repo = _repo(tmp_path / "repo")
    rel.write_gate_stamp(repo)
    assert subprocess.run(["sha256sum", "-c", rel.GATE_STAMP], cwd=repo, capture_output=True).returncode == 0
    with pytest.raises(rel.ReleaseError):
        rel.write_gate_stamp(_repo(tmp_path / "failed", {"fp32": {**PASSED, "passed": False}}))
    assert not (tmp_path / "failed" / rel.GATE_STAMP).exists()


def test_the_cli_publishes_promotes_and_rolls_back(tmp_path, capsys):
    root = tmp_path / "releases"
    assert main(["publish", "--model-repository", str(_repo(tmp_path / "a")), "--releases", str(root), "--name", "one"]) == 0
    assert main(["publish", "--model-repository", str(_repo(tmp_path / "b", weights=b"b")), "--releases", str(root), "--name", "two"]) == 0
    assert main(["publish", "--model-repository", str(tmp_path / "a"), "--releases", str(root), "--name", "one"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert main(["publish", "--model-repository", str(_repo(tmp_path / "f", {"fp32": None})), "--releases", str(root)]) == 2
    assert "cannot be published" in capsys.readouterr().err
    assert main(["promote", "one", "--releases", str(root)]) == 0
    assert main(["promote", "two", "--releases", str(root)]) == 0
    assert main(["rollback", "--releases", str(root)]) == 0
    assert "current -> one (was two)" in capsys.readouterr().out
    assert main(["releases", "--releases", str(root)]) == 0
    assert "* one" in capsys.readouterr().out
    assert main(["serve", "--releases", str(root), "--model-repository", "x"]) == 2
