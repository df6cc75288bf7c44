import numpy as np
import pytest

from rankserve.builder.repository import write_serving_tokenizer
from rankserve.errors import InvalidInput
from rankserve.settings import TokenizeSettings
from rankserve.stages.tokenize import decode_texts, encode_pairs, load_tokenizer, parse_request

SETTINGS = TokenizeSettings(max_length=32, max_candidates=5, max_text_bytes=64)


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer

    from rankserve.train.finetune import pretrained_encoder_dir

    return AutoTokenizer.from_pretrained(pretrained_encoder_dir())


@pytest.fixture(scope="module")
def tokenizer(hf_tokenizer, tmp_path_factory):
    path = write_serving_tokenizer(hf_tokenizer, tmp_path_factory.mktemp("tok") / "tokenizer.json")
    return load_tokenizer(path, SETTINGS)


def _bytes(*values):
    return np.array(list(values), dtype=object)


def test_parse_request_decodes_utf8():
    query, texts = parse_request(_bytes("bañera".encode()), _bytes(b"a", "é".encode(), b""), SETTINGS)
    assert query == "bañera" and texts == ["a", "é", ""]


@pytest.mark.parametrize(
    "query, texts, message",
    [
        (None, _bytes(b"x"), "'query' is required"),
        (_bytes(b"q"), None, "'texts' is required"),
        (_bytes(b"   "), _bytes(b"x"), "'query' is empty"),
        (_bytes(b"q", b"r"), _bytes(b"x"), "exactly one"),
        (_bytes(b"q"), np.array([], dtype=object), "'texts' is empty"),
        (_bytes(b"q"), _bytes(*[b"x"] * 6), "limit of 5"),
        (_bytes(b"q"), _bytes(b"ok", b"\xff\xfe"), r"'texts'\[1\] is not valid UTF-8"),
        (_bytes(b"q\x00"), _bytes(b"x"), "NUL"),
        (_bytes(b"q" * 65), _bytes(b"x"), "'query'.0. is 65 bytes, more than the limit of 64"),
        (_bytes(b"q"), _bytes(b"\xff" + b"x" * 70), r"'texts'\[0\] is not valid UTF-8"),  # invalid before the cut
        (_bytes(b"q"), np.array([1, 2]), "must be BYTES"),
    ],
)
def test_bad_requests_raise_invalid_input(query, texts, message):
    with pytest.raises(InvalidInput, match=message):
        parse_request(query, texts, SETTINGS)


def test_decode_accepts_str_objects():
    assert decode_texts(np.array(["a"], dtype=object), "texts", 10) == ["a"]


def test_encoding_matches_hugging_face_pair_encoding_on_real_queries(tokenizer, hf_tokenizer, wands_queries, dataset):
    texts = [p.text for p in list(dataset.products.values())[:40]]
    for q in wands_queries[:25]:
        ours = encode_pairs(tokenizer, q.text, texts)
        ref = hf_tokenizer([q.text] * len(texts), texts, truncation=True, max_length=SETTINGS.max_length,
                           padding=True, return_tensors="np")
        for name in ("input_ids", "attention_mask", "token_type_ids"):
            assert ours[name].dtype == np.int64
            np.testing.assert_array_equal(ours[name], ref[name], err_msg=f"{name} for {q.text!r}")


def test_pads_only_to_the_longest_pair_and_truncates_at_max_length(tokenizer):
    short = encode_pairs(tokenizer, "sofa", ["gray sofa", "oak table"])
    assert short["input_ids"].shape[1] < 10  # not padded to max_length
    assert short["attention_mask"].sum(axis=1).max() == short["input_ids"].shape[1]
    long = encode_pairs(tokenizer, "sofa", ["word " * 200, "x"])
    assert long["input_ids"].shape == (2, SETTINGS.max_length)
    assert long["attention_mask"][1].sum() < SETTINGS.max_length  # the short pair is padded
    assert long["token_type_ids"][0, -1] == 1  # the text side was truncated, the query kept
    assert long["input_ids"][0, 1] == tokenizer.token_to_id("sofa")


def test_tokenizer_without_padding_is_refused(tmp_path, hf_tokenizer):
    path = tmp_path / "tokenizer.json"
    backend = hf_tokenizer.backend_tokenizer
    backend.save(str(path))
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(path))
    raw.no_padding()
    raw.save(str(path))
    with pytest.raises(ValueError, match="no padding"):
        load_tokenizer(path, SETTINGS)


def test_long_candidate_texts_are_cut_on_a_character_boundary_not_rejected():
    text = "é" * 40  # 80 bytes: the 64-byte cut falls after 32 whole characters
    _, texts = parse_request(_bytes(b"q"), _bytes(text.encode(), ("a" + "é" * 40).encode()), SETTINGS)
    assert texts == ["é" * 32, "a" + "é" * 31]  # the second cut splits an "é": its first byte is dropped
