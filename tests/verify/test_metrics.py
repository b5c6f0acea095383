"""fxpass.verify.metrics against values computed by hand (no vLLM needed)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fxpass.verify.metrics import Metrics, compare_tensors, json_float


def test_exact_match():
    r = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    m = compare_tensors(r.clone(), r, atol=1e-5, rtol=1e-6)
    assert m.max_abs == 0.0 and m.max_rel == 0.0
    assert m.sqnr_db == math.inf
    assert m.cosine == pytest.approx(1.0, abs=1e-12)
    assert m.tol_ratio == 0.0
    assert m.exact and not m.shape_mismatch and not m.dtype_mismatch
    assert m.ref_max_abs == 2.0 and m.numel == 4


def test_hand_computed_float32():
    c = torch.tensor([1.0, 2.0, 3.0, 4.0])
    r = torch.tensor([1.0, 2.0, 3.0, 5.0])
    m = compare_tensors(c, r, atol=0.5, rtol=0.1)
    assert m.max_abs == 1.0
    assert m.max_rel == pytest.approx(0.2)  # |4-5| / 5
    # signal 1+4+9+25 = 39, noise 1
    assert m.sqnr_db == pytest.approx(10 * math.log10(39.0))
    # <c,r> = 1+4+9+20 = 34; |c|^2 = 30, |r|^2 = 39
    assert m.cosine == pytest.approx(34 / math.sqrt(30 * 39))
    # worst element: 1 / (0.5 * rms + 0.1*5); rms = sqrt(39/4) > 1 scales the atol
    assert m.tol_ratio == pytest.approx(1.0 / (0.5 * math.sqrt(39 / 4) + 0.5))
    # at unit scale (rms <= 1) it is assert_close's criterion exactly: 0.1 / (0.05 + 0.1*0.5)
    small = compare_tensors(c / 10, r / 10, atol=0.05, rtol=0.1)
    assert small.tol_ratio == pytest.approx(1.0)
    assert m.ref_max_abs == 5.0


def test_bfloat16_exactly_representable_values():
    # 1/64 is one bf16 ulp at 2.0 (7 stored mantissa bits): every value below is exact in
    # bf16, so the metrics are exact too (computed in fp32, not in bf16, which would round).
    c = torch.tensor([1.0, 2.0 + 1 / 64, -3.0, 0.25], dtype=torch.bfloat16)
    r = torch.tensor([1.0, 2.0, -3.0, 0.25], dtype=torch.bfloat16)
    m = compare_tensors(c, r)
    assert (m.dtype, m.ref_dtype) == ("bfloat16", "bfloat16")
    assert m.max_abs == 1 / 64
    assert m.max_rel == pytest.approx(1 / 128)
    signal = 1 + 4 + 9 + 0.0625
    assert m.sqnr_db == pytest.approx(10 * math.log10(signal / (1 / 64) ** 2))
    dot = 1 + 2 * (2 + 1 / 64) + 9 + 0.0625
    cn = 1 + (2 + 1 / 64) ** 2 + 9 + 0.0625
    assert m.cosine == pytest.approx(dot / math.sqrt(cn * signal), rel=1e-12)
    assert m.tol_ratio is None  # no tolerance given


def test_bfloat16_exact_match_and_dtype_mismatch():
    r = torch.randn(3, 5).to(torch.bfloat16)
    same = compare_tensors(r.clone(), r)
    assert same.sqnr_db == math.inf and same.cosine == pytest.approx(1.0) and same.exact
    widened = compare_tensors(r.float(), r)  # same values, other dtype
    assert widened.max_abs == 0.0 and widened.sqnr_db == math.inf
    assert widened.dtype_mismatch and not widened.exact
    assert (widened.dtype, widened.ref_dtype) == ("float32", "bfloat16")


def test_shape_mismatch_has_no_numbers():
    m = compare_tensors(torch.zeros(2, 3), torch.zeros(3, 2))
    assert m.shape_mismatch and m.shape == (2, 3) and m.ref_shape == (3, 2)
    assert m.max_abs is None and m.sqnr_db is None and m.cosine is None


def test_zero_reference():
    zero = torch.zeros(4)
    both = compare_tensors(zero.clone(), zero)
    assert both.cosine == 1.0 and both.sqnr_db == math.inf and both.max_rel == 0.0
    m = compare_tensors(torch.tensor([0.0, 1.0, 0.0, 0.0]), zero)
    assert m.sqnr_db == -math.inf and m.cosine == 0.0 and m.max_rel == math.inf
    assert m.max_abs == 1.0


def test_nan_inf_counts():
    r = torch.tensor([1.0, float("-inf"), 3.0, 4.0])
    c = torch.tensor([1.0, float("-inf"), float("nan"), float("inf")])
    m = compare_tensors(c, r)
    assert (m.nan, m.inf, m.ref_nan, m.ref_inf) == (1, 2, 0, 1)
    assert m.nonfinite_mismatch == 2  # -inf matches -inf; nan and +inf are new
    assert m.max_abs == 0.0  # over the positions finite in both: only index 0
    same = compare_tensors(r.clone(), r)
    assert same.nonfinite_mismatch == 0 and same.sqnr_db == math.inf


def test_integer_and_bool_tensors():
    m = compare_tensors(torch.tensor([1, 2, 3]), torch.tensor([1, 2, 4]))
    assert m.max_abs == 1.0 and (m.dtype, m.ref_dtype) == ("int64", "int64")
    b = compare_tensors(torch.tensor([True, False]), torch.tensor([True, False]))
    assert b.exact and b.sqnr_db == math.inf


def test_exact_tolerance_zero():
    r = torch.tensor([1.0, 2.0])
    assert compare_tensors(r.clone(), r, atol=0.0, rtol=0.0).tol_ratio == 0.0
    assert compare_tensors(r + 1, r, atol=0.0, rtol=0.0).tol_ratio == math.inf


def test_to_dict_is_strict_json_and_round_trips():
    m = compare_tensors(torch.ones(3), torch.ones(3))
    d = m.to_dict()
    text = json.dumps(d, allow_nan=False)
    assert json.loads(text)["sqnr_db"] == "inf"
    back = Metrics.from_dict(json.loads(text))
    assert back == m
    assert json_float(float("nan")) == "nan" and json_float(-math.inf) == "-inf"
    assert json_float(None) is None and json_float(1.5) == 1.5
