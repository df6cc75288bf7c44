"""Which variant becomes the default ``ranker``: the named one, else the fastest that passes the strict gate."""

from pathlib import Path

import pytest

from rankserve.builder.variants import VariantBuild, default_order, dynamic_weight_type, is_strict
from rankserve.errors import BuildError, ConfigError
from rankserve.optimize.gate import GateResult, passed_gate
from rankserve.settings import BuildSettings, RuntimeSettings


def build(name, pairs_per_s, strict, served_on_cpu=True):
    g = GateResult(name, 0.5, 0.4, 0.5, 0.0, 0.02 if name.startswith("pruned") else 0.01, 0.9 if not strict else 1.0,
                   0.8, True, strict=strict)
    return VariantBuild(name, Path(f"{name}.onnx"), RuntimeSettings(), "fp32", g, {"onnxruntime": pairs_per_s},
                        served_on_cpu=served_on_cpu)


BUILDS = [build("fp32", 100, True), build("int8", 300, True), build("pruned_int8", 900, False),
          build("pruned", 500, False), build("int8_dynamic", 250, True), build("int8_trt", 5000, True, served_on_cpu=False)]


def test_the_fastest_strict_variant_comes_first_then_strict_then_the_rest():
    assert [b.name for b in default_order(BUILDS)] == ["int8", "int8_dynamic", "fp32", "pruned_int8", "pruned"]


def test_a_named_variant_comes_first_even_when_it_passed_only_its_own_gate():
    assert [b.name for b in default_order(BUILDS, "pruned")][:2] == ["pruned", "int8"]
    with pytest.raises(BuildError, match="--default bf16: not among the CPU variants built"):
        default_order(BUILDS, "bf16")


def test_a_plain_fp32_build_is_the_reference_and_strict():
    plain = VariantBuild("fp32", Path("fp32.onnx"), RuntimeSettings(), "fp32", None, {})
    assert is_strict(plain)


def test_the_manifest_says_which_gate_each_variant_passed():
    assert passed_gate(build("int8", 1, True).gate.to_dict()) == "strict"
    assert passed_gate(build("pruned", 1, False).gate.to_dict()) == "own only (2% NDCG)"
    older = {k: v for k, v in build("int8", 1, True).gate.to_dict().items() if k != "strict"}
    assert passed_gate(older) == "not recorded"  # a manifest written before the strict gate


def test_the_default_must_be_a_cpu_variant():
    assert BuildSettings(default_variant="pruned_int8").default_variant == "pruned_int8"
    with pytest.raises(ConfigError, match="default_variant"):
        BuildSettings(default_variant="int8_trt")


def test_every_dynamic_weight_setting_names_a_quantizer_setting():
    from rankserve.optimize.transforms import DYNAMIC_WEIGHT_TYPES
    from rankserve.settings import DYNAMIC_WEIGHTS

    assert set(DYNAMIC_WEIGHTS) == {"auto"} | set(DYNAMIC_WEIGHT_TYPES)
    assert {dynamic_weight_type("auto", units) for units in ({"fp32"}, {"fp32", "int8"})} <= set(DYNAMIC_WEIGHT_TYPES)


def test_dynamic_int8_weights_follow_the_cpu_unless_named():
    assert dynamic_weight_type("auto", {"fp32", "int8"}) == "s8"  # VNNI/AMX: no saturation
    assert dynamic_weight_type("auto", {"fp32"}) == "s7" and dynamic_weight_type("auto", {"fp32", "bf16"}) == "s7"
    assert dynamic_weight_type("s8", {"fp32"}) == "s8" and dynamic_weight_type("u8", {"fp32", "int8"}) == "u8"
