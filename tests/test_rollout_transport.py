"""Pure CPU checks of the rollout records, bucketing, transports and parity metrics (no vLLM)."""

from __future__ import annotations

import math
import os

import pytest
import torch

from megatron_ace.rollout import transport as T
from megatron_ace.rollout.types import Sample, SampleStatus, SamplingConfig, request_seed
from megatron_ace.rollout.weight_sync import WeightSyncConfig, iter_buckets, logprob_parity_metrics


def _weights(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [
        ("a.weight", torch.randn(7, 5, generator=gen)),
        ("b.bias", torch.randn(3, generator=gen).to(torch.bfloat16)),
        ("c.weight", torch.randn(64, 64, generator=gen)),
        ("d.scalar", torch.tensor(2.5)),
        ("e.weight", torch.randn(4, 6, generator=gen).t()),  # non-contiguous
        ("f.empty", torch.empty(0, 3)),
    ]


# ---- records ------------------------------------------------------------------------------


def test_sampling_config_validation_names_the_field():
    for kwargs, field in [
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=4, n=0), "n"),
        (dict(max_tokens=4, temperature=-0.1), "temperature"),
        (dict(max_tokens=4, temperature=float("nan")), "temperature"),
        (dict(max_tokens=4, top_p=0.0), "top_p"),
        (dict(max_tokens=4, seed=-1), "seed"),
        (dict(max_tokens=4, stop_token_ids=(3, -2)), "stop_token_ids"),
    ]:
        with pytest.raises(ValueError, match=f"SamplingConfig.{field}"):
            SamplingConfig(**kwargs)
    with pytest.raises(TypeError):
        SamplingConfig(4)  # keyword-only


def test_sample_checks_logprob_length():
    with pytest.raises(ValueError, match="Sample.logprobs"):
        Sample(prompt_index=0, sample_index=0, prompt_token_ids=[1], response_token_ids=[2, 3],
               response_text="", logprobs=[-1.0], status=SampleStatus.COMPLETED, finish_reason="stop")


def test_request_seeds_are_distinct_and_stable():
    seeds = {request_seed(0, it, i) for it in range(20) for i in range(500)}
    assert len(seeds) == 20 * 500
    assert request_seed(7, 3, 2) == request_seed(7, 3, 2) != request_seed(8, 3, 2)
    # vLLM gives the n samples of a request seeds s, s+1, ...: no overlap between requests.
    ranges = sorted(seeds)
    assert min(b - a for a, b in zip(ranges, ranges[1:])) > 1024
    assert max(seeds) < 2**62


# ---- bucketing ----------------------------------------------------------------------------


def test_iter_buckets_respects_the_bound_and_keeps_order():
    named = [(f"t{i}", torch.zeros(n)) for i, n in enumerate([10, 30, 5, 100, 1, 1, 60])]
    buckets = list(iter_buckets(iter(named), bucket_bytes=40 * 4))
    assert [n for b in buckets for n, _ in b] == [n for n, _ in named]
    for b in buckets:
        size = sum(t.numel() * 4 for _, t in b)
        assert size <= 160 or len(b) == 1  # an oversize tensor travels alone
    # Greedy, in order: 10+30 | 5 | 100 (alone, oversize) | 1+1 | 60 (alone, oversize).
    assert [len(b) for b in buckets] == [2, 1, 1, 2, 1]


def test_iter_buckets_is_lazy_and_rejects_non_tensors():
    def gen():
        yield "x", torch.zeros(100)
        yield "y", torch.zeros(100)
        raise AssertionError("read past the second bucket")

    it = iter_buckets(gen(), bucket_bytes=400)
    assert [n for n, _ in next(it)] == ["x"]
    with pytest.raises(TypeError, match="weight #0"):
        list(iter_buckets([("x", [1.0])], bucket_bytes=10))
    with pytest.raises(ValueError, match="WeightSyncConfig.bucket_bytes"):
        WeightSyncConfig(bucket_bytes=0)


# ---- transports ---------------------------------------------------------------------------


def _round_trip(kind: T.TransportKind, **options):
    sender = T.make_sender(kind, **options)
    receiver = T.make_receiver(kind)
    bucket = _weights()
    descriptor = sender.pack(bucket)
    got = receiver.unpack(descriptor)
    sender.release(descriptor)
    return bucket, descriptor, dict(got)


@pytest.mark.parametrize("kind", [T.TransportKind.BYTES, T.TransportKind.SHARED_MEMORY])
def test_cpu_transports_round_trip_exactly(kind, tmp_path):
    options = {"options": T.SharedMemoryOptions(directory=str(tmp_path))} if kind is T.TransportKind.SHARED_MEMORY else {}
    bucket, descriptor, got = _round_trip(kind, **options)
    assert set(got) == {n for n, _ in bucket}
    for name, t in bucket:
        assert got[name].dtype == t.dtype and got[name].shape == t.shape
        assert torch.equal(got[name], t)
    # Only msgpack-friendly values in the descriptor (tensors get mangled by vLLM's RPC layer).
    stack = [descriptor]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
        else:
            assert isinstance(v, (str, int, float, bytes)), type(v)
    if kind is T.TransportKind.SHARED_MEMORY:
        assert os.listdir(tmp_path) == []  # released, yet the received views stay readable
        assert torch.equal(got["c.weight"], bucket[2][1])


def test_layout_is_aligned_for_every_dtype():
    entries, total = T.plan_layout(_weights())
    assert all(e.offset % 64 == 0 for e in entries)
    assert total >= sum(e.nbytes for e in entries)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
@pytest.mark.parametrize("kind", [T.TransportKind.CUDA_IPC, T.TransportKind.NCCL])
def test_gpu_transports_fail_clearly_without_cuda(kind):
    with pytest.raises(T.TransportUnavailableError, match=f"{kind.value}.*needs CUDA"):
        if kind is T.TransportKind.NCCL:
            T.make_sender(kind, options=T.NcclOptions(host="127.0.0.1", port=29999, num_receivers=1))
        else:
            T.make_sender(kind)
    with pytest.raises(T.TransportUnavailableError, match="needs CUDA"):
        receiver = T.make_receiver(kind)
        if kind is T.TransportKind.NCCL:
            receiver.connect({"host": "127.0.0.1", "port": 29999, "world_size": 2}, worker_rank=0)
        else:
            receiver.unpack({"kind": kind.value, "handles": {}, "entries": []})


def test_bad_descriptor_kind_is_named():
    with pytest.raises(ValueError, match="'carrier-pigeon'"):
        T.descriptor_kind({"kind": "carrier-pigeon"})


# ---- parity metrics -----------------------------------------------------------------------


def test_parity_metrics_against_direct_formulas():
    gen = torch.Generator().manual_seed(0)
    rollout = -torch.rand(1000, generator=gen) * 5
    trainer = rollout + torch.randn(1000, generator=gen) * 0.1
    m = logprob_parity_metrics(trainer, rollout, clip_eps=0.2)
    d = (trainer - rollout).double()
    r = d.exp()
    assert m["parity/logp_abs_diff_max"] == pytest.approx(d.abs().max().item())
    assert m["parity/logp_abs_diff_mean"] == pytest.approx(d.abs().mean().item())
    assert m["parity/ratio_mean"] == pytest.approx(r.mean().item())
    assert m["parity/ratio_clipped_frac"] == pytest.approx(((r < 0.8) | (r > 1.2)).double().mean().item())
    # k3 is an estimate of KL(rollout || trainer) under samples from the rollout policy: it is
    # >= 0 and about half the squared log-ratio for small differences.
    assert 0 < m["parity/kl_k3"] == pytest.approx((d**2).mean().item() / 2, rel=0.1)
    assert m["parity/num_tokens"] == 1000


def test_parity_metrics_identical_inputs_and_shape_errors():
    x = -torch.rand(50)
    m = logprob_parity_metrics(x, x.clone())
    assert m["parity/logp_abs_diff_max"] == 0.0 and m["parity/ratio_std"] == 0.0
    assert math.isclose(m["parity/ratio_mean"], 1.0)
    with pytest.raises(ValueError, match="equal length"):
        logprob_parity_metrics(x, x[:-1])
    with pytest.raises(ValueError, match="no tokens"):
        logprob_parity_metrics(x[:0], x[:0])
