"""Never worse than the walk, on HF towers nobody tuned for: every catalogue tower
(tests/towers/catalogue.py: the four named ones and 60+ others built from shrunk default
configs), rewritten by fxpass.apply and called as HF users call it, gives the original's
answer within the unquantized budget, or the original's exception."""

from __future__ import annotations

import logging

import pytest
import torch

import call_forms
import catalogue as cat

pytestmark = pytest.mark.usefixtures("vllm_rt")


@pytest.fixture(autouse=True)
def quiet_and_one_thread(caplog):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny towers: one thread is fastest on a shared 2-core box
    caplog.set_level(logging.ERROR, logger="fxpass")
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", [t.name for t in cat.TOWERS])
def test_rewritten_tower_answers_every_call_form_as_the_original(name):
    res = call_forms.check(cat.by_name(name))
    assert res.wrong == [], "\n".join(res.wrong)
    assert {"keyword", "positional", "omitted_defaults", "explicit_defaults",
            "submodule"} <= res.forms
    # every linear site sits in a graph, or has a reason a person can read
    assert res.graph_sites == res.linears or all(
        len(why) > 20 for why in res.site_reasons.values()), res.site_reasons
