"""GRPO's trainer side at the recipe's shape: packed micro-batches under a token budget,
balanced over DP ranks, and the fused old-logprob forward, checked against the simple layout.

One torchrun worker per parallel layout (tests/workers/grpo_update_worker.py) runs the step in
several ways on the same weights and the same rollouts (long-tailed lengths, one sequence
longer than the budget, zero-variance groups, overlong-filtered responses). Invariants:

- packed == padded: loss, every parameter's gradient and the logged metrics, at TP1, TP2, PP2
  and DP2, also when every group is filtered out (nothing to train on, metrics only);
- DP2 (balanced) == DP1 on the same global batch: loss, gradients, parameters after the update;
- fused single forward == separate old-logprob pass (num_updates == 1): same parameters after
  the update, same mismatch and entropy metrics; num_updates == 2 runs the separate pass.

Tolerances (tests/tolerances.py). The paths differ only in how float32 sums are ordered and
grouped (other matmul shapes, per-sequence vs batched attention): metrics and gradients are
compared at the reordering bound for sums over the step's real positions (~400 tokens: ~2e-5
relative), measured ~5e-7. A real bug (attention leaking across packed sequences, advantages
or the normaliser misaligned, a micro-batch dropped) changes them by 1e-2 or more. Parameters
after one AdamW step are compared with the first-step bound of the two runs' own gradients.
"""

import pytest
import torch

from dist_utils import REPO, torchrun
from tolerances import adamw_first_step_bound, reorder_atol, reorder_rtol

WORKER = REPO / "tests" / "workers" / "grpo_update_worker.py"
LR, ADAM_EPS = 1e-3, 1e-8  # the worker's optimizer
NUM_POSITIONS = 400  # about the real positions of the worker's rollouts: the terms of each sum
BASE_CASES = ("packed", "padded", "packed-nokeep", "padded-nokeep")
TP1_CASES = BASE_CASES + ("packed-separate", "packed-updates2", "padded-updates2",
                          "packed-measureall", "packed-measuresampled")
LAYOUTS = {"tp1": (1, 1, 1), "tp2": (2, 1, 2), "pp2": (1, 2, 2), "dp2": (1, 1, 2)}
NOT_COMPARED = {"update/real_token_share"}  # differs by design


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cache = {}

    def get(name: str) -> dict:
        if name not in cache:
            tp, pp, nproc = LAYOUTS[name]
            out = tmp_path_factory.mktemp(name) / "result.pt"
            cases = TP1_CASES if name == "tp1" else BASE_CASES
            torchrun(WORKER, tp, pp, out, *cases, nproc=nproc, timeout=900)
            cache[name] = torch.load(out, weights_only=False)
        return cache[name]

    return get


def assert_metrics_close(a: dict, b: dict) -> None:
    assert set(a) - NOT_COMPARED == set(b) - NOT_COMPARED
    for key in sorted(set(a) - NOT_COMPARED):
        torch.testing.assert_close(a[key], b[key], rtol=reorder_rtol(NUM_POSITIONS), atol=1e-9,
                                   msg=key)


def assert_grads_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    scale = torch.stack([v.abs().max() for v in a.values()]).max()
    assert scale > 0
    atol = reorder_atol(scale, NUM_POSITIONS)
    for name in a:
        diff = (a[name] - b[name]).abs().max().item()
        assert diff <= atol, f"{name}: |grad diff| {diff:.3g} > {atol:.3g}"


def assert_params_close(run_a: dict, run_b: dict, initial: dict) -> None:
    for name, pa in run_a["params"].items():
        bound = adamw_first_step_bound(run_a["grads"][name], run_b["grads"][name],
                                       initial[name].to(pa.dtype), lr=LR, eps=ADAM_EPS)
        excess = ((pa.double() - run_b["params"][name].double()).abs() - bound).max().item()
        assert excess <= 0, f"{name}: parameters differ by {excess:.3g} beyond the AdamW bound"


@pytest.mark.dist
@pytest.mark.numerics
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_packed_equals_padded(runs, layout):
    result = runs(layout)
    packed, padded = result["packed"], result["padded"]
    assert_metrics_close(packed["metrics"], padded["metrics"])
    assert_grads_close(packed["grads"], padded["grads"])
    assert_params_close(packed, padded, result["initial"])
    # The packed layout holds (almost) only real tokens; the padded one mostly padding here.
    # (Under PP every packed row is as long as the longest sequence: bins of 12 sequences into
    # rows of that length leave more room unused.)
    share = packed["metrics"]["update/real_token_share"]
    assert share >= (0.75 if layout == "pp2" else 0.9), share
    assert padded["metrics"]["update/real_token_share"] < 0.5
    # Nothing kept: no update, and both layouts still measure every rollout alike.
    nokeep_a, nokeep_b = result["packed-nokeep"], result["padded-nokeep"]
    assert nokeep_a["metrics"]["update/skipped"] == 1.0
    assert_metrics_close(nokeep_a["metrics"], nokeep_b["metrics"])
    assert all(torch.equal(nokeep_a["params"][k], result["initial"][k].to(nokeep_a["params"][k]))
               for k in nokeep_a["params"])
    # Measurements cover the trained rollouts; with nothing trained, every rollout.
    assert 0 < packed["metrics"]["mismatch/num_tokens"] < nokeep_a["metrics"]["mismatch/num_tokens"]


@pytest.mark.dist
@pytest.mark.numerics
def test_balanced_dp2_equals_dp1(runs):
    dp1, dp2 = runs("tp1")["packed"], runs("dp2")["packed"]
    assert_metrics_close(dp1["metrics"], dp2["metrics"])
    assert_grads_close(dp1["grads"], dp2["grads"])
    assert_params_close(dp1, dp2, runs("tp1")["initial"])
    # Longest-first greedy: the ranks' positions differ by at most one sequence, and both run
    # the same number of micro-batches.
    positions = dp2["rank_positions"]
    assert len(positions) == 2 and abs(positions[0] - positions[1]) <= 120, positions
    assert len(set(dp2["num_micro_batches"])) == 1


@pytest.mark.dist
@pytest.mark.numerics
def test_fused_forward_equals_separate_logprob_pass(runs):
    result = runs("tp1")
    fused, separate = result["packed"], result["packed-separate"]
    assert fused["metrics"]["update/separate_logprob_pass"] == 0.0
    assert separate["metrics"]["update/separate_logprob_pass"] == 1.0
    # Same micro-batches, same forward: the old logprobs are the same numbers either way.
    for name in fused["params"]:
        assert torch.equal(fused["params"][name], separate["params"][name]), name
    for key in fused["metrics"]:
        if key.startswith(("mismatch/", "rollout/", "update/")) and "separate" not in key:
            assert fused["metrics"][key] == separate["metrics"][key], key
    # Strictly on-policy either way: the first update sees ratio 1.
    assert fused["metrics"]["update/max_abs_ratio_minus_1_first"] == 0.0
    assert separate["metrics"]["update/max_abs_ratio_minus_1_first"] == 0.0
    # Two mini-batches need the old logprobs before the first update: the separate pass runs,
    # and the second update really is off-policy (its ratio moved away from 1).
    two = result["packed-updates2"]["metrics"]
    assert two["update/separate_logprob_pass"] == 1.0
    assert two["update/ratio_mean"] != 1.0
    assert_metrics_close(two, result["padded-updates2"]["metrics"])


@pytest.mark.dist
@pytest.mark.numerics
def test_measuring_filtered_rollouts_covers_every_rollout_and_changes_no_update(runs):
    result = runs("tp1")
    default, every = result["packed"], result["packed-measureall"]
    assert (every["metrics"]["mismatch/num_tokens"]
            == result["packed-nokeep"]["metrics"]["mismatch/num_tokens"]
            > default["metrics"]["mismatch/num_tokens"])
    assert every["metrics"]["rollout/entropy"] != default["metrics"]["rollout/entropy"]
    for name in default["params"]:  # a forward-only pass: the update is the same
        assert torch.equal(default["params"][name], every["params"][name]), name


@pytest.mark.dist
@pytest.mark.numerics
def test_measuring_filtered_rollouts_from_sampled_tokens_adds_their_minus_logp(runs):
    """`grpo.filtered_entropy=sampled`: no forward over the rollouts not trained on; their
    entropy is the sum of -log p of their sampled tokens (engine logprobs), pooled with the
    update forward's exact entropy of the trained ones, token-weighted."""
    result = runs("tp1")
    default, sampled = result["packed"], result["packed-measuresampled"]
    kept_tokens = default["metrics"]["mismatch/num_tokens"]  # every trained response token
    dropped = [lp for lp, k in zip(sampled["engine_logp"], sampled["keep"]) if not k]
    assert dropped and kept_tokens > 0
    dropped_tokens = sum(len(lp) for lp in dropped)
    dropped_sum = -sum(x for lp in dropped for x in lp)
    expected = ((default["metrics"]["rollout/entropy"] * kept_tokens + dropped_sum)
                / (kept_tokens + dropped_tokens))
    assert sampled["metrics"]["rollout/entropy"] == pytest.approx(expected, rel=1e-6)
    # The mismatch metrics still cover the trained rollouts only, and the update is the same.
    assert sampled["metrics"]["mismatch/num_tokens"] == kept_tokens
    for name in default["params"]:
        assert torch.equal(default["params"][name], sampled["params"][name]), name
