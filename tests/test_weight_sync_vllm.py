"""Weight sync into the real vLLM engine: after streaming new weights through `WeightSyncer`,
the engine's logprobs must match HF transformers with the new weights (and not the old ones).

One engine for the module; the tests run in order and the failure tests come last, because a
failed update leaves the engine unusable by design. A second engine checks the other failure.
"""

from __future__ import annotations

import os
import random

import pytest
import torch
from test_rollout_engine import hf_token_logprobs
from test_rollout_tiny_model import make_tiny_qwen2_dir
from tolerances import LOGPROB_ATOL

from megatron_ace.rollout.engine import (
    EngineBrokenError,
    RolloutEngineConfig,
    StaleWeightVersionError,
    VllmRolloutEngine,
    WeightSyncFatalError,
)
from megatron_ace.rollout.transport import TransportKind
from megatron_ace.rollout.types import SamplingConfig
from megatron_ace.rollout.weight_sync import WeightSyncConfig, WeightSyncer, logprob_parity_metrics

pytestmark = pytest.mark.vllm

PROMPTS = [[5, 6, 7, 8], [100, 200, 300], [42, 43, 44, 45, 46, 47]]
SEQS = [p + [17, 18, 19, 20, 21] for p in PROMPTS]
SMALL_BUCKET = 64 * 1024  # << the 0.5 MB embedding: dozens of buckets, layers split across them


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_qwen2_dir(tmp_path_factory.mktemp("tiny_qwen2_sync"))


@pytest.fixture(scope="module")
def engine(model_dir):
    eng = VllmRolloutEngine(RolloutEngineConfig(model_path=str(model_dir), max_model_len=256))
    yield eng
    eng.close()


def load_hf(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def perturbed(model, seed: int, scale: float = 0.05):
    """The same model with every parameter moved by relative noise (a stand-in for an update)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * p.abs().mean())
    return model


def named_weights(model, *, shuffle_seed: int | None = None):
    """(hf_name, tensor) pairs, lazily; optionally in a shuffled order so that buckets cut
    layers at arbitrary points."""
    names = [n for n, _ in model.named_parameters()]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(names)
    params = dict(model.named_parameters())
    return ((n, params[n].detach().clone()) for n in names)


def max_seq_diff(engine, model) -> float:
    got = engine.sequence_logprobs(SEQS)
    return max(
        (torch.tensor(lp) - hf_token_logprobs(model, seq[:1], seq[1:], 1.0)).abs().max().item()
        for seq, lp in zip(SEQS, got)
    )


@pytest.mark.numerics
def test_sync_streams_new_weights_in_many_buckets(engine, model_dir):
    old = load_hf(model_dir)
    assert max_seq_diff(engine, old) < LOGPROB_ATOL
    new = perturbed(load_hf(model_dir), seed=1)
    syncer = WeightSyncer(engine, WeightSyncConfig(bucket_bytes=SMALL_BUCKET))
    metrics = syncer.sync(named_weights(new))

    sizes = [p.numel() * p.element_size() for p in new.parameters()]
    assert metrics.version == 1 and engine.weight_version == 1
    assert metrics.num_tensors == len(sizes) and metrics.num_bytes == sum(sizes)
    assert metrics.num_buckets >= 10
    assert metrics.peak_bucket_bytes <= max(SMALL_BUCKET, max(sizes))
    assert metrics.gb_per_s > 0 and set(metrics.to_dict()) >= {"weight_sync/gb_per_s", "weight_sync/num_buckets"}

    assert max_seq_diff(engine, new) < LOGPROB_ATOL
    assert max_seq_diff(engine, old) > 1e-2


@pytest.mark.numerics
def test_sampled_logprobs_follow_the_new_weights_and_parity_metrics(engine, model_dir):
    new = perturbed(load_hf(model_dir), seed=1)  # what version 1 holds
    temperature = 0.8
    groups = engine.generate(PROMPTS, SamplingConfig(n=2, temperature=temperature, max_tokens=12, seed=5))
    trainer, rollout = [], []
    for prompt, group in zip(PROMPTS, groups):
        for s in group:
            assert s.weight_version == 1
            trainer.append(hf_token_logprobs(new, prompt, s.response_token_ids, temperature))
            rollout.append(torch.tensor(s.logprobs))
    m = logprob_parity_metrics(torch.cat(trainer), torch.cat(rollout))
    assert m["parity/logp_abs_diff_max"] < LOGPROB_ATOL
    assert abs(m["parity/ratio_mean"] - 1.0) < LOGPROB_ATOL and m["parity/ratio_clipped_frac"] == 0.0
    # The same check catches a trainer that lags the engine by one version.
    old = load_hf(model_dir)
    stale = torch.cat([hf_token_logprobs(old, p, s.response_token_ids, temperature)
                       for p, g in zip(PROMPTS, groups) for s in g])
    assert logprob_parity_metrics(stale, torch.cat(rollout))["parity/logp_abs_diff_max"] > 1e-2


@pytest.mark.numerics
def test_shared_memory_transport_with_shuffled_order(engine, model_dir, tmp_path):
    new = perturbed(load_hf(model_dir), seed=2)
    config = WeightSyncConfig(bucket_bytes=SMALL_BUCKET, transport=TransportKind.SHARED_MEMORY,
                              shm_dir=str(tmp_path))
    metrics = WeightSyncer(engine, config).sync(named_weights(new, shuffle_seed=0), version=5)
    assert metrics.version == 5 and engine.weight_version == 5
    assert max_seq_diff(engine, new) < LOGPROB_ATOL
    assert os.listdir(tmp_path) == []  # every bucket file was released


@pytest.mark.numerics
def test_stale_or_duplicate_version_is_refused_without_harm(engine, model_dir):
    current = perturbed(load_hf(model_dir), seed=2)  # version 5
    syncer = WeightSyncer(engine, WeightSyncConfig())
    other = perturbed(load_hf(model_dir), seed=3)
    for version in (5, 4):
        with pytest.raises(StaleWeightVersionError, match=f"version {version} refused"):
            syncer.sync(named_weights(other), version=version)
    assert engine.weight_version == 5
    assert max_seq_diff(engine, current) < LOGPROB_ATOL


def test_missing_tensor_is_fatal(engine, model_dir):
    new = perturbed(load_hf(model_dir), seed=4)
    partial = ((n, t) for n, t in named_weights(new) if n != "model.layers.1.mlp.down_proj.weight")
    with pytest.raises(WeightSyncFatalError, match="missing 1 tensor.*down_proj"):
        WeightSyncer(engine, WeightSyncConfig()).sync(partial)
    with pytest.raises(EngineBrokenError):
        engine.generate(PROMPTS, SamplingConfig(max_tokens=2))
    with pytest.raises(EngineBrokenError):
        WeightSyncer(engine, WeightSyncConfig()).sync(named_weights(new))


@pytest.mark.parametrize("bad", [
    "wrong_shape",
    # Each case needs an engine of its own (~5-15 s); these two run with the slow tests.
    pytest.param("unknown_name", marks=pytest.mark.slow),
    pytest.param("not_a_tensor", marks=pytest.mark.slow),
])
def test_bad_tensor_is_fatal(model_dir, bad):
    eng = VllmRolloutEngine(RolloutEngineConfig(model_path=str(model_dir), max_model_len=256))
    try:
        new = perturbed(load_hf(model_dir), seed=4)

        def weights():
            for i, (name, t) in enumerate(named_weights(new)):
                if i == 5 and bad == "wrong_shape":
                    t = t[..., :-1]
                if i == 5 and bad == "unknown_name":
                    name = name.replace("layers.", "layerz.")
                if i == 5 and bad == "not_a_tensor":
                    t = t.tolist()  # fails on the trainer side, after earlier buckets went in
                yield name, t

        expected = {"wrong_shape": "shape", "unknown_name": "not in the engine's checkpoint",
                    "not_a_tensor": "trainer side.*expected \\(str, torch.Tensor\\)"}[bad]
        with pytest.raises(WeightSyncFatalError, match=expected):
            WeightSyncer(eng, WeightSyncConfig(bucket_bytes=SMALL_BUCKET)).sync(weights())
        with pytest.raises(EngineBrokenError):
            eng.sequence_logprobs(SEQS)
    finally:
        eng.close()


@pytest.mark.slow
def test_sync_into_a_multiprocess_engine(model_dir, tmp_path):
    """Descriptors cross vLLM's msgpack RPC to a separate engine-core process intact."""
    eng = VllmRolloutEngine(RolloutEngineConfig(model_path=str(model_dir), max_model_len=256, in_process=False))
    try:
        for version, kind in ((1, TransportKind.BYTES), (2, TransportKind.SHARED_MEMORY)):
            new = perturbed(load_hf(model_dir), seed=10 + version)
            config = WeightSyncConfig(bucket_bytes=SMALL_BUCKET, transport=kind, shm_dir=str(tmp_path))
            WeightSyncer(eng, config).sync(named_weights(new, shuffle_seed=version))
            assert eng.weight_version == version
            assert max_seq_diff(eng, new) < LOGPROB_ATOL
        with pytest.raises(StaleWeightVersionError):
            WeightSyncer(eng, WeightSyncConfig()).sync(named_weights(new), version=2)
    finally:
        eng.close()
