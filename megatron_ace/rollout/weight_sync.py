"""Stream the trainer's full HF-named weights into a running rollout engine, in buckets.

`WeightSyncer.sync(named_tensors)` consumes an *iterator* of `(hf_name, tensor)` pairs (the
trainer's gather of its TP/PP shards yields them one at a time; at TP1 they are views of the
parameters, packed straight into the transport's buffer), so neither side ever holds the whole
model: at most `bucket_bytes` are in flight. The steps, in order:

1. version   - the new version must be newer than the engine's: a stale update would silently
               roll the policy back, so it is refused before anything is touched.
2. pause     - `generate` is synchronous, so no request is in flight while a sync runs; a
               colocated engine sleeping through training gets its weight memory back first
               (KV cache stays released, so the peak is weights + one bucket).
3. begin     - the engine sets its layers aside for a layerwise reload (checkpoint format, so
               backends that repack weights, like vLLM's CPU one, reprocess them).
4. buckets   - pack a bucket (optionally while the engine loads the previous one); once
               loaded, the sender frees or reuses its memory (never while the engine still
               references it). Tensors lying in shared parameters (`share_parameters`) are
               described, not copied: the engine reads them where they lie.
               A module's tensors (q/k/v, gate/up) stay in one bucket, so the engine's
               layerwise reload finishes each module within its bucket. Peak memory: one
               bucket's worth (the shared-memory files are also kept between syncs).
5. finish    - the engine checks every tensor arrived, that it no longer references the
               trainer's shared parameters, and records the version.
6. reset     - prefix-cache KV was computed with the old weights, so it is dropped.
7. resume    - a colocated engine gets its KV cache back and can generate again.

A failure in steps 3-5, on either side, raises `WeightSyncFatalError`: layers may sit on the meta
device, so the engine is marked unusable (`EngineBrokenError` afterwards); there is no rollback.

Also here: `logprob_parity_metrics`, a pure function comparing the trainer's logprobs of sampled
tokens with the engine's, to catch trainer/rollout mismatch right after a sync.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import enum
import time
from collections.abc import Callable, Iterable, Iterator

import torch

from megatron_ace.rollout.engine import Placement, RolloutEngine, WeightSyncFatalError
from megatron_ace.rollout.shm_transport import SharedMemoryOptions
from megatron_ace.rollout.transport import BucketSender, TransportKind, make_sender, sender_class
from megatron_ace.utils.logging import get_logger

log = get_logger(__name__)

NamedTensor = tuple[str, torch.Tensor]


class TransportChoice(enum.Enum):
    """The weight-sync transport a config asks for: one of `TransportKind`, or AUTO."""

    AUTO = "auto"
    """SHARED_MEMORY without CUDA; with CUDA, CUDA_IPC for an engine on the trainer's GPUs and
    NCCL for an engine on GPUs of its own (see `resolve_transport`)."""
    BYTES = "bytes"
    SHARED_MEMORY = "shared_memory"
    CUDA_IPC = "cuda_ipc"
    NCCL = "nccl"


def resolve_transport(choice: TransportChoice | str, *, placement: Placement,
                      cuda_available: bool | None = None,
                      field: str = "transport") -> TransportKind:
    """The transport `choice` means for an engine at `placement` (`field` names the setting in
    errors). On CPU, SHARED_MEMORY: the engine is on the same host (in this process or one
    started from it), and the bucket then costs one memcpy instead of a serialise and a parse.
    The GPU resolutions are written for the GPU layouts and untested here (no CUDA)."""
    try:
        choice = TransportChoice(choice)
    except ValueError:
        allowed = ", ".join(c.value for c in TransportChoice)
        raise ValueError(f"{field}: {choice!r} is not one of: {allowed}") from None
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if choice is TransportChoice.AUTO:
        if not cuda_available:
            return TransportKind.SHARED_MEMORY
        return TransportKind.CUDA_IPC if placement is Placement.COLOCATED else TransportKind.NCCL
    kind = TransportKind(choice.value)
    if kind in (TransportKind.CUDA_IPC, TransportKind.NCCL) and not cuda_available:
        raise ValueError(f"{field}: {kind.value!r} needs CUDA, which is not available here; "
                         f"use 'auto', 'shared_memory' or 'bytes'")
    return kind


@dataclasses.dataclass(kw_only=True)
class WeightSyncConfig:
    """How weights travel from the trainer into the rollout engine."""

    bucket_bytes: int = 512 * 2**20
    """Upper bound on the bytes in flight, i.e. copied into transport buffers (one bucket, or
    two half-size ones with `overlap`); a single larger tensor, or a module's tensors together,
    travel alone. Shared parameters (`WeightSyncer.share_parameters`) are read in place and
    do not count."""
    transport: TransportKind = TransportKind.SHARED_MEMORY
    """SHARED_MEMORY (any engine on this host) or BYTES on CPU; CUDA_IPC (colocated) or NCCL
    (separate GPUs) on GPU. `resolve_transport` picks one from a config's choice."""
    shm_dir: str = "/dev/shm"
    """tmpfs directory for the SHARED_MEMORY transport."""
    overlap: bool = False
    """Pack bucket k+1 in a background thread while the engine loads bucket k (BYTES and
    SHARED_MEMORY): two buckets of half `bucket_bytes` are in flight, so `bucket_bytes` still
    bounds the bytes in flight. Off by default: on a 2-core CPU host the copy competes with the
    engine's reload for cores and memory bandwidth, and measured no faster (bench/RESULTS.md);
    it can pay where cores are idle or the copy crosses PCIe."""
    shm_reuse_files: bool = True
    """SHARED_MEMORY: keep the bucket files (two with `overlap`, else one) across buckets and
    syncs, so their pages are allocated once; they stay in tmpfs until `close()` (about
    `bucket_bytes`, or the largest tensor if that is bigger). False: a fresh file per bucket."""
    sleep_level: int = 1
    """vLLM sleep level used by `release_engine_memory` (1: keep weights in host memory,
    2: drop them; they are overwritten by the next sync anyway)."""

    def __post_init__(self) -> None:
        if self.bucket_bytes < 1:
            raise ValueError(f"WeightSyncConfig.bucket_bytes must be >= 1, got {self.bucket_bytes}")
        if self.sleep_level not in (1, 2):
            raise ValueError(f"WeightSyncConfig.sleep_level must be 1 or 2, got {self.sleep_level}")
        if not isinstance(self.transport, TransportKind):
            raise TypeError(f"WeightSyncConfig.transport must be a TransportKind, got "
                            f"{self.transport!r} (resolve_transport turns a choice into one)")


@dataclasses.dataclass
class SyncMetrics:
    """What one sync cost."""

    version: int
    seconds: float
    num_bytes: int
    num_tensors: int
    num_buckets: int
    peak_bucket_bytes: int
    """Bytes copied into the largest bucket (shared parameters read in place not counted)."""
    num_retained_buckets: int = 0
    """Buckets the engine still referenced after loading them (a module split across buckets,
    or a layer vLLM processes only at the end, e.g. a vocabulary it pads): their memory could
    not be reused."""
    num_shared_bytes: int = 0
    """Of `num_bytes`, those the engine read where they lie in the trainer's parameters (see
    `WeightSyncer.share_parameters`), without a copy on the trainer's side."""

    @property
    def gb_per_s(self) -> float:
        return self.num_bytes / 1e9 / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self, prefix: str = "weight_sync/") -> dict[str, float]:
        values = dataclasses.asdict(self) | {"gb_per_s": self.gb_per_s}
        return {prefix + k: float(v) for k, v in values.items()}


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def iter_buckets(named_tensors: Iterable[NamedTensor], bucket_bytes: int,
                 group_of: Callable[[str], str] | None = None,
                 size_of: Callable[[torch.Tensor], int] | None = None
                 ) -> Iterator[list[NamedTensor]]:
    """Group `(name, tensor)` pairs, in order, into lists of at most `bucket_bytes` bytes.

    Consumes the input lazily (one bucket held at a time). A tensor bigger than `bucket_bytes`
    forms a bucket of its own rather than failing. With `group_of` (name -> group key), a run
    of consecutive tensors with the same key is never cut: it moves to the next bucket whole,
    and a run bigger than `bucket_bytes` forms a bucket of its own. The engine loads such a
    run into one module (q/k/v into one fused projection), and its layerwise reload keeps a
    module's first tensors until the last one arrives, so a cut there would pin the bucket.
    `size_of` (default: the tensor's bytes) says what a tensor costs in flight: 0 for one the
    transport does not copy (`BucketSender.copied_bytes`), which then never starts a bucket.
    """
    size_of = size_of or _nbytes
    bucket: list[NamedTensor] = []
    sizes: list[int] = []
    group_start, group_key = 0, None
    for i, item in enumerate(named_tensors):
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], torch.Tensor)):
            raise TypeError(f"weight #{i}: expected (str, torch.Tensor), got {type(item).__name__}")
        key = group_of(item[0]) if group_of is not None else None
        if key is None or key != group_key:
            group_start, group_key = len(bucket), key
        n = size_of(item[1])
        if bucket and sum(sizes) + n > bucket_bytes and group_start > 0:
            yield bucket[:group_start]
            bucket, sizes, group_start = bucket[group_start:], sizes[group_start:], 0
        bucket.append(item)
        sizes.append(n)
    if bucket:
        yield bucket


def module_grouper(packed_modules: dict[str, list[str]]) -> Callable[[str], str]:
    """name -> the engine module it loads into: the name without its last part (`.weight`,
    `.bias`), with packed parts mapped to their fused module (`packed_modules` as vLLM's
    `packed_modules_mapping`: {"qkv_proj": ["q_proj", "k_proj", "v_proj"], ...})."""
    fused = {part: module for module, parts in packed_modules.items() for part in parts}

    def group_of(name: str) -> str:
        path, _, _ = name.rpartition(".")
        parent, _, leaf = path.rpartition(".")
        return f"{parent}.{fused.get(leaf, leaf)}" if parent else fused.get(leaf, leaf)

    return group_of


@dataclasses.dataclass
class _Packed:
    """One bucket, packed and not yet loaded."""

    descriptor: dict
    num_bytes: int
    num_tensors: int

    @property
    def num_shared_bytes(self) -> int:
        return int(self.descriptor.get("shared_bytes", 0))


class WeightSyncer:
    """Drives weight updates into one `RolloutEngine` over one transport."""

    def __init__(self, engine: RolloutEngine, config: WeightSyncConfig,
                 sender: BucketSender | None = None) -> None:
        """`sender` overrides the one built from `config.transport` (NCCL needs one built with
        its group options, connected by the caller)."""
        self.engine = engine
        self.config = config
        self.sender = sender or _default_sender(config)
        self._group_of: Callable[[str], str] | None = None
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
        if self._group_of is None:  # asked once, before anything is touched
            self._group_of = module_grouper(engine.packed_modules())
        engine.wake_up(tags=["weights"])
        engine.begin_weight_update(version)
        num_bytes = num_tensors = num_buckets = peak = num_retained = num_shared = 0
        # 4: bucket by bucket (with `overlap`, k+1 is packed while the engine loads k); each is
        # released, or its memory reused, as soon as the engine has it.
        packed_buckets = self._packed_buckets(named_tensors)
        try:
            for packed in packed_buckets:
                retained = True  # unless the engine says otherwise, its memory is not reused
                try:
                    retained = engine.load_weight_bucket(packed.descriptor).retained
                finally:
                    self.sender.release(packed.descriptor, retained=retained)
                num_bytes += packed.num_bytes
                num_tensors += packed.num_tensors
                num_buckets += 1
                num_retained += retained
                num_shared += packed.num_shared_bytes
                peak = max(peak, packed.num_bytes - packed.num_shared_bytes)
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
        finally:
            packed_buckets.close()  # on failure: release a bucket packed ahead, stop the thread
        # 5-7: close (completeness check, version recorded), drop stale KV, resume.
        engine.finish_weight_update(version)
        engine.reset_prefix_cache()
        engine.wake_up(tags=["kv_cache"])
        metrics = SyncMetrics(version, time.perf_counter() - start, num_bytes, num_tensors,
                              num_buckets, peak, num_retained, num_shared)
        log.info("weight sync v%d over %s: %.3f s, %.1f MB in %d buckets (%.2f GB/s; %.1f MB "
                 "read where they lie)", version, self.config.transport.value, metrics.seconds,
                 num_bytes / 1e6, num_buckets, metrics.gb_per_s, num_shared / 1e6)
        return metrics

    def share_parameters(self, tensors: Iterable[torch.Tensor]) -> int:
        """Let the engine read these trainer tensors (`model.parameters()`) where they lie at
        every later sync instead of copying them into a bucket: with SHARED_MEMORY they move,
        once and in place, into a tmpfs file the engine maps (see `shm_transport`). Worth it
        where the synced HF tensors are views of the parameters (TP1: all but q/k/v); other
        transports ignore it. Returns the bytes moved."""
        return self.sender.share_tensors(tensors)

    @property
    def overlaps(self) -> bool:
        """Whether bucket k+1 is packed while the engine loads bucket k."""
        return self.config.overlap and self.sender.concurrent_pack

    def _packed_buckets(self, named_tensors: Iterable[NamedTensor]) -> Iterator[_Packed]:
        """Packed buckets in order. With overlap, bucket bounds are half of `bucket_bytes` (two
        buckets are in flight) and the next bucket is packed in a background thread while the
        caller loads the current one: the copies release the GIL, and a separate engine process
        loads on another core meanwhile."""
        buckets = iter_buckets(named_tensors, _bucket_bound(self.config, self.overlaps),
                               self._group_of, self.sender.copied_bytes)

        def pack_next() -> _Packed | None:
            bucket = next(buckets, None)
            if bucket is None:
                return None
            num_bytes = sum(_nbytes(t) for _, t in bucket)
            return _Packed(self.sender.pack(bucket), num_bytes, len(bucket))

        if not self.overlaps:
            while (packed := pack_next()) is not None:
                yield packed
            return
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ace-weight-pack") as pool:
            pending = pool.submit(pack_next)
            try:
                while (packed := pending.result()) is not None:
                    pending = pool.submit(pack_next)
                    yield packed
            finally:
                # Stopped early (the engine failed): a bucket packed ahead was never loaded.
                if not pending.cancel():
                    leftover = pending.exception() is None and pending.result()
                    if leftover:
                        self.sender.release(leftover.descriptor, retained=True)

    def release_engine_memory(self) -> None:
        """Before a training phase: a colocated engine frees its accelerator memory."""
        self.engine.sleep(level=self.config.sleep_level)

    def close(self) -> None:
        self.sender.close()


def _bucket_bound(config: WeightSyncConfig, overlaps: bool | None = None) -> int:
    """Bytes of one bucket: half of `bucket_bytes` when two are in flight."""
    if overlaps is None:
        overlaps = config.overlap and sender_class(config.transport).concurrent_pack
    return max(config.bucket_bytes // 2 if overlaps else config.bucket_bytes, 1)


def _default_sender(config: WeightSyncConfig) -> BucketSender:
    if config.transport is TransportKind.SHARED_MEMORY:
        return make_sender(config.transport, options=SharedMemoryOptions(
            directory=config.shm_dir, reuse_files=config.shm_reuse_files,
            max_files=2 if config.overlap else 1, min_file_bytes=_bucket_bound(config)))
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
