"""Stream the trainer's full HF-named weights into a running rollout engine, in buckets.

`WeightSyncer.sync(named_tensors)` consumes an *iterator* of `(hf_name, tensor)` pairs (the
trainer's gather of its TP/PP shards yields them one at a time), so neither side ever holds the
whole model: at most one bucket of `bucket_bytes` is in flight. The steps, in order:

1. version   - the new version must be newer than the engine's: a stale update would silently
               roll the policy back, so it is refused before anything is touched.
2. pause     - `generate` is synchronous, so no request is in flight while a sync runs; a
               colocated engine sleeping through training gets its weight memory back first
               (KV cache stays released, so the peak is weights + one bucket).
3. begin     - the engine sets its layers aside for a layerwise reload (checkpoint format, so
               backends that repack weights, like vLLM's CPU one, reprocess them).
4. buckets   - pack a bucket, the engine loads it, the sender frees it: peak memory is one bucket.
5. finish    - the engine checks every tensor arrived and records the version.
6. reset     - prefix-cache KV was computed with the old weights, so it is dropped.
7. resume    - a colocated engine gets its KV cache back and can generate again.

A failure in steps 3-5, on either side, raises `WeightSyncFatalError`: layers may sit on the meta
device, so the engine is marked unusable (`EngineBrokenError` afterwards); there is no rollback.

Also here: `logprob_parity_metrics`, a pure function comparing the trainer's logprobs of sampled
tokens with the engine's, to catch trainer/rollout mismatch right after a sync.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Iterator

import torch

from megatron_ace.rollout.engine import RolloutEngine, WeightSyncFatalError
from megatron_ace.rollout.transport import (
    BucketSender,
    SharedMemoryOptions,
    TransportKind,
    make_sender,
)
from megatron_ace.utils.logging import get_logger

log = get_logger(__name__)

NamedTensor = tuple[str, torch.Tensor]


@dataclasses.dataclass(kw_only=True)
class WeightSyncConfig:
    """How weights travel from the trainer into the rollout engine."""

    bucket_bytes: int = 512 * 2**20
    """Upper bound on the bytes of one bucket; a single larger tensor travels alone."""
    transport: TransportKind = TransportKind.BYTES
    """BYTES or SHARED_MEMORY on CPU; CUDA_IPC (colocated) or NCCL (separate GPUs) on GPU."""
    shm_dir: str = "/dev/shm"
    """tmpfs directory for the SHARED_MEMORY transport."""
    sleep_level: int = 1
    """vLLM sleep level used by `release_engine_memory` (1: keep weights in host memory,
    2: drop them; they are overwritten by the next sync anyway)."""

    def __post_init__(self) -> None:
        if self.bucket_bytes < 1:
            raise ValueError(f"WeightSyncConfig.bucket_bytes must be >= 1, got {self.bucket_bytes}")
        if self.sleep_level not in (1, 2):
            raise ValueError(f"WeightSyncConfig.sleep_level must be 1 or 2, got {self.sleep_level}")


@dataclasses.dataclass
class SyncMetrics:
    """What one sync cost."""

    version: int
    seconds: float
    num_bytes: int
    num_tensors: int
    num_buckets: int
    peak_bucket_bytes: int

    @property
    def gb_per_s(self) -> float:
        return self.num_bytes / 1e9 / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self, prefix: str = "weight_sync/") -> dict[str, float]:
        values = dataclasses.asdict(self) | {"gb_per_s": self.gb_per_s}
        return {prefix + k: float(v) for k, v in values.items()}


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def iter_buckets(named_tensors: Iterable[NamedTensor], bucket_bytes: int) -> Iterator[list[NamedTensor]]:
    """Group `(name, tensor)` pairs, in order, into lists of at most `bucket_bytes` bytes.

    Consumes the input lazily (one bucket held at a time). A tensor bigger than `bucket_bytes`
    forms a bucket of its own rather than failing.
    """
    bucket: list[NamedTensor] = []
    size = 0
    for i, item in enumerate(named_tensors):
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], torch.Tensor)):
            raise TypeError(f"weight #{i}: expected (str, torch.Tensor), got {type(item).__name__}")
        n = _nbytes(item[1])
        if bucket and size + n > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append(item)
        size += n
    if bucket:
        yield bucket


class WeightSyncer:
    """Drives weight updates into one `RolloutEngine` over one transport."""

    def __init__(self, engine: RolloutEngine, config: WeightSyncConfig,
                 sender: BucketSender | None = None) -> None:
        """`sender` overrides the one built from `config.transport` (NCCL needs one built with
        its group options, connected by the caller)."""
        self.engine = engine
        self.config = config
        self.sender = sender or _default_sender(config)
        if self.sender.kind is not config.transport:
            raise ValueError(
                f"WeightSyncConfig.transport is {config.transport.value!r} but the sender is "
                f"{self.sender.kind.value!r}"
            )

    def sync(self, named_tensors: Iterable[NamedTensor], version: int | None = None) -> SyncMetrics:
        """Stream `named_tensors` into the engine as weight `version` (default: current + 1)."""
        engine = self.engine
        version = engine.weight_version + 1 if version is None else version
        start = time.perf_counter()
        # 1-3: refuse stale versions, give a sleeping engine its weight memory, open the update.
        engine.wake_up(tags=["weights"])
        engine.begin_weight_update(version)
        num_bytes = num_tensors = num_buckets = peak = 0
        # 4: one bucket in flight; freed as soon as the engine has it.
        try:
            for bucket in iter_buckets(named_tensors, self.config.bucket_bytes):
                size = sum(_nbytes(t) for _, t in bucket)
                num_tensors += len(bucket)
                descriptor = self.sender.pack(bucket)
                try:
                    engine.load_weight_bucket(descriptor)
                finally:
                    self.sender.release(descriptor)
                del bucket, descriptor
                num_bytes += size
                num_buckets += 1
                peak = max(peak, size)
        except WeightSyncFatalError:
            raise
        except Exception as exc:
            # The trainer side failed (bad input, a transport error) after layers were set
            # aside: the engine holds a partial model now, same as an engine-side failure.
            engine.mark_broken(f"trainer side failed during update {version}: {exc}")
            raise WeightSyncFatalError(
                f"weight update {version} failed on the trainer side ({type(exc).__name__}: {exc}); "
                "the engine is unusable: start a new one from a checkpoint"
            ) from exc
        # 5-7: close (completeness check, version recorded), drop stale KV, resume.
        engine.finish_weight_update(version)
        engine.reset_prefix_cache()
        engine.wake_up(tags=["kv_cache"])
        metrics = SyncMetrics(version, time.perf_counter() - start, num_bytes, num_tensors,
                              num_buckets, peak)
        log.info("weight sync v%d: %.3f s, %.1f MB in %d buckets (%.2f GB/s)", version,
                 metrics.seconds, num_bytes / 1e6, num_buckets, metrics.gb_per_s)
        return metrics

    def release_engine_memory(self) -> None:
        """Before a training phase: a colocated engine frees its accelerator memory."""
        self.engine.sleep(level=self.config.sleep_level)

    def close(self) -> None:
        self.sender.close()


def _default_sender(config: WeightSyncConfig) -> BucketSender:
    if config.transport is TransportKind.SHARED_MEMORY:
        return make_sender(config.transport, options=SharedMemoryOptions(directory=config.shm_dir))
    if config.transport is TransportKind.NCCL:
        raise ValueError(
            "WeightSyncConfig.transport 'nccl' needs a connected NcclSender passed to WeightSyncer"
        )
    return make_sender(config.transport)


def logprob_parity_metrics(trainer_logp_N: torch.Tensor, rollout_logp_N: torch.Tensor, *,
                           clip_eps: float = 0.2, prefix: str = "parity/") -> dict[str, float]:
    """Compare per-token logprobs of the same sampled tokens (N = tokens over all samples).

    trainer_logp_N: the trainer's log pi_theta(token); rollout_logp_N: the engine's log
    pi_old(token). Returns mean/max |diff|, statistics of the importance ratio
    r = exp(trainer - rollout) (which is exactly 1 for an on-policy step with matched engines),
    the share of tokens whose ratio the PPO clip would cut at `clip_eps`, and the k3 estimate of
    KL(rollout || trainer).
    """
    if trainer_logp_N.shape != rollout_logp_N.shape or trainer_logp_N.dim() != 1:
        raise ValueError(
            f"logprob_parity_metrics: need two 1-D tensors of equal length, got "
            f"{tuple(trainer_logp_N.shape)} and {tuple(rollout_logp_N.shape)}"
        )
    if trainer_logp_N.numel() == 0:
        raise ValueError("logprob_parity_metrics: no tokens")
    trainer = trainer_logp_N.detach().double()
    rollout = rollout_logp_N.detach().double()
    diff_N = trainer - rollout
    ratio_N = diff_N.exp()
    # k3 = r - 1 - log r with r = pi_trainer / pi_rollout: unbiased for KL(rollout||trainer), >= 0.
    k3_N = ratio_N - 1.0 - diff_N
    outside = ((ratio_N < 1.0 - clip_eps) | (ratio_N > 1.0 + clip_eps)).double()
    values = {
        "logp_abs_diff_mean": diff_N.abs().mean(),
        "logp_abs_diff_max": diff_N.abs().max(),
        "ratio_mean": ratio_N.mean(),
        "ratio_std": ratio_N.std(unbiased=False),
        "ratio_min": ratio_N.min(),
        "ratio_max": ratio_N.max(),
        "ratio_clipped_frac": outside.mean(),
        "kl_k3": k3_N.mean(),
    }
    out = {prefix + k: float(v) for k, v in values.items()}
    out[prefix + "num_tokens"] = float(trainer_logp_N.numel())
    return out
