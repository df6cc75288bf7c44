"""The pure checks behind issue 17's server-side limits (the e2e proof is tests/e2e/test_security.py)."""

import struct

import numpy as np
import pytest

from rankserve.builder import configs
from rankserve.errors import InvalidInput, ServeError
from rankserve.server.embedded import (ADMIN_HEADER, RESTRICTED_APIS, read_admin_key, repository_stub_region_bytes,
                                       restricted_api_args, restricted_server_argv, sized_server_argv)
from rankserve.settings import BatchingSettings, BuildSettings, RuntimeSettings, ServeSettings, TokenizeSettings, stub_region_bytes
from rankserve.stages.postprocess import postprocess
from rankserve.stages.rank import check_encoded
from rankserve.stages.tokenize import RefusedTensor, bounded_deserializer, parse_request

NAMES = ("input_ids", "attention_mask", "token_type_ids")


def _serialized(values: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(struct.pack("<I", len(v)) + v for v in values), dtype=np.uint8)


def test_the_bounded_deserializer_reads_what_triton_sends():
    out = bounded_deserializer(3, 100)(_serialized([b"a", b"", "é".encode()]))
    assert out.dtype == object and out.tolist() == [b"a", b"", "é".encode()]
    assert bounded_deserializer(3, 100)(_serialized([])).shape == (0,)


@pytest.mark.parametrize("values, limits, words", [
    ([b"ab"] * 300_000, (1000, 10**7), "more than 1000 values"),  # stops after 1,000 elements
    ([b"x" * 60] * 2, (1000, 100), "more than the limit of 100"),  # refused on the size alone
])
def test_the_bounded_deserializer_refuses_without_decoding(values, limits, words):
    out = bounded_deserializer(*limits)(_serialized(values))
    assert isinstance(out, RefusedTensor) and words in out.reason
    assert out.reshape([len(values)]) is out  # the stub reshapes to the tensor's dims: no error
    with pytest.raises(InvalidInput, match=words):
        parse_request(np.array([b"q"], dtype=object), out, TokenizeSettings())


def test_the_bounded_deserializer_never_raises_on_a_malformed_buffer():
    truncated = _serialized([b"abcdef"])[:-2]
    assert isinstance(bounded_deserializer(10, 100)(truncated), RefusedTensor)
    assert isinstance(bounded_deserializer(10, 100)(np.array([1, 2], dtype=np.uint8)), RefusedTensor)


def test_parse_request_counts_before_it_decodes():
    settings = TokenizeSettings(max_candidates=2)
    bad = np.array([b"\xff", b"\xff", b"\xff"], dtype=object)  # not UTF-8, and too many: the count wins
    with pytest.raises(InvalidInput, match="holds 3 candidates, more than the limit of 2"):
        parse_request(np.array([b"q"], dtype=object), bad, settings)


def test_max_request_bytes_follows_the_settings():
    s = TokenizeSettings(max_candidates=10, max_text_bytes=100, max_length=16)
    assert s.max_request_bytes == 10 * 104 and s.max_encoded_bytes == 3 * 10 * 16 * 8


def _enc(mask, width=None):
    mask = np.array(mask, dtype=np.int64)
    return {"input_ids": np.ones_like(mask), "attention_mask": mask, "token_type_ids": np.zeros_like(mask)}


def test_check_encoded_refuses_masks_that_are_not_right_padded():
    assert check_encoded(_enc([[1, 1, 0], [1, 1, 1]]), NAMES, 8)
    for mask in ([[0, 1, 1], [1, 1, 1]], [[1, 0, 1], [1, 1, 1]]):
        with pytest.raises(InvalidInput, match="row 0 is not right-padded"):
            check_encoded(_enc(mask), NAMES, 8)


def test_check_encoded_refuses_a_width_over_max_length():
    check_encoded(_enc(np.ones((1, 64))), NAMES, 64)
    with pytest.raises(InvalidInput, match="65 tokens wide, more than the limit of 64"):
        check_encoded(_enc(np.ones((1, 65))), NAMES, 64)


@pytest.mark.parametrize("logits, words", [
    (np.zeros((0, 1), np.float32), "empty"),
    (np.zeros((5, 1), np.float32), "limit of 4"),
    (np.zeros((2, 2), np.float32), "one score per candidate"),
])
def test_postprocess_keeps_the_public_limits(logits, words):
    with pytest.raises(InvalidInput, match=words):
        postprocess(logits, None, max_candidates=4)


def test_the_generated_stages_carry_their_limits():
    models = configs.cpu_repository(BuildSettings(), {"fp32": RuntimeSettings()}, "fp32")
    tokenize, rank, post = models["tokenize"], models["rank"], models["postprocess"]
    assert tokenize.dynamic_batching.default_queue_policy.max_queue_size == TokenizeSettings().queue_size > 0
    assert tokenize.max_batch_size == 0 and not post.HasField("dynamic_batching")
    assert rank.parameters["max_length"].string_value == str(TokenizeSettings().max_length)
    assert post.parameters["max_candidates"].string_value == str(TokenizeSettings().max_candidates)


def test_stub_regions_hold_the_largest_request_accepted(tmp_path):
    default = stub_region_bytes(TokenizeSettings(), BatchingSettings())
    assert TokenizeSettings().max_request_bytes + TokenizeSettings().max_encoded_bytes < default <= ServeSettings().shm_default_bytes
    # compose and Kubernetes mount 1 GiB of /dev/shm: every Python stub of a repository of all CPU variants fits
    stubs = TokenizeSettings().instances + 1 + len(BuildSettings().variants + ("fused", "int8", "int8_dynamic", "bf16", "pruned", "pruned_int8"))
    assert stubs * ServeSettings().shm_default_bytes <= 2**30
    deadline = stub_region_bytes(TokenizeSettings(), BatchingSettings(scheduling="deadline"))
    assert deadline > ServeSettings().shm_default_bytes  # held requests: the embedded server sizes it from the repository
    for name, config in configs.cpu_repository(BuildSettings(batching=BatchingSettings(scheduling="deadline")),
                                               {"fp32": RuntimeSettings()}, "fp32").items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.pbtxt").write_text(configs.to_text(config))
    assert repository_stub_region_bytes(tmp_path) == deadline
    assert repository_stub_region_bytes(tmp_path / "nothing") == 0


@pytest.mark.parametrize("scheduling", ["arrival", "deadline"])
def test_the_container_entrypoint_sizes_the_stub_regions_from_the_repository(tmp_path, scheduling):
    """`rankserve exec-server` (compose, Kubernetes) raises a smaller shm-default-byte-size to what
    the repository needs, so a deadline repository needs no hand-edited flag; never lowers it."""
    for name, config in configs.cpu_repository(BuildSettings(batching=BatchingSettings(scheduling=scheduling)),
                                               {"fp32": RuntimeSettings()}, "fp32").items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.pbtxt").write_text(configs.to_text(config))
    needed = repository_stub_region_bytes(tmp_path)
    flag = "--backend-config=python,shm-default-byte-size="
    compose = ["tritonserver", f"--model-repository={tmp_path}", f"{flag}{16 * 2**20}", "--log-verbose=0"]
    sized = sized_server_argv(compose)
    assert [a for a in sized if a.startswith(flag)] == [f"{flag}{max(needed, 16 * 2**20)}"]
    assert [a for a in sized if not a.startswith(flag)] == [a for a in compose if not a.startswith(flag)]
    assert sized_server_argv(["tritonserver", "--model-repository", str(tmp_path)])[-1] == f"{flag}{needed}"
    big = ["tritonserver", f"--model-repository={tmp_path}", f"{flag}{2**30}"]
    assert sized_server_argv(big) == big
    assert sized_server_argv(["tritonserver", f"--model-repository={tmp_path / 'nothing'}"]) == \
        ["tritonserver", f"--model-repository={tmp_path / 'nothing'}"]


def test_restricted_api_flags_and_the_key_file(tmp_path):
    key = "k" * 32
    http, grpc = restricted_api_args(key)
    assert http == f"--http-restricted-api={','.join(RESTRICTED_APIS)}:{ADMIN_HEADER}={key}"
    assert grpc.startswith("--grpc-restricted-protocol=") and grpc.endswith(f":{ADMIN_HEADER}={key}")
    assert {"shared-memory", "model-repository", "statistics", "trace", "logging"} <= set(RESTRICTED_APIS)
    with pytest.raises(ServeError, match="16 to 256"):
        restricted_api_args("short")
    path = tmp_path / "key"
    path.write_text(key + "\n")
    assert read_admin_key(path) == key
    assert restricted_server_argv(["tritonserver", "--model-repository=/m"], path) == ["tritonserver", "--model-repository=/m", http, grpc]
    path.write_text("")
    with pytest.raises(ServeError, match="admin key"):
        read_admin_key(path)
    with pytest.raises(ServeError, match="cannot read"):
        read_admin_key(tmp_path / "missing")
    with pytest.raises(ServeError, match="already restricts"):
        restricted_server_argv(["tritonserver", http], tmp_path / "key")
