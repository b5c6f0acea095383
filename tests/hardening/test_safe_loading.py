"""Safe by default: nothing fxpass loads can run code.

* checkpoints: ``fxpass.zoo.load_tower`` (what ``fxpass diff`` uses) reads config and weights
  with ``trust_remote_code=False`` and offline; a checkpoint that ships its own modelling code
  or a pickled ``pytorch_model.bin`` with a payload is refused and the payload never runs;
* saved inputs: ``fxpass diff --inputs`` reads ``.safetensors`` (no code at all) or
  ``torch.load(weights_only=True)``; a pickle payload is refused, not run.

(HTML escaping of names/reasons in ``fxpass viz`` is tested by the viz suite.)
"""

from __future__ import annotations

import json
import pickle
import zipfile

import pytest
import torch

from fxpass import cli, zoo
from fxpass.errors import UsageError


class _Payload:
    """Unpickling this creates ``marker``: proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_load_tower_never_trusts_remote_code(monkeypatch, clip_ckpt):
    import transformers

    seen = []
    for name in ("AutoConfig", "AutoModel"):
        cls = getattr(transformers, name)
        real = cls.from_pretrained.__func__

        def spy(klass, *a, _real=real, _name=name, **kw):
            seen.append((_name, kw.get("trust_remote_code"), kw.get("local_files_only")))
            return _real(klass, *a, **kw)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    tower = zoo.load_tower(clip_ckpt, "encoder")
    assert type(tower).__name__ == "CLIPEncoder"
    assert {name for name, _, _ in seen} == {"AutoConfig", "AutoModel"}
    assert all(trust is False and offline is True for _, trust, offline in seen), seen


def test_checkpoint_with_custom_code_is_refused_and_its_code_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "evil_tower",
        "auto_map": {"AutoConfig": "modeling_evil.EvilConfig",
                     "AutoModel": "modeling_evil.EvilModel"},
    }))
    (tmp_path / "modeling_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('code ran')\n"
        "from transformers import PretrainedConfig\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'evil_tower'\n")
    with pytest.raises(UsageError) as info:
        zoo.load_tower(tmp_path, "vision_tower")
    msg = str(info.value)
    assert msg.startswith(f"{tmp_path}: reading config.json failed (ValueError: ")
    assert "trust_remote_code=False: code shipped in a checkpoint never runs" in msg
    assert not marker.exists()


def _weaponised_torch_file(path, marker) -> None:
    """A torch.save-style zip whose data.pkl runs code when unpickled without weights_only."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(_Payload(str(marker)), protocol=2))
        z.writestr("archive/version", "3\n")


def test_pickled_checkpoint_weights_with_a_payload_are_refused(tmp_path, clip_ckpt):
    # the file is a real weapon: an unsafe torch.load runs it
    _weaponised_torch_file(tmp_path / "probe.bin", tmp_path / "unsafe_ran")
    torch.load(tmp_path / "probe.bin", weights_only=False)
    assert (tmp_path / "unsafe_ran").exists()

    marker = tmp_path / "pwned"
    (tmp_path / "config.json").write_text((clip_ckpt / "config.json").read_text())
    _weaponised_torch_file(tmp_path / "pytorch_model.bin", marker)
    with pytest.raises(UsageError, match=rf"^{tmp_path}: loading the weights with AutoModel "
                                         r"failed \("):
        zoo.load_tower(tmp_path, "encoder")
    assert not marker.exists()


def test_cli_inputs_are_loaded_without_code_execution(monkeypatch, tmp_path):
    calls = []
    real = torch.load

    def spy(*a, **kw):
        calls.append(kw)
        return real(*a, **kw)

    monkeypatch.setattr(torch, "load", spy)
    good = tmp_path / "inputs.pt"
    torch.save({"pixel_values": torch.zeros(1, 3, 4, 4)}, good)
    assert list(cli._load_inputs(good)[0]) == ["pixel_values"]
    assert calls and all(kw.get("weights_only") is True for kw in calls)

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"pixel_values": _Payload(str(marker))}, evil)  # torch.save pickles it as is
    real(evil, weights_only=False)  # the file is a real weapon: an unsafe load runs it
    assert marker.exists()
    marker.unlink()
    with pytest.raises(UsageError, match=rf"^--inputs {evil}: cannot read it: UnpicklingError"):
        cli._load_inputs(evil)
    assert not marker.exists()


def test_cli_safetensors_inputs_round_trip(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "inputs.safetensors"
    x = torch.randn(1, 5, 8)
    save_file({"inputs_embeds": x}, str(path))
    (loaded,) = cli._load_inputs(path)
    assert list(loaded) == ["inputs_embeds"] and torch.equal(loaded["inputs_embeds"], x)
