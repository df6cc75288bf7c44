"""What ``verify_repository`` proves before every start of tritonserver: the repository holds
exactly what its manifest lists (every model folder, every file of each, config and model.py
included), nothing outside the repository, a malformed or older manifest is a clear error; and
``rankserve build`` deletes only the model folders an earlier build made."""

import json
import os
import shutil

import pytest

from conftest import TINY
from rankserve.builder.repository import MANIFEST, build_repository, model_entry, sha256, verify_repository
from rankserve.errors import BuildError

pytestmark = pytest.mark.slow


@pytest.fixture
def repo(tiny_repo, tmp_path):
    copy = tmp_path / "repo"
    # the session's server may have served tiny_repo already: its stubs wrote __pycache__ there
    shutil.copytree(tiny_repo, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def _manifest(repo):
    return json.loads((repo / MANIFEST).read_text())


def _save(repo, manifest):
    (repo / MANIFEST).write_text(json.dumps(manifest))


def test_a_fresh_build_verifies(repo):
    assert verify_repository(repo)["manifest_format"] == 2


def test_the_stage_code_is_covered(repo):
    with (repo / "tokenize" / "1" / "model.py").open("a") as f:
        f.write("\nimport os  # code Triton would run\n")
    with pytest.raises(BuildError, match=r"tokenize/1/model\.py does not match its checksum"):
        verify_repository(repo)


def test_the_config_content_is_covered(repo):
    config = repo / "tokenize" / "config.pbtxt"
    text = config.read_text()
    config.write_text(text.replace('string_value: "64"', 'string_value: "100000"', 1))  # the max_length the stage applies
    assert config.read_text() != text
    with pytest.raises(BuildError, match=r"tokenize/config\.pbtxt does not match its checksum"):
        verify_repository(repo)


def test_a_model_folder_the_manifest_does_not_list_is_refused(repo):
    shutil.copytree(repo / "postprocess", repo / "other")
    with pytest.raises(BuildError, match="holds model folders .* does not list: other"):
        verify_repository(repo)


def test_a_file_the_manifest_does_not_list_is_refused(repo):
    (repo / "postprocess" / "1" / "helper.py").write_text("print('unchecked')\n")
    with pytest.raises(BuildError, match=r"helper\.py is not listed"):
        verify_repository(repo)
    (repo / "postprocess" / "1" / "helper.py").unlink()
    (repo / "postprocess" / "2").mkdir()  # another version Triton's policy could load
    (repo / "postprocess" / "2" / "model.py").write_text("print('unchecked')\n")
    with pytest.raises(BuildError, match=r"postprocess/2/model\.py is not listed"):
        verify_repository(repo)


@pytest.mark.parametrize("path", ["/etc/passwd", "postprocess/../../outside", "postprocess/1/../../tokenize/1/model.py",
                                  "tokenize/1/model.py", "postprocess"])
def test_manifest_paths_outside_the_model_folder_are_refused(repo, tmp_path, path):
    (tmp_path / "outside").write_text("secret\n")
    manifest = _manifest(repo)
    target = repo / path if not path.startswith("/") else tmp_path / "outside"
    digest = sha256(target) if target.is_file() else "0" * 64
    manifest["models"]["postprocess"]["files"][path] = digest
    _save(repo, manifest)
    with pytest.raises(BuildError, match="is not a valid rankserve manifest: .* is not a path inside the model's folder"):
        verify_repository(repo)


def test_a_symbolic_link_out_of_the_repository_is_refused(repo, tiny_repo, tmp_path):
    (tmp_path / "outside.py").write_text("print('code from elsewhere')\n")
    adapter = repo / "postprocess" / "1" / "model.py"
    adapter.unlink()
    adapter.symlink_to(tmp_path / "outside.py")
    manifest = _manifest(repo)
    manifest["models"]["postprocess"]["files"]["postprocess/1/model.py"] = sha256(tmp_path / "outside.py")
    _save(repo, manifest)
    with pytest.raises(BuildError, match="points outside the repository"):
        verify_repository(repo)
    adapter.unlink()
    shutil.copyfile(tiny_repo / "postprocess" / "1" / "model.py", adapter)
    manifest["models"]["postprocess"]["files"]["postprocess/1/model.py"] = sha256(adapter)
    _save(repo, manifest)
    verify_repository(repo)
    os.symlink(tmp_path, repo / "postprocess" / "linked")
    with pytest.raises(BuildError, match="symbolic link to a folder"):
        verify_repository(repo)


@pytest.mark.parametrize("change, message", [
    (lambda m: m.pop("models"), "'models' must be an object"),
    (lambda m: m.update(models=[]), "'models' must be an object"),
    (lambda m: m["models"].update(rank="x"), "models.rank must be an object"),
    (lambda m: m["models"]["rank"].pop("files"), "models.rank must be an object"),
    (lambda m: m["models"]["rank"].pop("config"), "models.rank.config must be 'rank/config.pbtxt'"),
    (lambda m: m["models"]["rank"]["files"].update({"rank/1/model.onnx": 7}), "not a SHA-256 hex digest"),
    (lambda m: m["models"].update({"../up": m["models"]["rank"]}), "'../up' is not a plain folder name"),
])
def test_a_malformed_manifest_is_a_clear_error(repo, change, message):
    manifest = _manifest(repo)
    change(manifest)
    _save(repo, manifest)
    with pytest.raises(BuildError, match=message):
        verify_repository(repo)
    (repo / MANIFEST).write_text("[1, 2]")
    with pytest.raises(BuildError, match="not a JSON object"):
        verify_repository(repo)


def test_a_manifest_of_the_older_format_is_refused_with_the_way_out(repo):
    manifest = _manifest(repo)
    del manifest["manifest_format"]
    _save(repo, manifest)
    with pytest.raises(BuildError, match=r"older rankserve \(manifest format 1.*rebuild with `rankserve build --ranker \S+ --out \S+`"):
        verify_repository(repo)


def test_bytecode_is_not_listed_and_is_removed_before_each_start(repo):
    from rankserve.builder.repository import BYTECODE_DIR, remove_bytecode, verify_for_start

    cache = repo / "rank" / "1" / BYTECODE_DIR
    cache.mkdir()
    (cache / "model.cpython-311.pyc").write_bytes(b"\0" * 16)
    verify_repository(repo)  # what the stub writes on every load is not part of the manifest...
    verify_for_start(repo)  # ...and is removed before each start: the stub compiles the verified source
    assert not cache.exists()
    assert remove_bytecode(repo) == []


def test_a_rebuild_deletes_no_folder_an_earlier_build_did_not_make(repo, tiny_ranker):
    """Another team's model in the same folder: refused with nothing deleted (the stale model of the
    earlier build included); once it is moved out, the earlier build's stale model is removed."""
    other = repo / "other_team"
    shutil.copytree(repo / "postprocess", other)
    shutil.copytree(repo / "ranker_fp32", repo / "ranker_old")  # a model the earlier build made...
    manifest = _manifest(repo)
    manifest["models"]["ranker_old"] = model_entry(repo, "ranker_old")  # ...and recorded
    _save(repo, manifest)
    before = sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*"))
    with pytest.raises(BuildError, match="holds folders no earlier rankserve build made .*: other_team; nothing was deleted"):
        build_repository(tiny_ranker, repo, TINY, log=lambda _m: None)
    assert sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*")) == before
    shutil.move(other, repo.parent / "other_team")
    build_repository(tiny_ranker, repo, TINY, log=lambda _m: None)
    assert not (repo / "ranker_old").exists() and "ranker_old" not in verify_repository(repo)["models"]
