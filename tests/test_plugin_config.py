"""The plugin's switches: vLLM's additional_config["fxpass"] and the environment."""

from __future__ import annotations

import pytest

from fxpass import UsageError
from fxpass.plugin_config import PluginConfig, read


def test_defaults_turn_everything_on():
    cfg = read(None, {})
    assert cfg == PluginConfig()
    assert cfg.enabled and cfg.speed_rules and cfg.warmup and cfg.disable == frozenset()
    assert read({"other_plugin": {"x": 1}}, {}) == PluginConfig()


def test_additional_config_switches_and_where_they_came_from():
    cfg = read({"fxpass": {"speed_rules": False, "disable": ["mm-attention"],
                           "warmup": "off"}}, {})
    assert not cfg.speed_rules and not cfg.warmup and cfg.disable == {"mm-attention"}
    assert dict(cfg.sources) == {"speed_rules": "additional_config",
                                 "disable": "additional_config", "warmup": "additional_config"}
    assert "speed rules off" in cfg.describe() and "mm-attention" in cfg.describe()


def test_the_environment_wins_and_adds_rule_names():
    env = {"FXPASS_SPEED_RULES": "1", "FXPASS_DISABLE_RULES": "fusion, rope",
           "FXPASS_DISABLE": "yes"}
    cfg = read({"fxpass": {"speed_rules": False, "disable": ["mm-attention"]}}, env)
    assert cfg.speed_rules and not cfg.enabled
    assert cfg.disable == {"mm-attention", "fusion", "rope"}
    assert dict(cfg.sources)["disable"] == "additional_config + FXPASS_DISABLE_RULES"
    assert dict(cfg.sources)["enabled"] == "FXPASS_DISABLE"


@pytest.mark.parametrize("config, env, match", [
    ({"fxpass": {"speed_rule": False}}, {},
     r"additional_config\['fxpass'\]: unknown key\(s\) 'speed_rule'; the keys are: "
     r"disable, enabled, speed_rules, warmup"),
    ({"fxpass": {"disable": ["fusoin"]}}, {},
     r"additional_config\['fxpass'\]\['disable'\]: unknown rule name\(s\) 'fusoin'; "
     r"the rules are: linear, .*fusion"),
    ({"fxpass": {"disable": "fusion"}}, {}, None),  # one name as a string is fine
    ({"fxpass": {"speed_rules": "maybe"}}, {},
     r"\['speed_rules'\]: expected true or false, got 'maybe'"),
    ({"fxpass": ["fusion"]}, {}, r"additional_config\['fxpass'\]: expected an object"),
    ({"fxpass": {"disable": [1]}}, {}, r"expected a list of rule names, got \[1\]"),
    (None, {"FXPASS_DISABLE_RULES": "fusion,nope"},
     r"\$FXPASS_DISABLE_RULES: unknown rule name\(s\) 'nope'"),
    (None, {"FXPASS_SPEED_RULES": "2"}, r"\$FXPASS_SPEED_RULES: expected true or false"),
], ids=["key", "rule", "one-name", "flag", "not-a-dict", "names-type", "env-rule", "env-flag"])
def test_bad_switches_name_the_key_and_the_valid_ones(config, env, match):
    if match is None:
        assert read(config, env).disable == {"fusion"}
        return
    with pytest.raises(UsageError, match=match):
        read(config, env)
