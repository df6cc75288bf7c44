"""Pure functions of the ``tokenize`` stage: request validation and pair encoding."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from rankserve.errors import InvalidInput
from rankserve.settings import TokenizeSettings
from rankserve.stages.coverage import TokenCounts, count_encodings


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


class RefusedTensor(np.ndarray):
    """What :func:`bounded_deserializer` gives the stub instead of an over-size BYTES tensor: an
    empty array whose ``reason`` says which limit it broke (the stage raises it as InvalidInput)."""

    reason = ""

    def reshape(self, *shape, **kwargs):  # the stub reshapes the result to the tensor's dims
        return self


def _refused(reason: str) -> RefusedTensor:
    refused = np.empty(0, dtype=object).view(RefusedTensor)
    refused.reason = reason
    return refused


def bounded_deserializer(max_items: int, max_bytes: int) -> Callable[[np.ndarray], np.ndarray]:
    """A replacement of ``triton_python_backend_utils.deserialize_bytes_tensor``, which the Python
    backend of Triton 2.51 calls on every BYTES input while it loads a request into the stub, before
    ``execute`` sees it (one Python ``bytes`` per element: 300,000 two-byte texts took 0.8 s of CPU
    and 17 MiB). This one reads at most ``max_items`` elements of a buffer of at most ``max_bytes``;
    past either limit, or on a malformed buffer, it stops and returns a :class:`RefusedTensor`. It
    never raises: the stub loads requests outside its error handling, so an exception there would
    take the stub down."""

    def deserialize(encoded) -> np.ndarray:
        try:
            buffer = memoryview(np.ascontiguousarray(encoded, dtype=np.uint8)).cast("B")
            size = len(buffer)
            if size > max_bytes:
                return _refused(f"is {size} bytes serialized, more than the limit of {max_bytes} "
                                f"(max_candidates x (4 + max_text_bytes))")
            items, offset = [], 0
            while offset < size:
                if len(items) == max_items:
                    return _refused(f"holds more than {max_items} values, the limit of {max_items} candidates")
                (length,) = struct.unpack_from("<I", buffer, offset)
                offset += 4
                if offset + length > size:
                    return _refused("is not a valid BYTES tensor (an element runs past the buffer)")
                items.append(bytes(buffer[offset:offset + length]))
                offset += length
            out = np.empty(len(items), dtype=object)
            out[:] = items
            return out
        except Exception as exc:  # noqa: BLE001 - never raise into the stub (see above)
            return _refused(f"is not a valid BYTES tensor ({type(exc).__name__})")

    return deserialize


def _count(values: np.ndarray | None, what: str) -> int:
    """Elements of an input, checked before anything is decoded."""
    if values is None:
        raise InvalidInput(f"input '{what}' is required")
    if isinstance(values, RefusedTensor):
        raise InvalidInput(f"'{what}' {values.reason}")
    return int(np.asarray(values).size)


def parse_request(
    query: np.ndarray | None, texts: np.ndarray | None, settings: TokenizeSettings
) -> tuple[str, list[str]]:
    """Validate the ``query`` and ``texts`` inputs of one request: counts first, then each text."""
    if _count(query, "query") != 1:
        raise InvalidInput(f"'query' must hold exactly one string, got {_count(query, 'query')}")
    n = _count(texts, "texts")
    if n == 0:
        raise InvalidInput("'texts' is empty: send at least one candidate")
    if n > settings.max_candidates:
        raise InvalidInput(f"'texts' holds {n} candidates, more than the limit of {settings.max_candidates}")
    (text,) = decode_texts(query, "query", settings.max_text_bytes)
    if not text.strip():
        raise InvalidInput("'query' is empty")
    return text, decode_texts(texts, "texts", settings.max_text_bytes, truncate=True)


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
    return encode_request(tokenizer, query, texts, buckets)[0]


def encode_request(tokenizer, query: str, texts: Sequence[str], buckets: Sequence[int] = (),
                   unknown_id: int | None = None, count: bool = False) -> tuple[dict[str, np.ndarray], TokenCounts | None]:
    """:func:`encode_pairs`, and with ``count`` the request's :class:`TokenCounts` (unknown tokens:
    ``unknown_id``, see :func:`rankserve.stages.coverage.unknown_token_id`)."""
    encodings = tokenizer.encode_batch([(query, text) for text in texts])
    encoded = {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
    }
    counts = count_encodings(encodings, encoded["input_ids"], encoded["attention_mask"], unknown_id) if count else None
    width = encoded["input_ids"].shape[1]
    target = next((b for b in buckets if b >= width), width)
    if target > width:
        pad = tokenizer.padding
        fill = {"input_ids": pad["pad_id"], "attention_mask": 0, "token_type_ids": pad["pad_type_id"]}
        encoded = {k: np.pad(v, ((0, 0), (0, target - width)), constant_values=fill[k]) for k, v in encoded.items()}
    return encoded, counts
