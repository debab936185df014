"""Which scheme each linear gets: ignore/targets, first matching override, the catch-all."""

from __future__ import annotations

import pytest

from llmc.errors import EXIT_USAGE, ConfigError
from llmc.schemes import Override, QuantizationRules, Scheme, describe, methods_used, resolve_schemes

NAMES = [f"model.layers.{i}.{m}" for i in range(12) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")]


def test_defaults_quantize_every_decoder_linear():
    schemes = resolve_schemes(NAMES, QuantizationRules())
    assert set(schemes.values()) == {Scheme("rtn", 4, 128, True)}


def test_ignore_and_targets_keep_float():
    rules = QuantizationRules(targets=("model.layers.1?.*", "*.down_proj"), ignore=("*.v_proj",))
    schemes = resolve_schemes(NAMES, rules)
    quantized = sorted(n for n, s in schemes.items() if s)
    assert "model.layers.10.self_attn.q_proj" in quantized and "model.layers.3.mlp.down_proj" in quantized
    assert "model.layers.3.self_attn.q_proj" not in quantized  # not targeted
    assert not any(n.endswith("v_proj") for n in quantized)  # ignored even where targeted
    assert len(quantized) == 12 + 2


def test_first_matching_override_wins_over_the_catch_all():
    rules = QuantizationRules(
        method="gptq", bits=4, group_size=64,
        overrides=(
            Override("model.layers.[0-1].mlp.down_proj", bits=8, group_size=-1),
            Override("*.down_proj", bits=3),
            Override("model.layers.11.*", method="none"),
        ),
    )
    schemes = resolve_schemes(NAMES, rules)
    assert schemes["model.layers.1.mlp.down_proj"] == Scheme("gptq", 8, -1, True)
    assert schemes["model.layers.2.mlp.down_proj"] == Scheme("gptq", 3, 64, True)
    assert schemes["model.layers.11.mlp.down_proj"] == Scheme("gptq", 3, 64, True)  # an earlier match won
    assert schemes["model.layers.11.self_attn.q_proj"] is None  # method none keeps float
    assert schemes["model.layers.5.self_attn.q_proj"] == Scheme("gptq", 4, 64, True)
    assert methods_used(rules) == {"gptq"}
    assert describe(s for s in schemes.values() if s) == "int4 g64 sym x22, int3 g64 sym x10, int8 per-channel sym x2"


def test_a_method_named_only_in_an_override_is_used():
    rules = QuantizationRules(method="none", overrides=(Override("*.down_proj", method="gptq"),))
    schemes = resolve_schemes(NAMES, rules)
    assert methods_used(rules) == {"gptq"}
    assert sum(s is not None for s in schemes.values()) == 12


@pytest.mark.parametrize("rules,field", [
    (QuantizationRules(targets=("model.layer.*",)), "quantization.targets[0]"),
    (QuantizationRules(overrides=(Override("*.down_proj", bits=8), Override("*.gate_proj", bits=8))),
     "quantization.overrides[1].match"),
])
def test_a_pattern_that_selects_nothing_is_a_config_error(rules, field):
    with pytest.raises(ConfigError) as info:
        resolve_schemes(NAMES, rules)
    assert info.value.exit_code == EXIT_USAGE
    assert f"{field}: " in str(info.value) and "matches no linear" in str(info.value)
