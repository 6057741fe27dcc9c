"""GRPO micro-batch layouts (pure) and the SDPA core attention on packed rows.

- Planning: longest-first balance over DP ranks (within one sequence of the ideal), budget
  bins (never over budget except a lone long sequence), every sequence exactly once, equal
  micro-batch counts per rank.
- Building: a packed row holds, segment by segment, exactly what the padded layout holds for
  each sequence (tokens, labels, masks, advantages, engine logprobs), with cu_seqlens at the
  boundaries and a dense block-diagonal mask where asked.
- Attention: Megatron-Core with the SDPA core attention on one packed THD row gives, per
  sequence, the logprobs HF transformers gives for that sequence alone.
"""

import math

import pytest
import torch

from megatron_ace.data.packing import AttentionFormat, BatchMode, block_causal_mask
from megatron_ace.train import grpo_batch as gb


def _rollouts(lengths, *, seed=0, vocab=50):
    g = torch.Generator().manual_seed(seed)
    prompts, responses, logps = [], [], []
    for p_len, r_len in lengths:
        prompts.append(torch.randint(1, vocab, (p_len,), generator=g).tolist())
        responses.append(torch.randint(1, vocab, (r_len,), generator=g).tolist())
        lp = (-torch.rand(r_len, generator=g)).tolist()
        if r_len > 2:
            lp[1] = math.nan  # the engine gave no logprob for this token
        logps.append(lp)
    n = len(lengths)
    return gb.Rollouts(prompts=prompts, responses=responses,
                       adv_B=torch.linspace(-1, 1, n), loss_on_B=torch.arange(n) % 3 != 2,
                       engine_logp=logps)


def test_balance_longest_first_is_within_one_sequence_of_ideal():
    g = torch.Generator().manual_seed(3)
    sizes = torch.empty(301).log_normal_(5.0, 0.9, generator=g).long().add(1).tolist()
    for ranks in (1, 2, 3, 8):
        shares = gb.balance_longest_first(range(len(sizes)), sizes, ranks)
        assert sorted(i for s in shares for i in s) == list(range(len(sizes)))
        loads = [sum(sizes[i] for i in s) for s in shares]
        assert max(loads) - min(loads) <= max(sizes), (ranks, loads)
    with pytest.raises(ValueError, match="num_ranks"):
        gb.balance_longest_first([0], [1], 0)


def test_budget_bins_respect_the_budget_and_isolate_long_sequences():
    sizes = [5, 90, 40, 300, 33, 60, 7, 100, 1]
    bins = gb.budget_bins(range(len(sizes)), sizes, 100)
    assert sorted(i for b in bins for i in b) == list(range(len(sizes)))
    for b in bins:
        assert sum(sizes[i] for i in b) <= 100 or len(b) == 1
    assert [3] in bins  # longer than the budget: alone


@pytest.mark.parametrize("mode", [BatchMode.PACKED, BatchMode.PADDED])
def test_plan_gives_every_rank_the_same_number_of_micro_batches(mode):
    r = _rollouts([(3, n) for n in (50, 1, 2, 3, 4, 60, 5)])
    layout = gb.LayoutConfig(mode=mode, max_tokens=64, micro_batch_size=2)
    plan = gb.plan_micro_batches(r, range(len(r)), dp_size=3, layout=layout)
    assert len({len(rank) for rank in plan}) == 1
    assert sorted(i for rank in plan for mb in rank for i in mb) == list(range(len(r)))
    empty = gb.plan_micro_batches(r, [], dp_size=2, layout=layout)
    assert empty == [[[]], [[]]]  # nothing to train: one padding-only micro-batch per rank


@pytest.mark.parametrize("attention", [AttentionFormat.THD, AttentionFormat.DENSE_MASK])
def test_packed_row_holds_what_the_padded_rows_hold(attention):
    r = _rollouts([(4, 6), (2, 1), (7, 9), (3, 3)])
    rows = [0, 1, 2, 3]
    packed = gb.build_packed(r, rows, length=40, pad_id=0, attention=attention)
    padded = gb.build_padded(r, rows, width=16, num_rows=5, pad_id=0)
    cu = packed["cu_seqlens"].tolist()
    assert cu == [0, 9, 11, 26, 31, 40]  # four sequences, then the padding segment
    for k, i in enumerate(rows):
        a, b = cu[k], cu[k + 1]
        n = b - a
        assert n == r.num_positions(i)
        for key in ("tokens", "labels", "response_mask", "loss_mask", "adv", "engine_logp",
                    "parity_mask"):
            assert torch.equal(packed[key][0, a:b], padded[key][k, :n]), key
            assert padded[key][k, n:].abs().sum() == 0 or key in ("tokens", "labels")
        assert packed["position_ids"][0, a:b].tolist() == list(range(n))
        assert packed["response_mask"][0, a:b].sum() == len(r.responses[i])
    assert packed["loss_mask"][0, cu[-2]:].sum() == 0 and padded["loss_mask"][4].sum() == 0
    num_nan = sum(math.isnan(v) for lp in r.engine_logp for v in lp)
    assert num_nan == 3 and packed["parity_mask"].sum() == sum(map(len, r.responses)) - num_nan
    if attention is AttentionFormat.THD:
        assert packed["attention_mask"] is None
    else:
        segments = torch.repeat_interleave(torch.arange(5), torch.diff(torch.tensor(cu)))
        assert torch.equal(packed["attention_mask"], block_causal_mask(segments[None]))


def test_uniform_length_fills_rows_up_to_the_longest_sequence():
    r = _rollouts([(3, 120), (3, 30), (3, 30), (3, 30)])
    layout = gb.LayoutConfig(mode=BatchMode.PACKED, max_tokens=64, uniform_length=True)
    plan = gb.plan_micro_batches(r, range(4), dp_size=1, layout=layout)
    mbs = gb.build_micro_batches(r, plan, 0, layout)
    assert len({tuple(mb["tokens"].shape) for mb in mbs}) == 1
    assert len(mbs) == 2  # the three short ones share a row as long as the long one
    assert gb.planned_positions(r, plan, layout) == sum(mb["tokens"].numel() for mb in mbs)


def test_rollouts_reject_inconsistent_input():
    with pytest.raises(ValueError, match="engine_logp\\[0\\]"):
        gb.Rollouts(prompts=[[1]], responses=[[2, 3]], adv_B=torch.zeros(1),
                    loss_on_B=torch.ones(1, dtype=torch.bool), engine_logp=[[0.0]])
    with pytest.raises(ValueError, match="adv_B"):
        gb.Rollouts(prompts=[[1]], responses=[[2]], adv_B=torch.zeros(2),
                    loss_on_B=torch.ones(1, dtype=torch.bool), engine_logp=[[0.0]])
    with pytest.raises(ValueError, match="prompts\\[0\\] is empty"):
        gb.Rollouts(prompts=[[]], responses=[[2]], adv_B=torch.zeros(1),
                    loss_on_B=torch.ones(1, dtype=torch.bool), engine_logp=[[0.0]])


@pytest.fixture(scope="module")
def ps():
    from megatron_ace.model.parallel import ParallelConfig, destroy_parallel, init_parallel

    state = init_parallel(ParallelConfig(), seed=3)
    yield state
    destroy_parallel()


@pytest.mark.numerics
def test_sdpa_thd_packed_row_matches_hf_per_sequence(ps):
    from transformers import Qwen2Config as HFConfig
    from transformers import Qwen2ForCausalLM

    from megatron_ace.model.attention import CoreAttention
    from megatron_ace.model.builder import build_model
    from megatron_ace.model.config import preset
    from megatron_ace.model.forward import model_inputs, token_logprobs_from_logits
    from megatron_ace.model.weights import load_hf_into_model

    cfg = preset("tiny", max_position_embeddings=512)
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(HFConfig(**cfg.to_hf_config(), attn_implementation="eager")).eval()
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.05 if p.dim() > 1 else 0.3)
    sd = hf.state_dict()
    # Three sequences of 43-44 positions share one SDPA call (a length bucket); the others run
    # alone (the row's padding segment too).
    shapes = [(5, 40), (3, 2), (9, 70), (4, 17), (6, 38), (2, 43)]
    r = _rollouts(shapes, vocab=cfg.vocab_size)
    r.engine_logp = [[0.0] * len(x) for x in r.responses]
    for core in (CoreAttention.SDPA, CoreAttention.UNFUSED):
        model = build_model(cfg, ps, core_attention=core).eval()
        load_hf_into_model(model, lambda n: sd[n], cfg, ps)
        attention = AttentionFormat.THD if core is CoreAttention.SDPA else \
            AttentionFormat.DENSE_MASK
        batch = gb.build_packed(r, range(len(shapes)), length=240, pad_id=0, attention=attention)
        with torch.no_grad():
            logits = model(*model_inputs(batch, torch.device("cpu"))[:3],
                           packed_seq_params=model_inputs(batch, torch.device("cpu"))[3])
            logp = token_logprobs_from_logits(logits, batch["labels"], ps, cfg.vocab_size)[0]
        cu = batch["cu_seqlens"].tolist()
        if core is CoreAttention.SDPA:
            from megatron_ace.model.attention import thd_buckets

            calls = thd_buckets(tuple(cu))
            assert sorted(c[0].shape[0] for c in calls if not isinstance(c[0], int)) == [3]
        for k in range(len(shapes)):
            ids = torch.tensor([r.prompts[k] + r.responses[k]])
            with torch.no_grad():
                ref = hf(ids).logits.float().log_softmax(-1)[0, :-1]
            ref = ref.gather(-1, ids[0, 1:, None])[:, 0]
            # float32 forward of a 2-layer model through other kernels: ~1e-6 apart; attention
            # reaching into another sequence would move these by ~1e-1.
            torch.testing.assert_close(logp[cu[k]:cu[k + 1]], ref, rtol=0, atol=2e-5)


def test_sampled_entropy_sums_estimate_the_entropy_and_fall_back_on_missing_logprobs():
    """`grpo.filtered_entropy=sampled`: tokens drawn from softmax(logits / T) (torch's sampler);
    the mean -log p of the drawn tokens estimates the exact entropy of those distributions."""
    from megatron_ace.train.grpo_update import sampled_entropy_sums

    g = torch.Generator().manual_seed(0)
    temperature, rows, length, vocab = 0.8, 64, 200, 50
    logits_RLV = torch.randn(rows, length, vocab, generator=g) * 2
    logp_RLV = torch.log_softmax(logits_RLV / temperature, -1)
    drawn_RL = torch.multinomial(logp_RLV.exp().view(-1, vocab), 1, generator=g).view(rows, length)
    logp_RL = logp_RLV.gather(-1, drawn_RL[..., None])[..., 0]
    exact = -(logp_RLV.exp() * logp_RLV).sum(-1).mean().item()
    rollouts = gb.Rollouts(prompts=[[1]] * rows, responses=drawn_RL.tolist(),
                           adv_B=torch.zeros(rows), loss_on_B=torch.ones(rows, dtype=torch.bool),
                           engine_logp=logp_RL.tolist())
    sums = sampled_entropy_sums(rollouts, list(range(rows)))
    assert sums["rollout_tokens"] == rows * length
    estimate = sums["rollout_entropy_sum"] / sums["rollout_tokens"]
    spread = (-logp_RL).std().item() / (rows * length) ** 0.5  # standard error of the mean
    assert abs(estimate - exact) < 4 * spread, (estimate, exact, spread)
    rollouts.engine_logp[3][5] = float("nan")  # a logprob the engine did not return
    assert sampled_entropy_sums(rollouts, list(range(rows))) is None
    assert sampled_entropy_sums(rollouts, [0, 1, 2]) is not None


def test_sampled_filtered_entropy_needs_untruncated_sampling():
    import dataclasses

    from megatron_ace.train.grpo_config import AlgoConfig, FilteredEntropy, RolloutConfig, grpo_tiny

    sampled = AlgoConfig(measure_filtered_rollouts=True, filtered_entropy=FilteredEntropy.SAMPLED)
    dataclasses.replace(grpo_tiny(), grpo=sampled)  # top_p = 1: fine
    with pytest.raises(ValueError, match="grpo.filtered_entropy=sampled.*rollout.top_p=0.9"):
        dataclasses.replace(grpo_tiny(), grpo=sampled, rollout=RolloutConfig(top_p=0.9))
