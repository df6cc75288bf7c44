"""Unknown-token counts of the tokenize stage (rankserve.stages.coverage), with the real all-MiniLM-L6-v2 tokenizer."""

import numpy as np
import pytest

from rankserve.builder.repository import write_serving_tokenizer
from rankserve.settings import TokenizeSettings
from rankserve.stages.coverage import MOSTLY_UNKNOWN, TokenCounts, count_tokens, unknown_token_id
from rankserve.stages.tokenize import encode_pairs, encode_request, load_tokenizer

SETTINGS = TokenizeSettings(max_length=32, max_candidates=5, max_text_bytes=64)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from rankserve.train.finetune import pretrained_encoder_dir

    hf = AutoTokenizer.from_pretrained(pretrained_encoder_dir())
    return load_tokenizer(write_serving_tokenizer(hf, tmp_path_factory.mktemp("tok") / "tokenizer.json"), SETTINGS)


def _counts(tokenizer, query, texts, buckets=()):
    return encode_request(tokenizer, query, texts, buckets, unknown_token_id(tokenizer), count=True)


def test_the_unknown_token_is_the_vocabularys_unk(tokenizer):
    assert unknown_token_id(tokenizer) == tokenizer.token_to_id("[UNK]") == 100


def test_a_chinese_query_is_mostly_unknown_an_english_one_is_not(tokenizer):
    _, chinese = _counts(tokenizer, "天蓝色抱枕", ["Oak Dining Table", "Sky Blue Pillow 😀"])
    # 天 is in the vocabulary, 蓝色抱枕 are not; the emoji is [UNK]; special tokens and padding are not counted
    assert (chinese.query_unknown, chinese.query_tokens) == (4, 5)
    assert chinese.query_share == 0.8 and chinese.query_mostly_unknown
    assert chinese.texts_unknown == 1 and chinese.texts_tokens == len(tokenizer.encode("Oak Dining Table", add_special_tokens=False).ids) + len(
        tokenizer.encode("Sky Blue Pillow 😀", add_special_tokens=False).ids)
    _, english = _counts(tokenizer, "sky-blue pillow", ["Oak Dining Table", "Sky Blue Pillow"])
    assert english.query_unknown == english.texts_unknown == 0 and english.query_tokens == 4 and not english.query_mostly_unknown
    assert english.as_array().tolist() == [0, 4, 0, english.texts_tokens] and english.as_array().dtype == np.int64


def test_counts_follow_truncation_padding_buckets_and_empty_texts(tokenizer):
    long = "pillow " * 100  # truncated to max_length 32 with the query
    encoded, counts = _counts(tokenizer, "枕 pillow", [long, "", "枕"], buckets=(64,))
    assert encoded["input_ids"].shape == (3, 64)  # padded to the bucket after counting
    assert counts.query_tokens == 2 and counts.query_unknown == 1
    assert counts.texts_tokens == (32 - 3 - 2) + 0 + 1 and counts.texts_unknown == 1
    np.testing.assert_array_equal(encoded["input_ids"], encode_pairs(tokenizer, "枕 pillow", [long, "", "枕"], (64,))["input_ids"])


def test_count_tokens_on_plain_arrays():
    # [CLS] q q [SEP] t t [SEP] pad ; [CLS] q q [SEP] t [SEP] pad pad
    ids = np.array([[101, 100, 5, 102, 100, 7, 102, 0], [101, 100, 5, 102, 100, 102, 0, 0]])
    mask = np.array([[1, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 0, 0]])
    special = np.array([[1, 0, 0, 1, 0, 0, 1, 1], [1, 0, 0, 1, 0, 1, 1, 1]])
    assert count_tokens(ids, mask, special, [4, 4], 100) == TokenCounts(1, 2, 2, 3)
    assert count_tokens(ids, mask, special, [4, 4], None) == TokenCounts(0, 2, 0, 3)  # a tokenizer without an unknown token


def test_shares_of_nothing_are_zero_and_the_threshold_is_more_than_half():
    assert TokenCounts(0, 0, 0, 0).query_share == 0.0 == TokenCounts(0, 0, 0, 0).texts_share
    assert not TokenCounts(2, 4, 0, 1).query_mostly_unknown and MOSTLY_UNKNOWN == 0.5
    assert TokenCounts(3, 5, 0, 1).query_mostly_unknown


def test_the_vocabulary_table_of_the_demo_tokenizer():
    from rankserve.bench.vocabulary import default_tokenizer, measure, table

    rows = {r["language"]: r for r in measure(default_tokenizer())}
    assert rows["English"]["unknown"] == 0 and rows["Russian"]["unknown"] == 0
    assert rows["Chinese"]["unknown_share"] > 0.5 and rows["emoji"]["unknown_share"] == 1.0
    assert rows["Russian"]["chars_per_token"] < 2 < rows["English"]["chars_per_token"]  # Cyrillic cut into single letters
    assert table(list(rows.values())).count("\n") == len(rows) + 1


@pytest.mark.parametrize("make", ["decoder_tokenizer", "roberta_tokenizer"])
def test_other_pair_templates_count_the_query_and_texts_apart(make, tmp_path):
    """Qwen-like (no [CLS]/[SEP], `q t <eos>`) and RoBERTa-like (`<s> q </s></s> t </s>`, no token types) tokenizers."""
    import tiny_rankers

    hf = getattr(tiny_rankers, make)(tmp_path)
    tok = load_tokenizer(write_serving_tokenizer(hf, tmp_path / "tokenizer.json"), SETTINGS)
    unknown = unknown_token_id(tok)
    assert unknown == tok.token_to_id("<unk>")
    _, counts = encode_request(tok, "sofa 枕", ["sofa", "枕 table"], (), unknown, count=True)
    texts_tokens = sum(len(tok.encode(t, add_special_tokens=False).ids) for t in ("sofa", "枕 table"))
    assert counts == TokenCounts(1, 2, 1, texts_tokens)


def test_the_sdk_reads_token_counts_as_the_server_writes_them():
    """The Python SDK is installed on its own, so it has its own TokenCounts: the same fields in the
    order of the ``token_counts`` output, and the same "mostly unknown" threshold as the server's."""
    import dataclasses

    from rankserve_client import _common as sdk

    assert sdk.MOSTLY_UNKNOWN == MOSTLY_UNKNOWN
    assert [f.name for f in dataclasses.fields(sdk.TokenCounts)] == [f.name for f in dataclasses.fields(TokenCounts)]
    counts = TokenCounts(3, 5, 1, 10)
    assert sdk.TokenCounts(*counts.as_array().tolist()).query_mostly_unknown == counts.query_mostly_unknown
