"""fxpass.vllm_plugin without an engine: registration, patching, fallbacks, the switch."""

from __future__ import annotations

import copy
import importlib
import logging
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import fxpass
import fxpass.vllm_plugin as plugin


@pytest.fixture
def plugin_state(monkeypatch):
    """Isolate the plugin's process state (registration, original, records, meta_path)."""
    monkeypatch.setattr(plugin, "_registered", False)
    monkeypatch.setattr(plugin, "_original", None)
    monkeypatch.setattr(plugin, "_records", [])
    monkeypatch.delenv(plugin.ENV_DISABLE, raising=False)
    meta_path = list(sys.meta_path)
    yield
    sys.meta_path[:] = meta_path


@pytest.fixture
def plugin_log():
    """The plugin logs under vllm.fxpass; vLLM's config stops propagation at 'vllm'."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    logger = logging.getLogger("vllm.fxpass")
    handler = Keep(level=logging.DEBUG)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def test_entry_point_is_declared():
    from importlib.metadata import entry_points

    eps = {ep.name: ep for ep in entry_points(group="vllm.general_plugins")}
    assert eps["fxpass"].value == "fxpass.vllm_plugin:register"
    assert eps["fxpass"].load() is plugin.register


def test_import_is_cheap():
    code = ("import sys, fxpass.vllm_plugin as p; p.register(); "
            "print(sorted(m for m in ('vllm', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    # register() without vLLM imported leaves an import hook and imports nothing heavy
    assert out.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("disable", ["1", "true", "YES", "on"])
def test_disabled_values(monkeypatch, disable):
    monkeypatch.setenv(plugin.ENV_DISABLE, disable)
    assert plugin.disabled()


@pytest.mark.parametrize("value", ["", "0", "no", "off"])
def test_enabled_values(monkeypatch, value):
    monkeypatch.setenv(plugin.ENV_DISABLE, value)
    assert not plugin.disabled()


def _fake_vllm(tmp_path, monkeypatch, name: str):
    """A package standing in for vLLM's utils module and a model module importing from it."""
    pkg = tmp_path / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "utils.py").write_text(textwrap.dedent("""
        CALLS = []
        def recursive_replace_linear(model, quant_config, prefix=""):
            CALLS.append((model, quant_config, prefix))
    """))
    (pkg / "model.py").write_text(
        f"from {name}.utils import recursive_replace_linear\n"
        "def build(tower, q, prefix):\n"
        "    recursive_replace_linear(tower, q, prefix=prefix)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(plugin, "TARGET_MODULE", f"{name}.utils")
    for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[mod]
    return pkg


def test_register_before_import_patches_through_import_hook(
        tmp_path, monkeypatch, plugin_state):
    _fake_vllm(tmp_path, monkeypatch, "fakevllm_a")
    plugin.register()
    assert "fakevllm_a.utils" not in sys.modules
    model_mod = importlib.import_module("fakevllm_a.model")
    utils = sys.modules["fakevllm_a.utils"]
    assert utils.recursive_replace_linear is plugin.replace_linear
    assert model_mod.recursive_replace_linear is plugin.replace_linear
    assert plugin._original.__module__ == "fakevllm_a.utils"
    assert plugin.vllm_walk() is plugin._original  # the seed's walk, for comparisons
    assert not any(isinstance(f, plugin._PatchOnImport) for f in sys.meta_path)
    plugin.register()  # idempotent
    assert utils.recursive_replace_linear is plugin.replace_linear


def test_register_after_import_rebinds_importers(tmp_path, monkeypatch, plugin_state):
    _fake_vllm(tmp_path, monkeypatch, "fakevllm_b")
    model_mod = importlib.import_module("fakevllm_b.model")
    original = sys.modules["fakevllm_b.utils"].recursive_replace_linear
    plugin.register()
    assert model_mod.recursive_replace_linear is plugin.replace_linear
    assert plugin._original is original


def test_register_disabled_patches_nothing(tmp_path, monkeypatch, plugin_state):
    _fake_vllm(tmp_path, monkeypatch, "fakevllm_c")
    monkeypatch.setenv(plugin.ENV_DISABLE, "1")
    plugin.register()
    model_mod = importlib.import_module("fakevllm_c.model")
    assert model_mod.recursive_replace_linear is not plugin.replace_linear


def test_failed_rewrite_falls_back_to_vllm_walk(tmp_path, monkeypatch, plugin_state, plugin_log):
    _fake_vllm(tmp_path, monkeypatch, "fakevllm_d")
    plugin.register()
    model_mod = importlib.import_module("fakevllm_d.model")
    utils = sys.modules["fakevllm_d.utils"]
    tower = nn.Sequential(nn.Linear(4, 4))  # a quant config fxpass cannot build layers with
    model_mod.build(tower, "QUANT", "vision_tower")
    assert utils.CALLS == [(tower, "QUANT", "vision_tower")]  # the walk ran, same arguments
    (rec,) = plugin.records()
    assert rec.prefix == "vision_tower" and rec.report is None
    assert rec.fallback.startswith("UsageError: fxpass.apply: quant_config must be a vLLM "
                                   "quantization config"), rec.fallback
    assert isinstance(tower[0], nn.Linear)  # apply is atomic: the walk got the tower as it was
    warnings = [r for r in plugin_log if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "vision_tower" in warnings[0].getMessage()
    assert rec.to_dict()["fallback"] == rec.fallback


def test_disabled_at_call_time_runs_the_walk(tmp_path, monkeypatch, plugin_state):
    _fake_vllm(tmp_path, monkeypatch, "fakevllm_e")
    plugin.register()
    model_mod = importlib.import_module("fakevllm_e.model")
    monkeypatch.setenv(plugin.ENV_DISABLE, "1")
    tower = nn.Sequential(nn.Linear(4, 4))
    model_mod.build(tower, None, "audio_tower")
    assert sys.modules["fakevllm_e.utils"].CALLS == [(tower, None, "audio_tower")]
    assert plugin.records() == []


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, y):
        if x.shape[0] > 1:  # a shape branch: the graph is specialised, with a guard
            y = y * 1.0
        return self.lin(x) + y


def test_records_count_specialisations_and_fallbacks(vllm_rt, plugin_log):
    """A call the graph was not traced for is traced again (counted); one no graph can serve
    runs the module's Python forward (counted, one warning per module)."""
    import fxpass

    class DataBranch(_Toy):
        def forward(self, x, y):
            if x.shape[0] > 2 and x.sum() > 0:  # data-dependent, only for batch > 2
                y = y * 1.0
            return super().forward(x, y)

    toy = DataBranch().eval()
    ref = copy.deepcopy(toy)
    x, y = torch.randn(2, 4), torch.randn(2, 4)
    report = fxpass.apply(toy, None, load_weights=True, example_inputs={"x": x, "y": y})
    rec = plugin.TowerRecord(prefix="t", tower="DataBranch", report=report)
    with torch.no_grad():
        for n in (2, 1, 1, 3, 3):
            xs, ys = torch.randn(n, 4).abs(), torch.randn(n, 4)
            assert torch.allclose(toy(xs, ys), ref(xs, ys), atol=1e-5)
    assert rec.specialisations == {"<root>": 1}  # batch 1: the other branch, traced again
    assert rec.fallbacks == {"<root>": 2}  # batch 3: data-dependent, so Python serves it
    assert rec.to_dict()["fallbacks"] == {"<root>": 2}
    assert "data-dependent" in report.runtime.reasons["<root>"]["fallback"]
    # the plugin itself warned of nothing (the graph runtime's own warning, logger fxpass,
    # reaches vllm.fxpass's handlers too)
    assert not [r for r in plugin_log if r.levelno >= logging.WARNING and r.name != "fxpass"]


def test_a_tower_nobody_named_is_traced_at_its_first_call(vllm_rt, plugin_state, plugin_log):
    """No input table in the vLLM path: swapped at init, graphs from the first real call,
    the report logged at init and again after that call."""

    class Unknown(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(8, 8)
            self.out = nn.Linear(8, 4)

        def forward(self, pixel_values, scale=2.0):
            h = self.proj(pixel_values.transpose(1, 2)).to(self.out.weight.dtype)
            return self.out(torch.relu(h) * scale)

    torch.manual_seed(0)
    tower = Unknown().eval()
    ref = copy.deepcopy(tower)
    plugin._original = lambda *a, **k: pytest.fail("fell back to vLLM's walk")
    plugin.replace_linear(tower, None, prefix="vision_tower")
    (rec,) = plugin.records()
    assert rec.fallback is None and rec.report.traced_at == "first call"
    assert rec.report.first_call["state"] == "armed"
    from fxpass.weights import load_linear_weights

    for name in ("proj", "out"):  # what vLLM's loader does after model init
        old = ref.get_submodule(name)
        load_linear_weights(tower.get_submodule(name), old.weight, old.bias, None)
    x = torch.randn(2, 8, 5)
    with torch.no_grad():
        torch.testing.assert_close(tower(x), ref(x), atol=1e-5, rtol=0)
    report = rec.report
    assert report.first_call["state"] == "traced"
    assert sorted(report.graph_rewrites) == ["vision_tower.out", "vision_tower.proj"]
    # proj's input is a transpose (oneDNN's GEMM would reject it): a .contiguous() first
    assert [f.rule for f in report.fixes] == ["weight-probes", "contiguity"]
    info = [r.getMessage() for r in plugin_log if r.levelno == logging.INFO]
    assert any("speed rules on" in m for m in info), info  # the switches, once per tower
    info = [m for m in info if "linears -> vLLM" in m]
    assert len(info) == 2 and "come at the first call" in info[0], info
    assert "graphs traced at the first call" in info[1], info
    assert rec.to_dict()["report"]["first_call"]["state"] == "traced"


def test_a_module_without_linears_is_not_news(vllm_rt, plugin_state, plugin_log):
    """vLLM hands the plugin a StageMissingLayer for a modality switched off
    (limit_mm_per_prompt={"audio": 0}): nothing to rewrite, nothing above DEBUG."""

    from vllm.model_executor.models.utils import StageMissingLayer

    from fxpass import zoo

    # vLLM's placeholder keeps the built tower out of the module tree (and reads through to it)
    missing = StageMissingLayer("audio", zoo.build_tower("gemma4_audio"))
    plugin._original = lambda *a, **k: pytest.fail("fell back to vLLM's walk")
    plugin.replace_linear(missing, None, prefix="audio_tower")
    (rec,) = plugin.records()
    assert rec.fallback is None and rec.report.replaced == []
    assert [r for r in plugin_log if r.levelno >= logging.INFO] == []
    assert any("has no linear layers" in r.getMessage() for r in plugin_log)


def test_audio_tower_traced_in_vllm_call_convention(vllm_rt, plugin_state):
    """vLLM calls the audio tower positionally (the zoo's inputs are keywords): its first
    call is traced as it comes, the contiguity fix included."""
    from vllm.model_executor.layers.linear import ReplicatedLinear

    from fxpass import zoo

    tower = zoo.build_tower("gemma4_audio", dtype=torch.bfloat16)
    inputs = zoo.example_inputs(tower, size_index=1)
    plugin._original = lambda *a, **k: pytest.fail("fell back to vLLM's walk")
    plugin.replace_linear(tower, None, prefix="audio_tower")
    (rec,) = plugin.records()
    assert rec.fallback is None and rec.report is not None
    assert all(not isinstance(m, nn.Linear) for m in tower.modules())
    assert len(rec.report.replaced) == sum(isinstance(m, ReplicatedLinear)
                                           for m in tower.modules())
    for m in tower.modules():
        if isinstance(m, ReplicatedLinear):
            m.quant_method.process_weights_after_loading(m)
    with torch.no_grad():
        out = tower(inputs["input_features"], inputs["attention_mask"])  # as gemma4_mm does
    assert out.last_hidden_state.shape[0] == 1
    assert rec.fallbacks == {}
    assert rec.report.first_call["state"] == "traced"
    assert [f.module for f in rec.report.contiguity] == ["layers.0.lconv1d.linear_end"]


def test_fxpass_log_records_reach_vllms_logger(monkeypatch):
    """Inside vLLM the graph runtime's and the first call's warnings (logger ``fxpass``) come
    out through ``vllm.fxpass``, i.e. vLLM's handler and format; routing is set up once."""
    import logging

    lib = logging.getLogger("fxpass")
    monkeypatch.setattr(lib, "handlers", [h for h in lib.handlers
                                          if not isinstance(h, plugin._ToVllmLog)])
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record)

    keep = Keep()
    plugin.logger.addHandler(keep)
    try:
        plugin._route_fxpass_logs()
        plugin._route_fxpass_logs()  # once only
        assert sum(isinstance(h, plugin._ToVllmLog) for h in lib.handlers) == 1
        lib.warning("fxpass: a runtime warning")
    finally:
        plugin.logger.removeHandler(keep)
    assert [r.getMessage() for r in seen] == ["fxpass: a runtime warning"]
    assert seen[0].name == "fxpass"


class _QKV(nn.Module):
    """Three projections of one input (fusable) and an output projection."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.o = nn.Linear(8, 8)

    def forward(self, x):
        return self.o(torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2), -1) @ self.v(x))


def _engine_config(additional_config=None, lora=False):
    """A VllmConfig as vLLM hands its model init one: additional_config, optional LoRA."""
    from vllm.config import LoRAConfig, VllmConfig

    config = VllmConfig(additional_config=additional_config or {})
    if lora:  # (a LoRAConfig checks itself against a model config this test has none of)
        config.lora_config = LoRAConfig.__new__(LoRAConfig)
    return config


def _rewrite_in_engine(config, monkeypatch):
    """replace_linear under ``config`` (as vLLM's model init calls it), then vLLM's loader
    and a first call; (tower, reference, record)."""
    from vllm.config import set_current_vllm_config

    from fxpass.weights import load_linear_weights

    monkeypatch.setattr(plugin, "_original", lambda *a, **k: pytest.fail("walk fallback"))
    torch.manual_seed(0)
    tower = _QKV().eval()
    ref = copy.deepcopy(tower)
    with set_current_vllm_config(config):
        plugin.replace_linear(tower, None, prefix="vision_tower")
    for name in ("q", "k", "v", "o"):
        old = ref.get_submodule(name)
        load_linear_weights(tower.get_submodule(name), old.weight, old.bias, None)
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        torch.testing.assert_close(tower(x), ref(x), atol=1e-5, rtol=1e-5)
    return tower, ref, plugin.records()[-1]


def test_speed_rules_fuse_at_the_first_call_by_default(vllm_rt, plugin_state, monkeypatch):
    """No input table: the siblings are merged at the first call from the loaded layers."""
    tower, ref, rec = _rewrite_in_engine(_engine_config(), monkeypatch)
    assert rec.settings.speed_rules and rec.fusion_off is None
    assert rec.report.fused == {"vision_tower.fused__q__k__v": [
        "vision_tower.q", "vision_tower.k", "vision_tower.v"]}
    assert type(tower.fused__q__k__v).__name__ == "MergedColumnParallelLinear"
    assert not any("_fxpass_loaded_weight" in m.__dict__ for m in tower.modules())


@pytest.mark.parametrize("setting, says", [
    (None, None),
    ({"mode": 3, "backend": "eager"}, "compile with torch.compile (backend eager, dynamic"),
    ({"mode": 3, "backend": "my.module.backend"}, "(backend inductor, dynamic"),
    ({"mode": 0}, "not compiled: vLLM's compilation mode is NONE (enforce_eager=True"),
    ({"mode": 3, "lora": True}, "not compiled: LoRA is enabled"),
], ids=["not-asked", "eager", "not-a-torch-backend", "mode-none", "lora"])
def test_compile_mm_encoder_compiles_the_parts_vllm_calls_after_the_first_call(
        vllm_rt, plugin_state, plugin_log, monkeypatch, setting, says):
    """vLLM's compile_mm_encoder compiles the rewritten tower where vLLM would compile its
    own encoders (not in compilation mode NONE, not under LoRA), with the engine's backend
    when torch knows it by name; the INFO line says which, or why not."""
    from torch._dynamo.utils import counters

    setting = dict(setting or {})
    config = _engine_config(lora=setting.pop("lora", False))
    if setting:
        config.compilation_config.compile_mm_encoder = True
        config.compilation_config.mode = setting["mode"]
        config.compilation_config.backend = setting.get("backend", "")
    tower, ref, rec = _rewrite_in_engine(config, monkeypatch)
    switches = [r.getMessage() for r in plugin_log
                if r.levelno == logging.INFO and "speed rules on" in r.getMessage()]
    assert len(switches) == 1, switches
    if says is None:
        assert "compile" not in switches[0] and rec.compiled == {}
    else:
        assert says in switches[0], switches
    compiled = bool(rec.compiled.get("backend"))
    assert rec.compiled.get("entries", []) == (["<root>"] if compiled else [])
    assert (tower._compiled_call_impl is not None) is compiled
    if rec.compiled.get("backend") == "inductor":
        return  # inductor's compile costs seconds: the engine benchmark runs it
    before = counters["stats"]["unique_graphs"]
    x = torch.randn(3, 7, 8)
    with torch.no_grad():  # dynamo compiles at this call, the first one after the trace
        torch.testing.assert_close(tower(x), ref(x), atol=1e-5, rtol=1e-5)
    assert (counters["stats"]["unique_graphs"] > before) is compiled


@pytest.mark.parametrize("config, why", [
    ({"fxpass": {"speed_rules": False}}, None),
    ({"fxpass": {"disable": ["fusion"]}}, None),
    ("lora", "LoRA is enabled"),
], ids=["speed-rules-off", "fusion-off", "lora"])
def test_switches_keep_the_linears_apart(vllm_rt, plugin_state, monkeypatch, config, why):
    cfg = _engine_config(lora=True) if config == "lora" else _engine_config(config)
    tower, _, rec = _rewrite_in_engine(cfg, monkeypatch)
    assert rec.report.fused == {}
    assert rec.fusion_off is None if why is None else why in rec.fusion_off
    assert [type(getattr(tower, n)).__name__ for n in "qkv"] == ["ReplicatedLinear"] * 3


@pytest.mark.parametrize("entry, match", [
    ({"fxpass": {"fuse": True}}, r"unknown key\(s\) 'fuse'; the keys are: disable, enabled"),
    ({"fxpass": {"disable": ["mm-atention"]}}, r"unknown rule name\(s\) 'mm-atention'"),
])
def test_a_bad_fxpass_entry_stops_model_init(vllm_rt, plugin_state, monkeypatch, entry, match):
    """Not the walk's fallback: the engine stops, naming the key and the valid ones."""
    from vllm.config import set_current_vllm_config

    monkeypatch.setattr(plugin, "_original", lambda *a, **k: pytest.fail("walk fallback"))
    with set_current_vllm_config(_engine_config(entry)):
        with pytest.raises(fxpass.UsageError, match=match):
            plugin.replace_linear(_QKV(), None, prefix="vision_tower")
    assert plugin.records() == []


def test_fxpass_disable_in_additional_config_runs_the_walk(vllm_rt, plugin_state, monkeypatch):
    from vllm.config import set_current_vllm_config

    walked = []
    monkeypatch.setattr(plugin, "_original", lambda m, q, prefix="": walked.append(prefix))
    with set_current_vllm_config(_engine_config({"fxpass": {"enabled": False}})):
        plugin.replace_linear(_QKV(), None, prefix="vision_tower")
    assert walked == ["vision_tower"] and plugin.records() == []
