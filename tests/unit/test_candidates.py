"""The candidates file of `rankserve rank`: line numbers, clear errors, shortened echoes."""

import io
import re

import numpy as np
import pytest

from rankserve.candidates import Candidate, read_candidates, shorten
from rankserve.errors import UsageError
from rankserve_client import TokenCounts
from rankserve_client._common import token_counts


def test_blank_lines_are_skipped_but_numbering_follows_the_file(tmp_path):
    path = tmp_path / "texts.txt"
    path.write_bytes("\ufeffOak Table\r\n\n   \n  Gray Rug  \nlast".encode())
    assert read_candidates(str(path)) == [Candidate(1, "Oak Table"), Candidate(4, "Gray Rug"), Candidate(5, "last")]


def test_dash_reads_standard_input():
    assert read_candidates("-", io.BytesIO(b"\nsofa\n")) == [Candidate(2, "sofa")]


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing.txt", "missing.txt: no such file"),
    (lambda p: p, "is a directory"),
    (lambda p: (p / "latin1.txt").write_bytes(b"Oak\nBa\xf1era\n") and p / "latin1.txt", "not UTF-8 at byte 6 (line 2, byte 3 of it)"),
    (lambda p: (p / "blank.txt").write_text("\n \n") and p / "blank.txt", "no candidate texts in it"),
])
def test_unusable_files_are_one_clear_error_naming_the_file(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(UsageError, match=re.escape(message)) as info:
        read_candidates(str(path))
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_long_texts_are_shortened_with_their_length():
    assert shorten("x" * 80) == "x" * 80
    assert shorten("y" * 1_200_000) == "y" * 80 + "… (1,200,000 chars)"


def test_the_sdk_sums_chunk_counts_and_counts_the_query_once():
    counts = token_counts([np.array([4, 5, 1, 10]), np.array([4, 5, 2, 30])])
    assert counts == TokenCounts(4, 5, 3, 40) and counts.query_unknown_share == 0.8 and counts.query_mostly_unknown
    assert counts.texts_unknown_share == 3 / 40
    assert token_counts([np.array([0, 4, 0, 9]), None]) is None and token_counts([]) is None
    assert not TokenCounts(0, 0, 0, 0).query_mostly_unknown
