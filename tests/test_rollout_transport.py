"""Pure CPU checks of the rollout records, bucketing, transports and parity metrics (no vLLM)."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from dist_utils import REPO

from megatron_ace.rollout import shm_transport as S
from megatron_ace.rollout import transport as T
from megatron_ace.rollout.engine import Placement
from megatron_ace.rollout.types import Sample, SampleStatus, SamplingConfig, request_seed
from megatron_ace.rollout.weight_sync import (
    TransportChoice,
    WeightSyncConfig,
    iter_buckets,
    logprob_parity_metrics,
    module_grouper,
    resolve_transport,
)


def _weights(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [
        ("a.weight", torch.randn(7, 5, generator=gen)),
        ("b.bias", torch.randn(3, generator=gen).to(torch.bfloat16)),
        ("c.weight", torch.randn(64, 64, generator=gen)),
        ("d.scalar", torch.tensor(2.5)),
        ("e.weight", torch.randn(4, 6, generator=gen).t()),  # non-contiguous
        ("f.empty", torch.empty(0, 3)),
        ("g.param", torch.nn.Parameter(torch.randn(3, 4, generator=gen))),  # needs grad
        ("h.strided", torch.randn(6, 8, generator=gen)[::2, 1::3]),  # a strided view
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


def test_iter_buckets_keeps_module_groups_whole():
    group_of = module_grouper({"qkv_proj": ["q_proj", "k_proj", "v_proj"]})
    names = ["m.norm.weight", "m.a.q_proj.weight", "m.a.q_proj.bias", "m.a.k_proj.weight",
             "m.a.v_proj.weight", "m.a.o_proj.weight", "m.b.q_proj.weight", "m.b.k_proj.weight",
             "m.b.v_proj.weight", "m.out.weight"]
    named = [(n, torch.zeros(10)) for n in names]  # 40 bytes each
    buckets = list(iter_buckets(iter(named), bucket_bytes=120, group_of=group_of))
    assert [n for b in buckets for n, _ in b] == names
    assert [[n for n, _ in b] for b in buckets] == [
        ["m.norm.weight"],  # the four q/k/v tensors of m.a would not fit after it: moved on whole
        names[1:5],  # 160 bytes: a group larger than the bound travels alone
        names[5:6], names[6:9], names[9:],
    ]
    # Without groups the same stream is cut wherever the bound falls.
    assert [len(b) for b in iter_buckets(iter(named), bucket_bytes=120)] == [3, 3, 3, 1]


def test_iter_buckets_counts_only_what_is_copied():
    named = [(f"t{i}", torch.zeros(10)) for i in range(6)]  # 40 bytes each
    in_place = {"t0", "t1", "t3", "t4"}  # read where they lie: nothing in flight
    ids = {id(t): n for n, t in named}

    def size_of(t):
        return 0 if ids[id(t)] in in_place else 40

    buckets = list(iter_buckets(iter(named), bucket_bytes=40, size_of=size_of))
    assert [[n for n, _ in b] for b in buckets] == [["t0", "t1", "t2", "t3", "t4"], ["t5"]]


def test_module_grouper_maps_packed_parts_to_their_module():
    group_of = module_grouper({"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                               "gate_up_proj": ["gate_proj", "up_proj"]})
    layer = "model.layers.3"
    qkv = {group_of(f"{layer}.self_attn.{p}_proj.{w}") for p in "qkv" for w in ("weight", "bias")}
    assert qkv == {f"{layer}.self_attn.qkv_proj"}
    assert group_of(f"{layer}.mlp.up_proj.weight") == group_of(f"{layer}.mlp.gate_proj.weight")
    assert group_of(f"{layer}.mlp.down_proj.weight") != group_of(f"{layer}.mlp.up_proj.weight")
    assert group_of("model.layers.4.self_attn.q_proj.weight") != f"{layer}.self_attn.qkv_proj"
    assert group_of("lm_head.weight") == "lm_head"


# ---- transport choice ---------------------------------------------------------------------


def test_resolve_transport():
    cpu, gpu = dict(cuda_available=False), dict(cuda_available=True)
    colocated, separate = Placement.COLOCATED, Placement.SEPARATE
    assert resolve_transport("auto", placement=colocated, **cpu) is T.TransportKind.SHARED_MEMORY
    assert resolve_transport("auto", placement=separate, **cpu) is T.TransportKind.SHARED_MEMORY
    assert resolve_transport(TransportChoice.AUTO, placement=colocated, **gpu) \
        is T.TransportKind.CUDA_IPC
    assert resolve_transport("auto", placement=separate, **gpu) is T.TransportKind.NCCL
    for kind in T.TransportKind:
        assert resolve_transport(kind.value, placement=separate, **gpu) is kind
    assert resolve_transport("bytes", placement=colocated, **cpu) is T.TransportKind.BYTES
    with pytest.raises(ValueError, match="rollout.x: 'cuda_ipc' needs CUDA"):
        resolve_transport("cuda_ipc", placement=colocated, field="rollout.x", **cpu)
    with pytest.raises(ValueError, match="--transport: 'pigeon' is not one of: auto, bytes"):
        resolve_transport("pigeon", placement=colocated, field="--transport", **cpu)
    with pytest.raises(TypeError, match="WeightSyncConfig.transport must be a TransportKind"):
        WeightSyncConfig(transport="bytes")
    assert WeightSyncConfig().transport is T.TransportKind.SHARED_MEMORY


def test_grpo_rollout_transport_setting():
    from megatron_ace.config.base import from_dict
    from megatron_ace.train.grpo_config import RolloutConfig

    assert RolloutConfig().weight_sync_transport is TransportChoice.AUTO
    assert from_dict(RolloutConfig, {"weight_sync_transport": "bytes"}).weight_sync_transport \
        is TransportChoice.BYTES
    with pytest.raises(ValueError, match="weight_sync_transport.*not one of"):
        from_dict(RolloutConfig, {"weight_sync_transport": "carrier-pigeon"}, where="rollout")
    with pytest.raises(ValueError, match="rollout.weight_sync_transport: 'nccl' needs an engine"):
        RolloutConfig(weight_sync_transport=TransportChoice.NCCL)
    with pytest.raises(TypeError, match="rollout.weight_sync_transport"):
        RolloutConfig(weight_sync_transport="bytes")


# ---- transports ---------------------------------------------------------------------------


def _round_trip(kind: T.TransportKind, **options):
    sender = T.make_sender(kind, **options)
    receiver = T.make_receiver(kind)
    bucket = _weights()
    descriptor = sender.pack(bucket)
    got = receiver.unpack(descriptor)
    sender.release(descriptor, retained=receiver.loaded(descriptor))
    sender.close()
    return bucket, descriptor, dict(got)


@pytest.mark.parametrize("kind", [T.TransportKind.BYTES, T.TransportKind.SHARED_MEMORY])
def test_cpu_transports_round_trip_exactly(kind, tmp_path):
    options = {"options": S.SharedMemoryOptions(directory=str(tmp_path))} if kind is T.TransportKind.SHARED_MEMORY else {}
    bucket, descriptor, got = _round_trip(kind, **options)
    assert set(got) == {n for n, _ in bucket}
    for name, t in bucket:
        assert got[name].dtype == t.dtype and got[name].shape == t.shape
        assert torch.equal(got[name], t)
    # Only msgpack-friendly values in the descriptor (tensors get mangled by vLLM's RPC layer).
    _assert_msgpack_safe(descriptor)
    if kind is T.TransportKind.SHARED_MEMORY:
        assert os.listdir(tmp_path) == []  # closed, yet the received views stay readable
        assert torch.equal(got["c.weight"], bucket[2][1])


def _shm(tmp_path, **options) -> S.SharedMemorySender:
    return S.SharedMemorySender(S.SharedMemoryOptions(directory=str(tmp_path), **options))


def _bucket(seed: int, numel: int = 1000):
    return [("w", torch.randn(numel, generator=torch.Generator().manual_seed(seed)))]


def test_shared_memory_reuses_a_file_unless_retained(tmp_path):
    sender, receiver = _shm(tmp_path), S.SharedMemoryReceiver()
    first = sender.pack(_bucket(0))
    assert torch.equal(receiver.unpack(first)[0][1], _bucket(0)[0][1])
    sender.release(first, retained=receiver.loaded(first))  # no view left: not retained
    second = sender.pack(_bucket(1))
    assert second["path"] == first["path"] and sender.files_created == 1  # rewritten in place
    views = receiver.unpack(second)  # through the mapping the receiver kept: the new bytes
    assert torch.equal(views[0][1], _bucket(1)[0][1])
    sender.release(second, retained=receiver.loaded(second))  # a view is alive: retained
    assert not os.path.exists(second["path"])  # retired: unlinked, never written again
    third = sender.pack(_bucket(2))
    assert third["path"] != second["path"] and sender.files_created == 2
    assert torch.equal(views[0][1], _bucket(1)[0][1])  # the retained view still holds its bytes
    sender.release(third)
    big = sender.pack(_bucket(3, numel=5000))  # larger than the kept file: a new one
    sender.release(big)
    assert os.listdir(tmp_path) == [os.path.basename(big["path"])]  # the largest file is kept
    assert sender.held_bytes == T.plan_layout(_bucket(3, numel=5000))[1]
    sender.close()
    assert os.listdir(tmp_path) == [] and sender.held_bytes == 0
    fresh = _shm(tmp_path, reuse_files=False)
    receiver.unpack(fresh.pack(_bucket(4)))  # the next unpack forgets files that are gone
    assert receiver._kept == {}
    fresh.close()


def test_shared_memory_two_files_in_flight_and_fresh_files(tmp_path):
    sender = _shm(tmp_path, max_files=2, min_file_bytes=8000)
    a, b = sender.pack(_bucket(0)), sender.pack(_bucket(1))  # b packed before a is released
    assert a["path"] != b["path"]
    assert 2 * 4000 <= sender.held_bytes <= 2 * 8000  # 8000-byte files, 4000 bytes written each
    sender.release(a)
    sender.release(b)
    c, d = sender.pack(_bucket(2)), sender.pack(_bucket(3))
    assert {c["path"], d["path"]} == {a["path"], b["path"]} and sender.files_created == 2
    sender.release(c, retained=True)
    sender.release(d)
    assert len(os.listdir(tmp_path)) == 1
    sender.close()
    fresh = _shm(tmp_path, reuse_files=False)
    e = fresh.pack(_bucket(4))
    fresh.release(e)
    assert os.listdir(tmp_path) == [] and fresh.held_bytes == 0
    with pytest.raises(ValueError, match="SharedMemoryOptions.max_files"):
        _shm(tmp_path, max_files=0)


def test_shared_memory_receiver_counts_references(tmp_path):
    sender, receiver = _shm(tmp_path), S.SharedMemoryReceiver()
    descriptor = sender.pack(_weights())
    views = receiver.unpack(descriptor)
    derived = views[2][1][1:].t()  # a view of a view still references the mapping
    del views
    assert receiver.loaded(descriptor) is True
    descriptor = sender.pack(_weights())
    receiver.unpack(descriptor)  # dropped at once
    assert receiver.loaded(descriptor) is False
    assert receiver.loaded({"path": "never-unpacked"}) is False
    del derived
    sender.close()


def test_a_forgotten_sender_leaves_no_files(tmp_path):
    sender = _shm(tmp_path)
    sender.release(sender.pack(_bucket(0)))
    assert len(os.listdir(tmp_path)) == 1
    del sender
    assert os.listdir(tmp_path) == []



def test_files_of_a_killed_sender_are_removed_by_the_next(tmp_path):
    """A sender killed outright (SIGKILL) cannot remove its files; the next sender in the
    directory removes them, and only them."""
    code = textwrap.dedent(f"""
        import os, signal, torch
        from megatron_ace.rollout import shm_transport as S
        sender = S.SharedMemorySender(S.SharedMemoryOptions(directory={str(tmp_path)!r}))
        sender.share_tensors([torch.nn.Parameter(torch.ones(100))])
        sender.pack([("a", torch.ones(10))])
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    left = sorted(name.split("-")[1] for name in os.listdir(tmp_path))
    assert left == ["bucket", "params"]  # what a killed process leaves
    live = _shm(tmp_path)  # the next sender in the directory
    assert os.listdir(tmp_path) == []
    live.release(live.pack(_bucket(0)))  # a file of a running process: kept
    other = tmp_path / "ace-bucket-notes.txt"  # not one of ours: kept
    other.write_text("x")
    assert S.remove_stale_files(str(tmp_path)) == 0
    assert len(os.listdir(tmp_path)) == 2
    live.close()
    assert os.listdir(tmp_path) == [other.name]


def _assert_msgpack_safe(descriptor):
    stack = [descriptor]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
        else:
            assert isinstance(v, (str, int, float, bytes)), type(v)


class _Model(torch.nn.Module):
    """Parameters of several dtypes and a tied pair (`head` is `embed`)."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.embed = torch.nn.Parameter(torch.randn(10, 6, generator=gen))
        self.fc = torch.nn.Linear(6, 8)
        self.norm = torch.nn.Parameter(torch.randn(7, generator=gen).to(torch.bfloat16))
        self.head = self.embed


def test_shared_parameters_are_read_where_they_lie(tmp_path):
    model = _Model()
    params = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    sender, receiver = _shm(tmp_path), S.SharedMemoryReceiver()
    moved = sender.share_tensors(model.parameters())
    assert moved >= sum(p.numel() * p.element_size() for p in params.values())
    assert moved == sender.shared_bytes and sender.share_tensors(model.parameters()) == 0
    # Moved in place: same Parameter objects, same values, still trainable.
    assert dict(model.named_parameters()) == params and model.head is model.embed
    assert all(torch.equal(p, before[n]) for n, p in params.items())

    def bucket():  # views as the HF gather yields them, plus one fresh tensor
        w = model.fc.weight.detach()
        gate, up = torch.chunk(w, 2, dim=0)
        return [("gate", gate), ("up", up), ("t", w.t()), ("embed", model.embed[:9]),
                ("norm", model.norm.detach()), ("bias", model.fc.bias.detach()),
                ("fresh", w[::2].reshape(-1).clone())]

    descriptor = sender.pack(bucket())
    _assert_msgpack_safe(descriptor)
    assert len(descriptor["shared_entries"]) == 6 and len(descriptor["entries"]) == 1
    assert descriptor["shared_bytes"] == sum(t.numel() * t.element_size() for _, t in bucket()[:6])
    got = dict(receiver.unpack(descriptor))
    assert all(torch.equal(got[n], t) and got[n].dtype == t.dtype for n, t in bucket())
    del got
    assert receiver.loaded(descriptor) is False
    sender.release(descriptor)
    receiver.finished()
    # After an optimizer step the next sync reads the trainer's new values through the
    # mapping the receiver kept.
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    (model.fc(model.embed).square().sum() + model.norm.float().sum()).backward()
    opt.step()
    assert not torch.equal(model.fc.weight, before["fc.weight"])
    assert not torch.equal(model.norm, before["norm"])
    descriptor = sender.pack(bucket())
    views = receiver.unpack(descriptor)
    assert [n for n, _ in views] == [n for n, _ in bucket()][-1:] + [n for n, _ in bucket()][:-1]
    expected = dict(bucket())
    assert all(torch.equal(got, expected[n]) for n, got in views)
    # A view of a parameter file kept past the update is refused (it would follow training).
    with pytest.raises(RuntimeError, match="still references the trainer's parameter file"):
        receiver.finished()
    del views
    receiver.loaded(descriptor)
    sender.release(descriptor)
    receiver.finished()
    sender.close()
    assert os.listdir(tmp_path) == []
    kept = model.embed.detach().clone()
    opt.step()  # the parameters outlive the file
    assert not torch.equal(model.embed, kept) and model.head is model.embed


def test_the_engine_cannot_write_into_shared_parameters(tmp_path):
    """The receiver maps parameter files read-only: a write through a view faults (a loud
    crash, instead of silently changing the trainer's weights)."""
    code = textwrap.dedent(f"""
        import torch
        from megatron_ace.rollout import shm_transport as S
        p = torch.nn.Parameter(torch.ones(1000))
        sender = S.SharedMemorySender(S.SharedMemoryOptions(directory={str(tmp_path)!r}))
        assert sender.share_tensors([p]) == 4032
        views = dict(S.SharedMemoryReceiver().unpack(sender.pack([("p", p.detach())])))
        assert torch.equal(views["p"], p)
        print("mapped", flush=True)
        views["p"].add_(1.0)
        print("wrote", flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == -signal.SIGSEGV, (proc.returncode, proc.stderr[-2000:])
    assert "mapped" in proc.stdout and "wrote" not in proc.stdout


def test_share_tensors_leaves_aliased_tensors_alone(tmp_path, monkeypatch):
    sender = _shm(tmp_path)
    buffer = torch.zeros(20)
    in_buffer = buffer[4:10]  # a view into a larger buffer (a distributed optimizer's)
    aliased = torch.ones(3, 4)
    alias = aliased.view(12)  # another tensor refers to the same storage
    strided = torch.ones(4, 6).t()
    assert sender.share_tensors([in_buffer, aliased, strided, torch.empty(0)]) == 0
    assert os.listdir(tmp_path) == []
    alias.add_(1)
    assert torch.equal(aliased, torch.full((3, 4), 2.0))  # the alias still holds
    with pytest.raises(TypeError, match="share_tensors: expected tensors"):
        sender.share_tensors([[1.0]])
    # Too little room in the directory: nothing moves, buckets are copied as before.
    monkeypatch.setattr(S, "_free_bytes", lambda directory: 5000)
    lone, other = torch.ones(1000), torch.ones(1000)
    assert sender.share_tensors([lone, other]) == 0
    descriptor = sender.pack([("lone", lone)])
    assert descriptor["shared_entries"] == [] and len(descriptor["entries"]) == 1
    sender.release(descriptor)
    # Nor is a bucket file made that tmpfs could not hold (writing it would kill the trainer
    # with SIGBUS): a clear error instead.
    with pytest.raises(OSError, match="free.*bucket file needs"):
        sender.pack([("big", torch.ones(10_000))])
    sender.close()
    assert os.listdir(tmp_path) == []


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
