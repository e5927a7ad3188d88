"""Where a generation's sampling comes from when the request leaves it out: the model's own
generation config when it sets sampling, else llmos's conservative defaults."""

from types import SimpleNamespace

from transformers import GenerationConfig

from llmos.drivers.generation import DEFAULT_TEMPERATURE, DEFAULT_TOP_P, SamplingDefaults


def model_with(**config) -> SimpleNamespace:
    return SimpleNamespace(generation_config=GenerationConfig(**config))


def test_a_config_that_sets_sampling_is_followed():
    defaults = SamplingDefaults.of(model_with(do_sample=True, temperature=0.2, top_p=0.8))
    assert (defaults.temperature, defaults.top_p, defaults.source) == (0.2, 0.8, "model")


def test_a_config_that_sets_only_the_temperature_keeps_the_full_nucleus():
    defaults = SamplingDefaults.of(model_with(do_sample=True, temperature=0.3))
    assert (defaults.temperature, defaults.top_p) == (0.3, 1.0)


def test_a_config_that_asks_for_greedy_decoding_gets_it():
    assert SamplingDefaults.of(model_with(do_sample=False)).temperature == 0.0


def test_a_config_without_sampling_gets_the_conservative_defaults():
    defaults = SamplingDefaults.of(model_with(bos_token_id=1, eos_token_id=2))
    assert (defaults.temperature, defaults.top_p, defaults.source) == (
        DEFAULT_TEMPERATURE, DEFAULT_TOP_P, "llmos")
    assert SamplingDefaults.of(SimpleNamespace()).source == "llmos"  # no config at all
