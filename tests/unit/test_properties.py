"""Property tests of the pure stage functions: any unicode, any bytes, any lengths, any scores."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rankserve.errors import InvalidInput
from rankserve.settings import TokenizeSettings
from rankserve.stages.postprocess import order, parse_top_k
from rankserve.stages.tokenize import encode_pairs, load_tokenizer, parse_request

SETTINGS = TokenizeSettings(max_length=32, max_candidates=8, max_text_bytes=200)
values = st.one_of(st.binary(max_size=300), st.text(max_size=120).map(str.encode))


@settings(max_examples=300, deadline=None)
@given(query=st.lists(values, min_size=0, max_size=3), texts=st.lists(values, min_size=0, max_size=10))
def test_any_request_bytes_parse_or_fail_as_invalid_input(query, texts):
    q = np.array(query, dtype=object)
    t = np.array(texts, dtype=object)
    try:
        parsed_query, parsed_texts = parse_request(q, t, SETTINGS)
    except InvalidInput as exc:
        assert str(exc) and "Traceback" not in str(exc)
        return
    assert parsed_query.strip() and "\x00" not in parsed_query and len(parsed_query.encode()) <= SETTINGS.max_text_bytes
    assert 1 <= len(parsed_texts) <= SETTINGS.max_candidates == 8
    for raw, text in zip(texts, parsed_texts):
        assert raw.startswith(text.encode()) and len(text.encode()) <= SETTINGS.max_text_bytes  # at most cut, never altered


@pytest.fixture(scope="module")
def tokenizer(tiny_repo):
    return load_tokenizer(tiny_repo / "tokenize" / "1" / "tokenizer.json", SETTINGS)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(query=st.text(min_size=1, max_size=200), texts=st.lists(st.text(max_size=400), min_size=1, max_size=6),
       buckets=st.sampled_from(["", "16,32", "32"]))
def test_any_unicode_encodes_to_consistent_tensors_within_max_length(tokenizer, query, texts, buckets):
    widths = TokenizeSettings(max_length=32, pad_buckets=buckets).buckets
    encoded = encode_pairs(tokenizer, query, texts, widths)
    shapes = {v.shape for v in encoded.values()}
    assert len(shapes) == 1
    (rows, width), = shapes
    assert rows == len(texts) and width <= 32 and (not widths or width in widths)
    mask = encoded["attention_mask"]
    assert set(np.unique(mask)) <= {0, 1} and mask[:, 0].all()  # every pair has at least [CLS]
    lengths = mask.sum(axis=1)
    assert all((mask[i, :n] == 1).all() and (mask[i, n:] == 0).all() for i, n in enumerate(lengths))  # right-padded


@settings(max_examples=300, deadline=None)
@given(scores=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=1, max_size=60),
       k=st.integers(min_value=1, max_value=80))
def test_order_is_a_sorted_prefix_of_a_permutation_with_nan_last(scores, k):
    indices, ordered = order(np.array(scores, dtype=np.float32), min(k, len(scores)))
    assert len(indices) == min(k, len(scores)) == len(set(indices.tolist()))
    key = [(-np.inf if np.isnan(s) else s) for s in ordered]
    assert key == sorted(key, reverse=True)
    nan = np.isnan(ordered)
    assert not (nan[:-1] & ~nan[1:]).any()  # no number after a NaN


@given(k=st.integers(min_value=-2**31, max_value=2**31 - 1), n=st.integers(min_value=1, max_value=1000))
def test_top_k_is_kept_or_refused(k, n):
    try:
        assert parse_top_k(np.array([k], dtype=np.int64), n) == k and 1 <= k <= n
    except InvalidInput:
        assert k < 1 or k > n
