import dataclasses

import pytest

from rankserve.errors import ConfigError
from rankserve.settings import (
    PRESETS, BuildSettings, CheckSettings, OrtSettings, QuantSettings, ServeSettings, TokenizeSettings, TrainSettings,
    from_parameters,
    preset, to_parameters,
)


def test_presets_are_valid_and_named():
    assert set(PRESETS) >= {"default", "tiny"}
    assert preset("tiny") is PRESETS["tiny"]
    with pytest.raises(ConfigError, match="unknown build preset 'nope'"):
        preset("nope")


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: TokenizeSettings(max_length=4), "max_length"),
        (lambda: TokenizeSettings(max_candidates=0), "max_candidates"),
        (lambda: OrtSettings(graph_optimization="turbo"), "graph_optimization"),
        (lambda: CheckSettings(shapes=()), "at least one"),
        (lambda: CheckSettings(atol=0), "atol"),
        (lambda: BuildSettings(target="tpu"), "target"),
        (lambda: BuildSettings(tokenize=TokenizeSettings(max_length=32)), "check length"),
        (lambda: ServeSettings(http_port=9000, grpc_port=9000), "must differ"),
        (lambda: QuantSettings(dynamic_weights="u4"), "dynamic_weights must be one of"),
        (lambda: QuantSettings(smooth_alpha=1.0), "smooth_alpha must be in"),
        (lambda: TrainSettings(frozen_layers=-1), "frozen_layers"),
        (lambda: TrainSettings(length_chunk=-1), "length_chunk"),
    ],
)
def test_invalid_settings_are_refused_with_a_clear_message(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_settings_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TokenizeSettings().max_length = 3  # type: ignore[misc]


def test_triton_parameters_round_trip():
    settings = TokenizeSettings(max_length=96, max_candidates=50, max_text_bytes=2048)
    params = {k: {"string_value": v} for k, v in to_parameters(settings).items()}
    assert from_parameters(TokenizeSettings, params) == settings
    assert from_parameters(OrtSettings, {"intra_op_threads": {"string_value": "2"}}) == OrtSettings(intra_op_threads=2)
    # booleans round-trip (bool("False") would be True)
    shared = OrtSettings(prepack_weights=False)
    assert from_parameters(OrtSettings, {k: {"string_value": v} for k, v in to_parameters(shared).items()}) == shared
    with pytest.raises(ConfigError, match="prepack_weights='maybe' is not a valid bool"):
        from_parameters(OrtSettings, {"prepack_weights": {"string_value": "maybe"}})


def test_bad_triton_parameter_is_a_config_error():
    with pytest.raises(ConfigError, match="max_length='lots'"):
        from_parameters(TokenizeSettings, {"max_length": {"string_value": "lots"}})
    with pytest.raises(ConfigError, match="max_length"):
        from_parameters(TokenizeSettings, {"max_length": {"string_value": "4"}})
