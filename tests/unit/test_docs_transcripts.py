"""The transcript checker itself (tests/transcripts.py): blocks found, figures masked, a changed
word caught, blocks rewritten in place. The real run is tests/e2e/test_first_hour_docs.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import transcripts  # noqa: E402


def test_every_transcript_the_scenario_runs_is_marked_in_the_docs_once():
    blocks = transcripts.find_blocks()
    assert sorted(blocks) == sorted(transcripts.SCENARIO)
    for block in blocks.values():
        assert transcripts.commands(block.body), block.name


def test_figures_timings_and_temporary_paths_are_masked():
    a = "ready in 2.2 s: 9 models, 845 MiB\n  log /tmp/rankserve-serve-ab12/tritonserver.log\nmax abs 1.19e-06 <= 0.0001, +1.907 and -0.216, 8,181 pairs"
    b = "ready in 13.0 s: 5 models, 1.2 GiB\n  log /tmp/rankserve-serve-zz99/tritonserver.log\nmax abs 5.96e-07 <= 0.0001, -0.3 and +2, 12 pairs"
    assert transcripts.normalize(a) == transcripts.normalize(b)
    assert "ranker_fp32" in transcripts.normalize("ranker_fp32 int8_dynamic b=32")  # digits inside names stay
    assert transcripts.normalize("model ranker_fp32") != transcripts.normalize("model ranker")


def test_a_ranked_list_is_compared_in_any_order_but_not_its_texts():
    one = "query: 'x'\n   1.  -0.29  [2] Rug\n   2.  -0.31  [4] Pillow\ndone"
    other = "query: 'x'\n   1.  +1.90  [4] Pillow\n   2.  +0.31  [2] Rug\ndone"
    assert transcripts.normalize(one) == transcripts.normalize(other)
    assert transcripts.normalize(one) != transcripts.normalize(other.replace("Pillow", "Table"))


def _doc(tmp_path: Path, body: str) -> Path:
    for doc in transcripts.DOCS:
        (tmp_path / doc).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / doc).write_text("# empty\n")
    (tmp_path / "README.md").write_text(f"intro\n\n<!-- transcript: rank -->\n```console\n{body}\n```\n\nafter\n")
    return tmp_path


def test_a_changed_word_is_a_diff_with_the_way_to_regenerate(tmp_path):
    root = _doc(tmp_path, "$ rankserve rank --top-k 2\nquery: 'sofa'  (2 candidates, http)")
    block = transcripts.find_blocks(root)["rank"]
    assert transcripts.diff(block, "$ rankserve rank --top-k 2\nquery: 'sofa'  (3 candidates, http)") == ""
    changed = transcripts.diff(block, "$ rankserve rank --top-k 2\nquery: 'sofa'  (3 candidates, grpc)")
    assert "-query: 'sofa'  (N candidates, http)" in changed and "+query: 'sofa'  (N candidates, grpc)" in changed
    assert "make docs-transcripts" in transcripts.HINT


def test_write_replaces_only_the_block_body(tmp_path):
    root = _doc(tmp_path, "$ rankserve rank\nold output")
    blocks = transcripts.find_blocks(root)
    assert transcripts.write(blocks, {"rank": "$ rankserve rank\nnew output\nline two"}, root) == ["README.md"]
    assert (root / "README.md").read_text() == ("intro\n\n<!-- transcript: rank -->\n```console\n$ rankserve rank\nnew output\n"
                                                "line two\n```\n\nafter\n")
    assert transcripts.write(transcripts.find_blocks(root), {"rank": "$ rankserve rank\nnew output\nline two"}, root) == []


def test_a_marker_without_a_console_block_is_an_error(tmp_path):
    root = _doc(tmp_path, "x")
    (root / "README.md").write_text("<!-- transcript: rank -->\nno fence\n")
    with pytest.raises(ValueError, match="must be followed by a ```console block"):
        transcripts.find_blocks(root)
