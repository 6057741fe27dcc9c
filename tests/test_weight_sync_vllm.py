"""Weight sync into the real vLLM engine: after streaming new weights through `WeightSyncer`,
the engine's logprobs must match HF transformers with the new weights (and not the old ones).

One engine for the module; the tests run in order and the failure tests come last, because a
failed update leaves the engine unusable by design. A second engine checks the other failure.
"""

from __future__ import annotations

import gc
import glob
import os
import random
from contextlib import closing

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
from megatron_ace.rollout.shm_transport import SharedMemoryOptions, SharedMemorySender
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


def named_weights(model, *, shuffle_seed: int | None = None, views: bool = False):
    """(hf_name, tensor) pairs, lazily; optionally in a shuffled order so that buckets cut
    layers at arbitrary points. Copies of the parameters, or with `views` the parameters
    themselves (as the Megatron gather yields them at TP1)."""
    names = [n for n, _ in model.named_parameters()]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(names)
    params = dict(model.named_parameters())
    return ((n, params[n].detach() if views else params[n].detach().clone()) for n in names)


def shm_files(directory) -> dict[str, int]:
    """Files of the shared-memory transport in `directory`, counted by kind."""
    kinds = [name.split("-")[1] for name in os.listdir(directory)]
    return {kind: kinds.count(kind) for kind in sorted(set(kinds))}


@pytest.fixture(autouse=True, scope="module")
def no_files_left_in_dev_shm():
    """Syncers left to the garbage collector (the default directory is /dev/shm) must not
    leave files behind, failed syncs included."""
    yield
    gc.collect()
    left = glob.glob(f"/dev/shm/ace-*-{os.getpid()}-*")
    assert left == [], left


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
    config = WeightSyncConfig(bucket_bytes=SMALL_BUCKET, transport=TransportKind.BYTES)
    syncer = WeightSyncer(engine, config)
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
    """Shuffled names split modules across buckets, so the reload keeps tensors of a bucket
    after it returns: those files must be retired, not rewritten (overlapped packing here)."""
    new = perturbed(load_hf(model_dir), seed=2)
    config = WeightSyncConfig(bucket_bytes=2 * SMALL_BUCKET, transport=TransportKind.SHARED_MEMORY,
                              shm_dir=str(tmp_path), overlap=True)
    syncer = WeightSyncer(engine, config)
    assert syncer.overlaps
    metrics = syncer.sync(named_weights(new, shuffle_seed=0), version=5)
    assert metrics.version == 5 and engine.weight_version == 5
    assert max_seq_diff(engine, new) < LOGPROB_ATOL
    # Some buckets were retained (a new file after each), others reused (fewer files than
    # buckets; a bucket larger than the kept file also gets a new one).
    assert 2 < metrics.num_retained_buckets < metrics.num_buckets - 2
    assert 1 + metrics.num_retained_buckets <= syncer.sender.files_created < metrics.num_buckets
    assert 1 <= len(os.listdir(tmp_path)) <= 2  # files kept for reuse (two with overlap)
    syncer.close()
    assert os.listdir(tmp_path) == []


class ReusesRetainedFiles(SharedMemorySender):
    """A defect on purpose: rewrites bucket files the engine still references."""

    def release(self, descriptor, retained=False):
        super().release(descriptor, retained=False)


@pytest.mark.numerics
def test_rewriting_a_retained_file_would_corrupt_the_weights(engine, model_dir, tmp_path):
    """Control for the test above: with the engine's `retained` answer ignored, the same
    shuffled sync leaves wrong weights in the engine, so the parity check has teeth."""
    new = perturbed(load_hf(model_dir), seed=6)
    config = WeightSyncConfig(bucket_bytes=SMALL_BUCKET, shm_dir=str(tmp_path))
    defective = ReusesRetainedFiles(SharedMemoryOptions(directory=str(tmp_path)))
    WeightSyncer(engine, config, sender=defective).sync(named_weights(new, shuffle_seed=0))
    assert max_seq_diff(engine, new) > 1e-2
    defective.close()
    # The real sender repairs it (and the module's engine holds version 5's weights again).
    current = perturbed(load_hf(model_dir), seed=2)
    with closing(WeightSyncer(engine, config)) as syncer:
        syncer.sync(named_weights(current, shuffle_seed=1), version=engine.weight_version + 1)
    assert max_seq_diff(engine, current) < LOGPROB_ATOL


@pytest.mark.numerics
def test_shared_memory_file_is_reused_across_syncs(engine, model_dir, tmp_path):
    """Model order, one bucket at a time: after the first sync a new file is made only for a
    bucket the engine kept (the tiny model's 1000-token vocabulary is padded by vLLM, so it
    processes the embedding and the head only at the end; the Qwen2.5 vocabularies need no
    padding), and each sync still delivers its own weights (no stale bytes from the reused
    file)."""
    config = WeightSyncConfig(bucket_bytes=SMALL_BUCKET, shm_dir=str(tmp_path))
    with closing(WeightSyncer(engine, config)) as syncer:
        created, retained = [], []
        for seed in (7, 8, 2):  # ends on the weights the later tests expect (seed 2)
            new = perturbed(load_hf(model_dir), seed=seed)
            metrics = syncer.sync(named_weights(new))
            assert max_seq_diff(engine, new) < LOGPROB_ATOL
            created.append(syncer.sender.files_created)
            retained.append(metrics.num_retained_buckets)
            assert len(os.listdir(tmp_path)) == 1
        assert metrics.num_buckets > 8 and retained == [2, 2, 2], retained
        # Per later sync, a new file for each retained bucket and for no other.
        assert [b - a for a, b in zip(created, created[1:])] == retained[1:], (created, retained)
    assert os.listdir(tmp_path) == []


@pytest.mark.numerics
def test_reference_reload_of_held_weights(engine, model_dir, tmp_path):
    """The benchmark's floor: tensors held in the engine's process, then vLLM's reload alone.
    It really loads them (the engine then matches them), and needs something held."""
    held = perturbed(load_hf(model_dir), seed=9)
    sender = SharedMemorySender(SharedMemoryOptions(directory=str(tmp_path), reuse_files=False))
    descriptor = sender.pack(list(named_weights(held)))
    held_count = engine.llm.collective_rpc("ace_hold_weights", args=(descriptor,))
    assert held_count == [len(descriptor["entries"])]
    sender.release(descriptor)
    seconds = engine.llm.collective_rpc("ace_time_held_reload")
    assert seconds[0] > 0
    assert max_seq_diff(engine, held) < LOGPROB_ATOL
    engine.llm.collective_rpc("ace_drop_held_weights")
    with pytest.raises(Exception, match="no weights held"):
        engine.llm.collective_rpc("ace_time_held_reload")
    # Back to what the later tests expect (version 5's weights, served under a newer version).
    current = perturbed(load_hf(model_dir), seed=2)
    with closing(WeightSyncer(engine, WeightSyncConfig(shm_dir=str(tmp_path)))) as syncer:
        syncer.sync(named_weights(current), version=engine.weight_version + 1)
    assert max_seq_diff(engine, current) < LOGPROB_ATOL


@pytest.mark.numerics
def test_sync_reads_shared_parameters_where_they_lie(engine, model_dir, tmp_path):
    """The trainer's parameters moved into a tmpfs file: the sync copies nothing and the
    engine matches them; after an in-place update (as an optimizer step makes) the next sync
    delivers the new values through the read-only mapping the engine kept; tensors not in the
    file (here every other one, copied) still go through bucket files."""
    trainer = perturbed(load_hf(model_dir), seed=11)
    first = {n: p.detach().clone() for n, p in trainer.named_parameters()}
    config = WeightSyncConfig(bucket_bytes=SMALL_BUCKET, shm_dir=str(tmp_path))
    with closing(WeightSyncer(engine, config)) as syncer:
        moved = syncer.share_parameters(trainer.parameters())
        assert moved >= sum(t.numel() * t.element_size() for t in first.values())
        assert all(torch.equal(p, first[n]) for n, p in trainer.named_parameters())
        metrics = syncer.sync(named_weights(trainer, views=True))
        assert metrics.num_shared_bytes == metrics.num_bytes and syncer.sender.files_created == 0
        # Nothing in flight, so nothing to split: one bucket, one load (as the reload floor).
        assert metrics.num_buckets == 1 and metrics.peak_bucket_bytes == 0
        assert max_seq_diff(engine, trainer) < LOGPROB_ATOL
        assert shm_files(tmp_path) == {"params": 1}

        perturbed(trainer, seed=12)  # in place: the bytes in the file change
        mixed = ((n, t.clone() if i % 2 else t)
                 for i, (n, t) in enumerate(named_weights(trainer, views=True)))
        metrics = syncer.sync(mixed)
        assert 0 < metrics.num_shared_bytes < metrics.num_bytes
        assert metrics.num_buckets > 1  # the bound applies to the copied tensors
        assert max_seq_diff(engine, trainer) < LOGPROB_ATOL
        stale = perturbed(load_hf(model_dir), seed=11)  # what the first sync delivered
        assert max_seq_diff(engine, stale) > 1e-2  # the engine did not keep those bytes
        assert shm_files(tmp_path) == {"bucket": 1, "params": 1}
    assert os.listdir(tmp_path) == []
    kept = {n: p.detach().clone() for n, p in trainer.named_parameters()}
    with torch.no_grad():  # the parameters outlive the syncer and its files
        for p in trainer.parameters():
            p.add_(1.0)
    assert all(torch.equal(p, kept[n] + 1.0) for n, p in trainer.named_parameters())
    # Back to what the later tests expect (version 5's weights, served under a newer version).
    current = perturbed(load_hf(model_dir), seed=2)
    with closing(WeightSyncer(engine, WeightSyncConfig(shm_dir=str(tmp_path)))) as syncer:
        syncer.sync(named_weights(current), version=engine.weight_version + 1)
    assert max_seq_diff(engine, current) < LOGPROB_ATOL


@pytest.mark.numerics
def test_stale_or_duplicate_version_is_refused_without_harm(engine, model_dir):
    current = perturbed(load_hf(model_dir), seed=2)  # what the engine serves now
    served = engine.weight_version
    assert served >= 5
    syncer = WeightSyncer(engine, WeightSyncConfig())
    other = perturbed(load_hf(model_dir), seed=3)
    for version in (served, served - 1):
        with pytest.raises(StaleWeightVersionError, match=f"version {version} refused"):
            syncer.sync(named_weights(other), version=version)
    assert engine.weight_version == served
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
    "wrong_shape",  # fails in the engine
    "not_a_tensor",  # fails on the trainer side, in the thread that packs ahead
    # Each case needs an engine of its own (~5-15 s); this one runs with the slow tests.
    pytest.param("unknown_name", marks=pytest.mark.slow),
])
def test_bad_tensor_is_fatal(model_dir, bad, tmp_path):
    """A bad tensor midway is fatal (the engine is then unusable), whichever side finds it;
    no bucket is left busy, every file goes with the syncer, and the trainer's shared
    parameters are untouched. Half the tensors are read where they lie, half copied, so
    both kinds of file exist when the failure comes."""
    eng = VllmRolloutEngine(RolloutEngineConfig(model_path=str(model_dir), max_model_len=256))
    try:
        new = perturbed(load_hf(model_dir), seed=4)
        reference = {n: p.detach().clone() for n, p in new.named_parameters()}

        def weights():
            for i, (name, t) in enumerate(named_weights(new, views=True)):
                t = t.clone() if i % 2 else t
                if i == 5 and bad == "wrong_shape":
                    t = t[..., :-1]  # a view of a shared parameter, described with its shape
                if i == 5 and bad == "unknown_name":
                    name = name.replace("layers.", "layerz.")
                if i == 5 and bad == "not_a_tensor":
                    t = t.tolist()  # fails on the trainer side, after earlier buckets went in
                yield name, t

        expected = {"wrong_shape": "shape", "unknown_name": "not in the engine's checkpoint",
                    "not_a_tensor": "trainer side.*expected \\(str, torch.Tensor\\)"}[bad]
        config = WeightSyncConfig(bucket_bytes=SMALL_BUCKET, shm_dir=str(tmp_path), overlap=True)
        syncer = WeightSyncer(eng, config)
        assert syncer.config.transport is TransportKind.SHARED_MEMORY and syncer.overlaps
        assert syncer.share_parameters(new.parameters()) > 0
        with pytest.raises(WeightSyncFatalError, match=expected):
            syncer.sync(weights())
        with pytest.raises(EngineBrokenError):
            eng.sequence_logprobs(SEQS)
        # Left until close: the parameter file and at most the two bucket files kept for
        # reuse (a bucket in flight at the failure was retired, as if retained).
        files = shm_files(tmp_path)
        assert files["params"] == 1 and files.get("bucket", 0) <= 2, files
        syncer.close()
        assert os.listdir(tmp_path) == []
        assert all(torch.equal(p, reference[n]) for n, p in new.named_parameters())
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
        # Shared parameters, read by the other process where they lie, twice (the second time
        # through the mapping it kept, after an in-place update).
        config = WeightSyncConfig(bucket_bytes=SMALL_BUCKET, shm_dir=str(tmp_path))
        with closing(WeightSyncer(eng, config)) as syncer:
            syncer.share_parameters(new.parameters())
            for version in (3, 4):
                perturbed(new, seed=10 + version)
                metrics = syncer.sync(named_weights(new, views=True), version=version)
                assert metrics.num_shared_bytes == metrics.num_bytes
                assert max_seq_diff(eng, new) < LOGPROB_ATOL
        with pytest.raises(StaleWeightVersionError):
            WeightSyncer(eng, WeightSyncConfig()).sync(named_weights(new), version=4)
    finally:
        eng.close()
