"""Pure functions of the ``tokenize`` stage: request validation and pair encoding."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from rankserve.errors import InvalidInput
from rankserve.settings import TokenizeSettings


def decode_texts(values: np.ndarray | None, what: str, max_bytes: int, truncate: bool = False) -> list[str]:
    """Decode a BYTES tensor into strings; raise :class:`InvalidInput` on anything malformed.

    A value longer than ``max_bytes`` is rejected, or with ``truncate`` cut to ``max_bytes`` on a
    character boundary (the model reads at most ``max_length`` tokens of it anyway)."""
    if values is None:
        raise InvalidInput(f"input '{what}' is required")
    out: list[str] = []
    for i, raw in enumerate(np.asarray(values, dtype=object).reshape(-1)):
        if isinstance(raw, str):
            raw = raw.encode("utf-8")
        if not isinstance(raw, (bytes, bytearray)):
            raise InvalidInput(f"'{what}'[{i}] must be BYTES (UTF-8 text), got {type(raw).__name__}")
        cut = False
        if len(raw) > max_bytes:
            if not truncate:
                raise InvalidInput(f"'{what}'[{i}] is {len(raw)} bytes, more than the limit of {max_bytes}")
            raw, cut = bytes(raw[:max_bytes]), True
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            if not (cut and exc.reason == "unexpected end of data"):
                raise InvalidInput(f"'{what}'[{i}] is not valid UTF-8 (byte {exc.start})") from None
            text = bytes(raw[: exc.start]).decode("utf-8")  # the cut split a character: drop its first bytes
        if "\x00" in text:
            raise InvalidInput(f"'{what}'[{i}] contains a NUL character")
        out.append(text)
    return out


def parse_request(
    query: np.ndarray | None, texts: np.ndarray | None, settings: TokenizeSettings
) -> tuple[str, list[str]]:
    """Validate the ``query`` and ``texts`` inputs of one request."""
    queries = decode_texts(query, "query", settings.max_text_bytes)
    if len(queries) != 1:
        raise InvalidInput(f"'query' must hold exactly one string, got {len(queries)}")
    if not queries[0].strip():
        raise InvalidInput("'query' is empty")
    candidates = decode_texts(texts, "texts", settings.max_text_bytes, truncate=True)
    if not candidates:
        raise InvalidInput("'texts' is empty: send at least one candidate")
    if len(candidates) > settings.max_candidates:
        raise InvalidInput(
            f"'texts' holds {len(candidates)} candidates, more than the limit of {settings.max_candidates}"
        )
    return queries[0], candidates


def load_tokenizer(path: str | Path, settings: TokenizeSettings):
    """Load a fast tokenizer (``tokenizer.json``) set to truncate pairs at ``max_length``.

    Padding goes to the longest pair of each call; the pad token comes from the file (the build
    writes it there).
    """
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.enable_truncation(max_length=settings.max_length, strategy="longest_first")
    if tokenizer.padding is None:
        raise ValueError(f"{path} has no padding configuration; rebuild the model repository")
    padding = dict(tokenizer.padding)
    tokenizer.enable_padding(
        pad_id=padding["pad_id"], pad_token=padding["pad_token"], pad_type_id=padding["pad_type_id"]
    )  # no fixed length: pad to the longest pair in the batch
    return tokenizer


def encode_pairs(tokenizer, query: str, texts: Sequence[str], buckets: Sequence[int] = ()) -> dict[str, np.ndarray]:
    """Encode (query, text) pairs into int64 ``input_ids``, ``attention_mask``, ``token_type_ids``,
    padded to the longest pair, or up to the smallest of ``buckets`` that holds it."""
    encodings = tokenizer.encode_batch([(query, text) for text in texts])
    encoded = {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
    }
    width = encoded["input_ids"].shape[1]
    target = next((b for b in buckets if b >= width), width)
    if target > width:
        pad = tokenizer.padding
        fill = {"input_ids": pad["pad_id"], "attention_mask": 0, "token_type_ids": pad["pad_type_id"]}
        encoded = {k: np.pad(v, ((0, 0), (0, target - width)), constant_values=fill[k]) for k, v in encoded.items()}
    return encoded
