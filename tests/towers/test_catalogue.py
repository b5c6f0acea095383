"""The tower catalogue itself, on the original HF modules (no fxpass): every tower builds, every
call form runs, twice with the same result, and the equivalent forms agree exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import catalogue as cat

# Forms that call the tower with the same data as `keyword`, only spelled differently.
SAME_AS_KEYWORD = ("positional", "explicit_defaults")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny towers: one intra-op thread is fastest, and on a shared 2-core box two threads
    contend badly (a 0.02 s forward became 0.7 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_catalogue_covers_named_and_enough_classes():
    names = [t.name for t in cat.TOWERS]
    assert len(set(names)) == len(names), "duplicate catalogue entries"
    classes = {t.model_class for t in cat.TOWERS}
    assert len(classes) >= 24
    assert set(cat.NAMED) <= set(names)
    for name, hint in cat.HINTS.items():
        assert hint.why, f"hint for {name} says why"


def test_shrink_is_generic_and_tiny():
    """The generic shrink alone (no hint) makes a default ViT / Wav2Vec2 config tiny."""
    import transformers as tf

    vit = cat.shrink(tf.ViTConfig)
    assert (vit.hidden_size, vit.num_hidden_layers, vit.num_attention_heads) == (32, 2, 2)
    assert (vit.image_size, vit.patch_size, vit.intermediate_size) == (32, 8, 64)
    w2v = cat.shrink(tf.Wav2Vec2Config)
    assert max(w2v.conv_dim) == 32 and w2v.hidden_size % w2v.num_conv_pos_embedding_groups == 0
    swin = cat.shrink(tf.SwinConfig)  # derived hidden_size recomputed by the constructor
    assert swin.hidden_size == swin.embed_dim * 2 ** (len(swin.depths) - 1)


def test_compare_checks_structure():
    a = (torch.ones(2), {"x": torch.zeros(3)})
    assert cat.compare(a, (torch.ones(2) + 0.5, {"x": torch.zeros(3)})) == 0.5
    with pytest.raises(AssertionError, match="shape"):
        cat.compare(a, (torch.ones(3), {"x": torch.zeros(3)}))
    with pytest.raises(AssertionError, match="structure"):
        cat.compare(a, (torch.ones(2),))


def _run_twice(call: cat.Call, tower: nn.Module):
    torch.manual_seed(0)
    with torch.no_grad():
        first = call(tower)
        second = call(tower)
    assert cat.compare(first, second) == 0.0, f"{call.name} is not deterministic"
    return first


def _main(out):
    """The first output leaf (last_hidden_state, or the tensor itself)."""
    return out if isinstance(out, torch.Tensor) else out[0]


def _check_forms(entry: cat.Tower, tower: nn.Module, size_index: int, batch: int) -> set[str]:
    calls = entry.calls(tower, size_index, batch)
    outs = {c.name: _run_twice(c, tower) for c in calls}
    ref = outs["keyword"]
    for name in SAME_AS_KEYWORD:
        assert cat.compare(outs[name], ref) == 0.0, f"{entry.name}: {name} differs from keyword"
    # omitted_defaults leaves out all-valid masks too: same main output, though some towers
    # then return fewer fields (Gemma4 audio echoes the mask it was given)
    assert cat.compare(_main(outs["omitted_defaults"]), _main(ref)) < 1e-5, entry.name
    for c in calls:
        if c.name.startswith("submodule:"):
            # called directly with the hooked inputs, the module reproduces its in-tower output
            assert cat.compare(outs[c.name], c.seen) == 0.0, f"{entry.name}: {c.name}"
    return set(outs)


@pytest.mark.parametrize("entry", cat.TOWERS, ids=lambda t: t.name)
def test_tower_call_forms(entry: cat.Tower):
    tower = entry.build(seed=0)
    again = entry.build(seed=0)
    assert not tower.training
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in tower.state_dict().items())
    assert any(isinstance(m, nn.Linear) for m in tower.modules())

    forms = _check_forms(entry, tower, 0, 1)
    assert {"keyword", "positional", "omitted_defaults", "explicit_defaults"} <= forms
    assert any(f.startswith("other_branch:") for f in forms), f"{entry.name}: no other branch"
    assert any(f.startswith("submodule:") for f in forms), f"{entry.name}: no submodule call"
    # batch 2 at the largest size, every form
    _check_forms(entry, tower, entry.sizes - 1, 2)

    # every other size and batch, keyword form: distinct input shapes, deterministic outputs
    shapes = set()
    for size_index in range(entry.sizes):
        for batch in (1, 2):
            inputs = entry.inputs(tower, size_index, batch)
            if (size_index, batch) not in ((0, 1), (entry.sizes - 1, 2)):  # run above
                _run_twice(cat.Call("keyword", "", (), inputs), tower)
            if batch == 1:
                shapes.add(tuple(tuple(v.shape) for v in inputs.values()
                                 if isinstance(v, torch.Tensor)))
    assert len(shapes) == entry.sizes, f"{entry.name}: sizes not distinct: {shapes}"
