"""``fxpass.verify`` on a tensor-parallel candidate (TP=2, two rank processes): every call is
compared like with like — one rank's block against the matching block of the reference,
or, where no recorded split matches, marked sharded and checked through its consumers —
and a real divergence still fails (tests/verify/tp_verify_ranks.py runs each rank).
"""

from __future__ import annotations

from typing import Any

import pytest

from tp_verify_ranks import ATTN, Q, SIZES, rank_checks

pytestmark = pytest.mark.processes  # two rank processes

PER_RANK = {f"{ATTN}.{m}" for m in ("q_proj", "k_proj", "v_proj", "q_norm", "k_norm",
                                     "v_norm")}
LINEARS = {f"{ATTN}.{m}_proj.linear" for m in "qkv"}
MLP_COLUMNS = {f"encoder.layers.0.mlp.{m}" for m in ("gate_proj", "gate_proj.linear",
                                                        "up_proj", "up_proj.linear", "act_fn")}


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Any]]:
    from fxpass.verify.ranks import run_on_ranks

    return run_on_ranks(rank_checks, 2, timeout=420)


def _nodes(run: dict[str, Any], module: str) -> list[dict[str, Any]]:
    return [n for n in run["nodes"] if n["module"] == module]


def test_sharded_calls_are_compared_with_the_rank_block_on_every_input(ranks):
    """The issue's FAILED: the attention traced again for the padded input (size 1) ran its
    submodules on stand-ins while tracing, and those calls were compared (SQNR 0 dB) in
    place of the real ones. Now each input compares the same calls, each wrapper around a
    column layer and each norm over the rank's head against the reference's block."""
    for r in ranks:
        run = r["plain"]
        assert run["passed"], run["text"]
        assert run["candidate_only"] == [] and run["reference_only"] == []
        per_input = [sum(n["input"] == i for n in run["nodes"]) for i in range(len(SIZES))]
        assert len(set(per_input)) == 1, per_input
        assert not any(n["sharded"] for n in run["nodes"])
        for module in PER_RANK | LINEARS:
            for n in _nodes(run, module):
                # the right block: the fp32 GEMM's own difference (~130 dB); another rank's
                # block or the full call would be near 0 dB, or a shape mismatch
                assert n["shape"] == n["ref_shape"] and n["sqnr_db"] > 100, n
        q_norm = {n["input"]: n["shape"] for n in _nodes(run, f"{ATTN}.q_norm")}
        assert q_norm[1] == [1, 72, 1, 32]  # one of the 2 heads; the full call is [1,72,2,32]
        assert all(ok for ok, _ in run["outputs"])


def test_unmatched_blocks_are_marked_sharded_not_failed(ranks):
    """With no split recorded in any graph, the per-rank calls are listed as sharded (why
    included) and not counted as failures; everything unsharded and the outputs are still
    compared."""
    for r in ranks:
        assert r["stripped_removed"] > 0
        run = r["stripped"]
        assert run["passed"], run["text"]
        marked = {n["module"] for n in run["nodes"] if n["sharded"]}
        assert marked == PER_RANK | LINEARS | MLP_COLUMNS, marked
        why = next(n["sharded"] for n in _nodes(run, f"{ATTN}.q_norm"))
        assert "[1, 36, 1, 32] of [1, 36, 2, 32], 1/2 along dim 2" in why
        assert "compared through its consumers" in why
        for module in (ATTN, f"{ATTN}.o_proj", "encoder.layers.0.mlp.down_proj"):
            assert all(n["sqnr_db"] is not None for n in _nodes(run, module))
        assert "sharded (compared through their consumers)" in run["text"]
        assert len(run["outputs"]) == len(SIZES)


def test_a_fault_in_a_column_layer_still_fails_where_blocks_are_unmatched(ranks):
    """q_proj's weights swapped for k_proj's on each rank's block: the calls holding blocks
    are not compared, but their consumers fail — the row layer that sums the heads (first),
    the attention output, and the tower's."""
    for r in ranks:
        run = r["stripped_fault"]
        assert not run["passed"]
        assert run["first"] == f"{ATTN}.o_proj.linear", run["text"]
        assert ATTN in run["failed"]
        assert not (set(run["failed"]) & (PER_RANK | LINEARS))
        assert not any(ok for ok, _ in run["outputs"]), run["outputs"]


def test_a_fault_in_a_column_layer_fails_at_the_layer_and_its_wrapper(ranks):
    for r in ranks:
        run = r["fault"]
        assert not run["passed"]
        assert run["first"] == Q, run["text"]
        assert {Q, f"{ATTN}.q_proj", f"{ATTN}.q_norm", ATTN} <= set(run["failed"])
        assert {f"{ATTN}.k_proj", f"{ATTN}.k_norm"}.isdisjoint(run["failed"])


def test_splits_of_a_graph_traced_during_verify_are_read_when_met(ranks):
    """The apply-time graphs carry no records; the attention traced again for the padded
    input records its calls' splits (tensor_parallel.reshard), and verify reads them when it
    meets those calls: its wrappers and norms are compared against the rank's block."""
    for r in ranks:
        assert r["primary_removed"] > 0
        run = r["retraced"]
        assert run["passed"], run["text"]
        for module in PER_RANK:
            (n,) = _nodes(run, module)
            assert n["sharded"] is None and n["sqnr_db"] > 100, n
        # the graphs not traced again (q_proj's own, the MLP's) still have none
        assert {n["module"] for n in run["nodes"] if n["sharded"]} == LINEARS | MLP_COLUMNS
