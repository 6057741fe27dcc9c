"""GRPO math against straightforward loop references and invariants (token-level normalisation)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from megatron_ace.algorithms.grpo import (
    AdvantageEstimator,
    PolicyLossConfig,
    compute_advantages_B,
    entropy_metrics,
    grpo_advantages_B,
    kl_k3_BT,
    nonzero_variance_groups_P,
    overlong_filter_mask_BT,
    policy_loss,
    reduce_loss_metrics,
    split_minibatches,
    token_entropy_BT,
    token_logprobs_BT,
    zero_variance_filter_B,
)

F64 = torch.float64


def _random_batch(seed: int, B: int = 8, T: int = 11):
    g = torch.Generator().manual_seed(seed)
    logp_BT = -torch.rand(B, T, generator=g, dtype=F64) * 3
    old_logp_BT = logp_BT + 0.4 * torch.randn(B, T, generator=g, dtype=F64)
    ref_logp_BT = logp_BT + 0.3 * torch.randn(B, T, generator=g, dtype=F64)
    adv_B = torch.randn(B, generator=g, dtype=F64)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask_BT = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).double()
    return logp_BT, old_logp_BT, ref_logp_BT, adv_B, mask_BT


def _loop_loss(logp, old, ref, adv, mask, clip_low, clip_high, kl_coef):
    """Plain-Python per-token PPO loss, summed over masked tokens."""
    total, count = 0.0, 0
    for b in range(len(logp)):
        for t in range(len(logp[b])):
            if mask[b][t] == 0:
                continue
            ratio = math.exp(logp[b][t] - old[b][t])
            clipped = min(max(ratio, 1 - clip_low), 1 + clip_high)
            term = -min(ratio * adv[b], clipped * adv[b])
            if kl_coef:
                d = ref[b][t] - logp[b][t]
                term += kl_coef * (math.exp(d) - d - 1)
            total += term
            count += 1
    return total, count


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("config", [PolicyLossConfig(), PolicyLossConfig(clip_low=0.1, clip_high=0.28, kl_coef=0.05)])
def test_loss_matches_python_loop(seed, config):
    logp, old, ref, adv, mask = _random_batch(seed)
    loss_sum, num_tokens, _ = policy_loss(logp, old, adv, mask, config, ref_logp_BT=ref)
    want, count = _loop_loss(logp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(),
                             config.clip_low, config.clip_high, config.kl_coef)
    assert float(loss_sum) == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert int(num_tokens) == count


@pytest.mark.parametrize("normalize_std", [True, False])
def test_vectorised_advantages_equal_a_loop(normalize_std):
    g = torch.Generator().manual_seed(0)
    G = 8
    rewards_B = (torch.rand(5 * G, generator=g) > 0.5).double()
    rewards_B[:G] = 1.0  # one all-correct group
    adv_B = grpo_advantages_B(rewards_B, G, normalize_std=normalize_std)
    for p in range(5):
        group = rewards_B[p * G : (p + 1) * G].tolist()
        mean = sum(group) / G
        std = statistics.stdev(group)
        for i, r in enumerate(group):
            want = (r - mean) / (std + 1e-6) if normalize_std else r - mean
            assert float(adv_B[p * G + i]) == pytest.approx(want, abs=1e-9)
    assert torch.all(adv_B[:G] == 0)
    estimator = AdvantageEstimator.GRPO if normalize_std else AdvantageEstimator.GRPO_NO_STD
    assert torch.equal(compute_advantages_B(estimator, rewards_B, G), adv_B)


def test_advantages_reject_bad_group_size():
    with pytest.raises(ValueError, match="group_size"):
        grpo_advantages_B(torch.zeros(10), 4)


def _grad_of_split(logp, old, adv, mask, config, parts):
    """Gradient when the batch is cut into `parts` micro-batches (or DP ranks), each loss_sum
    divided by the global token count once, gradients accumulated."""
    leaf = logp.clone().requires_grad_(True)
    global_tokens = mask.sum()
    for idx in split_minibatches(len(logp), parts):
        loss_sum, _, _ = policy_loss(leaf[idx], old[idx], adv[idx], mask[idx], config)
        (loss_sum / global_tokens).backward()
    return leaf.grad


@pytest.mark.numerics
@pytest.mark.parametrize("parts", [2, 4, 8])
def test_token_level_normalisation_is_split_invariant(parts):
    logp, old, _, adv, mask = _random_batch(7, B=8, T=13)
    config = PolicyLossConfig(clip_low=0.2, clip_high=0.28)
    whole = _grad_of_split(logp, old, adv, mask, config, 1)
    split = _grad_of_split(logp, old, adv, mask, config, parts)
    torch.testing.assert_close(split, whole, rtol=1e-12, atol=1e-14)
    # A per-micro-batch mean (the bug token-level normalisation avoids) differs when lengths differ.
    leaf = logp.clone().requires_grad_(True)
    for idx in split_minibatches(len(logp), parts):
        loss_sum, n, _ = policy_loss(leaf[idx], old[idx], adv[idx], mask[idx], config)
        (loss_sum / n / parts).backward()
    assert not torch.allclose(leaf.grad, whole)


def test_on_policy_first_step_is_the_plain_policy_gradient():
    logp, _, _, adv, mask = _random_batch(3)
    leaf = logp.clone().requires_grad_(True)
    loss_sum, num_tokens, metrics = policy_loss(leaf, logp.clone(), adv, mask, PolicyLossConfig())
    (loss_sum / num_tokens).backward()
    out = reduce_loss_metrics([metrics])
    assert out["ratio_mean"] == 1.0 and out["ratio_max"] == 1.0 and out["ratio_min"] == 1.0
    assert out["clip_fraction"] == 0.0
    # d/dlogp of -A * exp(logp - old) at logp == old is -A, masked, over N tokens.
    want = -adv.unsqueeze(1) * mask / mask.sum()
    torch.testing.assert_close(leaf.grad, want, rtol=0, atol=1e-15)


@pytest.mark.parametrize(
    "adv, log_ratio, clip_low, clip_high, grad_is_zero, clipped",
    [
        (1.0, math.log(1.27), 0.2, 0.28, False, False),  # inside the high clip
        (1.0, math.log(1.29), 0.2, 0.28, True, True),  # past clip-higher with A > 0: flat
        (1.0, math.log(1.25), 0.2, 0.2, True, True),  # past the symmetric clip
        (1.0, math.log(0.5), 0.2, 0.28, False, False),  # A > 0, ratio low: unclipped (min picks it)
        (-1.0, math.log(0.79), 0.2, 0.28, True, True),  # A < 0 below 1 - clip_low: flat
        (-1.0, math.log(0.81), 0.2, 0.28, False, False),
        (-1.0, math.log(1.5), 0.2, 0.28, False, False),  # A < 0, ratio high: unclipped, pessimistic
    ],
)
def test_clip_boundaries(adv, log_ratio, clip_low, clip_high, grad_is_zero, clipped):
    logp = torch.tensor([[log_ratio - 1.0]], dtype=F64, requires_grad=True)
    old = torch.tensor([[-1.0]], dtype=F64)
    config = PolicyLossConfig(clip_low=clip_low, clip_high=clip_high)
    loss_sum, _, metrics = policy_loss(logp, old, torch.tensor([adv], dtype=F64), torch.ones(1, 1, dtype=F64), config)
    loss_sum.backward()
    assert (float(logp.grad) == 0.0) is grad_is_zero
    assert reduce_loss_metrics([metrics])["clip_fraction"] == float(clipped)
    if not grad_is_zero:
        assert float(logp.grad) == pytest.approx(-adv * math.exp(log_ratio))


def test_kl_k3_is_nonnegative_and_zero_at_equality():
    logp, _, ref, _, _ = _random_batch(1)
    assert torch.all(kl_k3_BT(logp, ref) >= 0)
    assert torch.all(kl_k3_BT(logp, logp) == 0)
    # With kl_coef = 0 the KL is logged but does not change the loss.
    adv = torch.ones(len(logp), dtype=F64)
    mask = torch.ones_like(logp)
    with_ref = policy_loss(logp, logp - 0.1, adv, mask, PolicyLossConfig(), ref_logp_BT=ref)
    without = policy_loss(logp, logp - 0.1, adv, mask, PolicyLossConfig())
    assert float(with_ref[0]) == float(without[0])
    assert reduce_loss_metrics([with_ref[2]])["kl_mean"] == pytest.approx(float(kl_k3_BT(logp, ref).mean()))
    with pytest.raises(ValueError, match="ref_logp_BT"):
        policy_loss(logp, logp, torch.zeros(len(logp)), torch.ones_like(logp), PolicyLossConfig(kl_coef=0.1))


@pytest.mark.numerics
def test_metrics_reduce_over_micro_batches_like_the_whole_batch():
    logp, old, ref, adv, mask = _random_batch(5)
    config = PolicyLossConfig(kl_coef=0.1)
    whole = reduce_loss_metrics([policy_loss(logp, old, adv, mask, config, ref)[2]])
    parts = [policy_loss(logp[i], old[i], adv[i], mask[i], config, ref[i])[2] for i in split_minibatches(8, 3)]
    split = reduce_loss_metrics(parts)
    assert split.keys() == whole.keys()
    for key in whole:
        assert split[key] == pytest.approx(whole[key], rel=1e-12)


def test_zero_variance_filter():
    rewards_B = torch.tensor([1, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0.5, 0.5, 0.5, 0.7])
    assert nonzero_variance_groups_P(rewards_B, 4).tolist() == [False, True, False, True]
    keep_B = zero_variance_filter_B(rewards_B, 4)
    assert keep_B.tolist() == [False] * 4 + [True] * 4 + [False] * 4 + [True] * 4
    # Kept groups are exactly those whose GRPO advantages are not all zero.
    adv_P_G = grpo_advantages_B(rewards_B, 4).view(4, 4)
    assert keep_B.view(4, 4)[:, 0].tolist() == (adv_P_G.abs().sum(1) > 0).tolist()


def test_overlong_mask():
    mask_BT = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.float64)
    truncated_B = torch.tensor([False, True, False])
    filtered = overlong_filter_mask_BT(mask_BT, truncated_B, enabled=True)
    assert filtered.tolist() == [[1, 1, 0], [0, 0, 0], [1, 0, 0]]
    assert torch.equal(overlong_filter_mask_BT(mask_BT, truncated_B, enabled=False), mask_BT)
    # The truncated rollout no longer contributes to the loss or to the token count.
    logp = torch.randn(3, 3)
    loss_sum, n, _ = policy_loss(logp, logp - 0.1, torch.tensor([1.0, 5.0, -1.0]), filtered)
    loss_kept, n_kept, _ = policy_loss(logp[[0, 2]], logp[[0, 2]] - 0.1, torch.tensor([1.0, -1.0]), mask_BT[[0, 2]])
    assert int(n) == int(n_kept) == 3 and float(loss_sum) == pytest.approx(float(loss_kept))
    with pytest.raises(ValueError, match="truncated_B"):
        overlong_filter_mask_BT(mask_BT, torch.tensor([True]), enabled=True)


def test_split_minibatches():
    parts = split_minibatches(10, 3)
    assert [p.tolist() for p in parts] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert [p.tolist() for p in split_minibatches(4)] == [[0, 1, 2, 3]]
    with pytest.raises(ValueError, match="num_minibatches"):
        split_minibatches(4, 5)


def test_entropy_matches_definition_and_temperature():
    g = torch.Generator().manual_seed(0)
    logits_BTV = torch.randn(2, 3, 17, generator=g, dtype=F64) * 3
    for temperature in (0.6, 1.0, 1.3):
        ent_BT = token_entropy_BT(logits_BTV, temperature=temperature)
        for b in range(2):
            for t in range(3):
                probs = torch.softmax(logits_BTV[b, t] / temperature, dim=-1).tolist()
                want = -sum(p * math.log(p) for p in probs if p > 0)
                assert float(ent_BT[b, t]) == pytest.approx(want, rel=1e-10)
    # Lower temperature, sharper distribution, lower entropy.
    assert torch.all(token_entropy_BT(logits_BTV, temperature=0.5) < token_entropy_BT(logits_BTV, temperature=1.0))
    masked = logits_BTV.clone()
    masked[..., -3:] = float("-inf")  # vocabulary padding
    assert torch.isfinite(token_entropy_BT(masked)).all()
    mask_BT = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.float64)
    metrics = entropy_metrics(logits_BTV, mask_BT, temperatures=(1.0, 0.6))
    assert float(metrics["num_tokens"]) == 3
    want = float((token_entropy_BT(logits_BTV, temperature=0.6) * mask_BT).sum())
    assert float(metrics["entropy_sum@0.6"]) == pytest.approx(want)


def test_token_logprobs_match_log_softmax():
    g = torch.Generator().manual_seed(0)
    logits_BTV = torch.randn(2, 4, 9, generator=g, dtype=F64)
    tokens_BT = torch.randint(0, 9, (2, 4), generator=g)
    got = token_logprobs_BT(logits_BTV, tokens_BT, temperature=0.7)
    for b in range(2):
        for t in range(4):
            z = (logits_BTV[b, t] / 0.7).tolist()
            lse = math.log(sum(math.exp(v) for v in z))
            assert float(got[b, t]) == pytest.approx(z[tokens_BT[b, t]] - lse, rel=1e-10)


@pytest.mark.parametrize("kwargs, field", [
    (dict(clip_low=1.0), "clip_low"), (dict(clip_high=-0.1), "clip_high"), (dict(kl_coef=-1.0), "kl_coef"),
])
def test_loss_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        PolicyLossConfig(**kwargs)


@pytest.mark.numerics
def test_mismatch_sums_reduce_to_the_direct_metrics():
    """Mismatch metrics from sums combined over chunks (micro-batches, ranks) equal the direct
    computation over all tokens at once (`logprob_parity_metrics`)."""
    from megatron_ace.algorithms.mismatch import mismatch_metrics, mismatch_sums
    from megatron_ace.rollout.weight_sync import logprob_parity_metrics
    from megatron_ace.train.step import accumulate_sums

    g = torch.Generator().manual_seed(0)
    trainer = -torch.rand(500, generator=g) * 4
    engine = trainer + torch.randn(500, generator=g) * 0.1
    mask = (torch.rand(500, generator=g) > 0.3).float()
    want = logprob_parity_metrics(trainer[mask > 0], engine[mask > 0], clip_eps=0.2,
                                  prefix="mismatch/")
    total: dict = {}
    for chunk in torch.arange(500).tensor_split(7):
        accumulate_sums(total, mismatch_sums(trainer[chunk], engine[chunk], mask[chunk],
                                             clip_eps=0.2))
    got = mismatch_metrics({k: float(v) for k, v in total.items()})
    assert got.keys() == want.keys()
    for key in want:  # float64 sums of 350 terms: agreement to ~1e-12 relative
        assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key
    assert mismatch_metrics(mismatch_sums(trainer, engine, torch.zeros(500), clip_eps=0.2)) == {}
