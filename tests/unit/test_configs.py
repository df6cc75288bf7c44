from rankserve import api
from rankserve.builder import configs
from rankserve.settings import PRESETS, BuildSettings, RuntimeSettings

VARIANTS = {"fp32": RuntimeSettings(), "int8": RuntimeSettings("openvino"), "bf16": RuntimeSettings("openvino", "bf16")}


def _repo(settings=BuildSettings()):
    return configs.cpu_repository(settings, VARIANTS, "int8")


def test_generated_configs_parse_back_with_tritons_schema():
    for name, config in _repo().items():
        text = configs.to_text(config)
        parsed = configs.parse(text)
        assert parsed == config and parsed.name == name


def test_ensemble_exposes_the_public_api():
    ranker = _repo()[api.RANKER_MODEL]
    assert [(i.name, i.dims, i.optional) for i in ranker.input] == [
        ("query", [1], False), ("texts", [-1], False), ("top_k", [1], True)]
    assert [(o.name, o.dims) for o in ranker.output] == [("indices", [-1]), ("scores", [-1]), ("token_counts", [4])]
    # the token counts come straight from the tokenize step, which declares them
    assert dict(ranker.ensemble_scheduling.step[0].output_map)["token_counts"] == "token_counts"
    assert "token_counts" in [o.name for o in _repo()[api.TOKENIZE_MODEL].output]


def test_one_rank_model_and_one_ensemble_per_variant_and_the_default_is_ranker():
    models = _repo()
    assert set(models) == {"tokenize", "postprocess", "rank", "rank_fp32", "rank_bf16", "ranker",
                           "ranker_fp32", "ranker_int8", "ranker_bf16"}
    step_models = lambda m: [s.model_name for s in models[m].ensemble_scheduling.step]
    assert step_models("ranker") == ["tokenize", "rank", "postprocess"] == step_models("ranker_int8")
    assert step_models("ranker_bf16") == ["tokenize", "rank_bf16", "postprocess"]
    assert models["rank"].parameters["variant"].string_value == "int8"


def test_ensemble_wiring_is_closed():
    """Every step input is an ensemble input or an earlier step's output, with matching types;
    every ensemble output is produced."""
    models = _repo()
    for name in ("ranker", "ranker_fp32", "ranker_bf16"):
        _check_wiring(models, models[name])


def _check_wiring(models, ranker):
    available = {i.name: i.data_type for i in ranker.input}
    for step in ranker.ensemble_scheduling.step:
        model = models[step.model_name]
        declared_in = {i.name: i for i in model.input}
        for model_input, tensor in step.input_map.items():
            assert tensor in available, f"{step.model_name}.{model_input} <- {tensor} is never produced"
            assert declared_in[model_input].data_type == available[tensor]
        missing = {n for n, i in declared_in.items() if not i.optional} - set(step.input_map)
        assert not missing, f"{step.model_name} lacks {missing}"
        for model_output, tensor in step.output_map.items():
            available[tensor] = next(o.data_type for o in model.output if o.name == model_output)
    assert {o.name for o in ranker.output} <= set(available)


def test_settings_flow_into_parameters():
    models = _repo(PRESETS["tiny"])
    assert models["tokenize"].parameters["max_length"].string_value == "64"
    assert models["rank"].parameters["graph_optimization"].string_value == "all"
    assert models["rank"].instance_group[0].count == PRESETS["tiny"].rank_instances
    assert models["rank_bf16"].parameters["runtime"].string_value == "openvino"
    assert models["rank_bf16"].parameters["inference_precision"].string_value == "bf16"


def test_rank_inputs_allow_ragged_batches_so_requests_of_any_length_batch_together():
    models = _repo(PRESETS["tiny"])
    rank = models["rank"]
    assert rank.max_batch_size == PRESETS["tiny"].tokenize.max_candidates
    assert rank.dynamic_batching.max_queue_delay_microseconds == PRESETS["tiny"].batching.max_queue_delay_us
    assert [i.allow_ragged_batch for i in rank.input] == [True] * len(rank.input)
    assert rank.dynamic_batching.default_queue_policy.max_queue_size == PRESETS["tiny"].batching.max_queue_size == 16
    assert rank.dynamic_batching.default_queue_policy.default_timeout_microseconds == 0  # see configs._batching
    assert not any(i.allow_ragged_batch for i in models["tokenize"].input)
