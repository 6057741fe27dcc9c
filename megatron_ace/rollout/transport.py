"""How one bucket of named weight tensors travels from the trainer into the rollout engine.

A transport has two halves behind one interface, chosen by `TransportKind` from a registry:

- a `BucketSender` on the trainer side: `pack(bucket)` makes the bytes reachable by the engine and
  returns a small *descriptor* (a dict of str/int/bytes/lists only: vLLM's RPC layer serialises
  kwargs with msgpack, which mangles tensors), and `release(descriptor)` frees what `pack`
  allocated once the engine has loaded the bucket;
- a `BucketReceiver` inside each vLLM worker: `unpack(descriptor)` returns `(name, tensor)` pairs.

Kinds:
- BYTES: the bucket serialised with safetensors into one `bytes` object. Works everywhere
  (in-process and multiprocess engines), costs one serialise and one parse copy.
- SHARED_MEMORY (`shm_transport`): the bucket written into a file under /dev/shm that is reused
  from bucket to bucket and across syncs (one memcpy, no page faults once warm), and tensors
  that already lie in a shared parameter file not copied at all; the worker keeps the files
  mapped, so tensors are views on them (no parse, no copy). Same machine only.
- CUDA_IPC (colocated trainer and engine on the same GPUs): the bucket packed into one CUDA
  buffer whose IPC handle is sent, keyed by GPU UUID; the worker opens it and copies out. The
  pattern follows vLLM's own `ipc_engine` and verl's colocated sync; written here, exercised
  only where CUDA exists.
- NCCL (engine on other GPUs or nodes): the trainer broadcasts each packed buffer over a
  stateless NCCL group that the engine's workers join (vLLM's `StatelessProcessGroup` +
  `PyNcclCommunicator`, as NeMo-RL and slime do); the descriptor carries only the layout.

What this module does not do: decide bucket boundaries (see `weight_sync.iter_buckets`), validate
names or shapes against the model (the worker does), or order sends (the `WeightSyncer` does).
GPU kinds raise `TransportUnavailableError` at construction when CUDA is absent.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import pickle
import uuid
from collections.abc import Iterable
from typing import Any, ClassVar

import torch

NamedTensors = list[tuple[str, torch.Tensor]]
Descriptor = dict[str, Any]

_ALIGN_BYTES = 64
"""Every tensor in a packed buffer starts on a 64-byte boundary, so a typed view of it is
aligned for any dtype (and for vectorised copies)."""


class TransportKind(enum.Enum):
    BYTES = "bytes"
    SHARED_MEMORY = "shared_memory"
    CUDA_IPC = "cuda_ipc"
    NCCL = "nccl"


class TransportUnavailableError(RuntimeError):
    """The chosen transport cannot run here (e.g. a CUDA transport without CUDA)."""


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies inside a packed bucket buffer."""

    name: str
    dtype: str
    """torch dtype name without the `torch.` prefix (msgpack-safe)."""
    shape: tuple[int, ...]
    offset: int
    """Byte offset from the start of the buffer."""
    nbytes: int

    def to_wire(self) -> list[Any]:
        return [self.name, self.dtype, list(self.shape), self.offset, self.nbytes]

    @classmethod
    def from_wire(cls, item: list[Any]) -> TensorEntry:
        name, dtype, shape, offset, nbytes = item
        return cls(name, dtype, tuple(int(s) for s in shape), int(offset), int(nbytes))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"bucket descriptor names unknown dtype {name!r}")
    return dtype


def plan_layout(bucket: NamedTensors) -> tuple[list[TensorEntry], int]:
    """Byte layout of `bucket` packed into one flat buffer: (entries, total bytes)."""
    entries, offset = [], 0
    for name, tensor in bucket:
        nbytes = tensor.numel() * tensor.element_size()
        entries.append(TensorEntry(name, dtype_name(tensor.dtype), tuple(tensor.shape), offset, nbytes))
        offset += -(-nbytes // _ALIGN_BYTES) * _ALIGN_BYTES
    return entries, offset


def pack_into(flat_U8: torch.Tensor, bucket: NamedTensors, entries: list[TensorEntry]) -> None:
    """Copy each tensor into its slot of the flat uint8 buffer `flat_U8`, straight from where
    it lies (a parameter, a strided view, another device): one copy, no temporary."""
    for (_, tensor), entry in zip(bucket, entries, strict=True):
        if entry.nbytes == 0:
            continue
        slot = flat_U8[entry.offset : entry.offset + entry.nbytes]
        slot.view(tensor.dtype).view(entry.shape).copy_(tensor.detach(), non_blocking=True)


def views_of(flat_U8: torch.Tensor, entries: list[TensorEntry]) -> NamedTensors:
    """Typed, shaped views into the flat uint8 buffer `flat_U8` (no copy)."""
    out = []
    for e in entries:
        raw = flat_U8[e.offset : e.offset + e.nbytes]
        out.append((e.name, raw.view(dtype_from_name(e.dtype)).view(e.shape)))
    return out


def entries_of(descriptor: Descriptor) -> list[TensorEntry]:
    return [TensorEntry.from_wire(item) for item in descriptor["entries"]]


def _require_cuda(kind: TransportKind) -> None:
    if not torch.cuda.is_available():
        raise TransportUnavailableError(
            f"transport {kind.value!r} needs CUDA, but torch.cuda.is_available() is False here; "
            f"use {TransportKind.BYTES.value!r} or {TransportKind.SHARED_MEMORY.value!r} on CPU"
        )


class BucketSender(abc.ABC):
    """Trainer side of a transport."""

    kind: ClassVar[TransportKind]
    concurrent_pack: ClassVar[bool] = False
    """`pack` may run in another thread while the engine loads the previous bucket (and while
    `release` runs). The GPU kinds say False: that overlap is untested there."""

    @abc.abstractmethod
    def pack(self, bucket: NamedTensors) -> Descriptor:
        """Make `bucket` reachable by the engine; return its msgpack-safe descriptor."""

    def release(self, descriptor: Descriptor, retained: bool = False) -> None:
        """Free what `pack` allocated for this descriptor (the engine has loaded it, or failed).
        `retained`: the engine still references the bucket's memory (see
        `BucketReceiver.loaded`), so it must not be reused."""

    def copied_bytes(self, tensor: torch.Tensor) -> int:
        """Bytes `pack` copies for `tensor` (0 for one the engine reads where it lies)."""
        return tensor.numel() * tensor.element_size()

    def share_tensors(self, tensors: Iterable[torch.Tensor]) -> int:
        """Let the engine read `tensors` (the trainer's parameters) where they lie from now on,
        instead of copying them at every sync; returns the bytes made readable so. Transports
        that cannot (BYTES, the GPU kinds for now) return 0 and copy as before."""
        return 0

    def init_info(self) -> dict[str, Any]:
        """What each receiver needs to connect (empty for connection-less transports)."""
        return {}

    def close(self) -> None:
        """Release long-lived resources (process groups)."""


class BucketReceiver(abc.ABC):
    """Engine (vLLM worker) side of a transport."""

    kind: ClassVar[TransportKind]

    def connect(self, init_info: dict[str, Any], worker_rank: int) -> None:
        """Join the sender (no-op for connection-less transports)."""

    @abc.abstractmethod
    def unpack(self, descriptor: Descriptor) -> NamedTensors:
        """Tensors of one bucket. They must stay valid after the sender's `release`: vLLM's
        layerwise reload keeps them until every weight of their layer has arrived."""

    def loaded(self, descriptor: Descriptor) -> bool:
        """Called once the engine has loaded the bucket `unpack` gave and dropped its own
        references to the tensors. True when something still references memory the sender
        owns (then the sender must not reuse it); False for transports whose tensors are the
        receiver's own."""
        return False

    def finished(self) -> None:
        """Called once an update is complete: raise if the engine still references memory
        that the sender goes on changing (a shared parameter file)."""


# ---------------------------------------------------------------------------------------------
# BYTES: safetensors-serialised bucket


class BytesSender(BucketSender):
    kind = TransportKind.BYTES
    concurrent_pack = True  # no state between calls

    def pack(self, bucket: NamedTensors) -> Descriptor:
        from safetensors.torch import save

        # safetensors refuses tensors that share storage; a gathered bucket rarely has any, but
        # tied views must not break the sync, so clone those.
        seen: set[int] = set()
        tensors = {}
        for name, tensor in bucket:
            t = tensor.detach().to("cpu").contiguous()
            if t.untyped_storage().data_ptr() in seen:
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
            tensors[name] = t
        return {"kind": self.kind.value, "data": save(tensors)}


class BytesReceiver(BucketReceiver):
    kind = TransportKind.BYTES

    def unpack(self, descriptor: Descriptor) -> NamedTensors:
        from safetensors.torch import load

        # `load` parses into fresh tensors, so they outlive the payload.
        return list(load(bytes(descriptor["data"])).items())


# ---------------------------------------------------------------------------------------------
# CUDA_IPC: colocated trainer and engine on the same GPU


def _device_uuid(device: torch.device | int) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


class CudaIpcSender(BucketSender):
    kind = TransportKind.CUDA_IPC

    def __init__(self) -> None:
        _require_cuda(self.kind)
        self._live: dict[str, torch.Tensor] = {}

    def pack(self, bucket: NamedTensors) -> Descriptor:
        from torch.multiprocessing.reductions import reduce_tensor

        entries, total = plan_layout(bucket)
        device = torch.device("cuda", torch.cuda.current_device())
        flat_U8 = torch.empty(max(total, 1), dtype=torch.uint8, device=device)
        pack_into(flat_U8, [(n, t.to(device)) for n, t in bucket], entries)
        torch.cuda.current_stream().synchronize()  # bytes must be written before a peer reads
        _, ipc_args = reduce_tensor(flat_U8)
        key = uuid.uuid4().hex
        self._live[key] = flat_U8  # the IPC handle is valid only while this tensor lives
        return {
            "kind": self.kind.value,
            "key": key,
            # Keyed by GPU UUID: with TP > 1 the callers all-gather these dicts so each worker
            # opens the buffer on its own GPU (see `merge_cuda_ipc_descriptors`). The handle
            # arguments are pickled because msgpack cannot carry torch dtypes/devices; both ends
            # belong to the same job.
            "handles": {_device_uuid(device): pickle.dumps(ipc_args)},
            "entries": [e.to_wire() for e in entries],
        }

    def release(self, descriptor: Descriptor, retained: bool = False) -> None:
        self._live.pop(descriptor["key"], None)


def merge_cuda_ipc_descriptors(descriptors: list[Descriptor]) -> Descriptor:
    """One descriptor holding the handles of every trainer rank (same bucket layout)."""
    merged = dict(descriptors[0])
    merged["handles"] = {}
    for d in descriptors:
        if d["entries"] != descriptors[0]["entries"]:
            raise ValueError("merge_cuda_ipc_descriptors: ranks packed different buckets")
        merged["handles"].update(d["handles"])
    return merged


class CudaIpcReceiver(BucketReceiver):
    kind = TransportKind.CUDA_IPC

    def unpack(self, descriptor: Descriptor) -> NamedTensors:
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        _require_cuda(self.kind)
        device_index = torch.cuda.current_device()
        own = _device_uuid(device_index)
        if own not in descriptor["handles"]:
            raise TransportUnavailableError(f"cuda_ipc: no buffer was shared for this GPU ({own})")
        args = list(pickle.loads(descriptor["handles"][own]))
        args[6] = device_index  # the sender's device index means nothing in this process
        flat_U8 = rebuild_cuda_tensor(*args)
        # Copy out: the sender frees the buffer right after this call returns, while vLLM keeps
        # the tensors until their layer is complete.
        out = [(name, t.clone()) for name, t in views_of(flat_U8, entries_of(descriptor))]
        torch.cuda.current_stream().synchronize()
        return out


# ---------------------------------------------------------------------------------------------
# NCCL: trainer rank 0 broadcasts to the engine's workers


@dataclasses.dataclass(kw_only=True)
class NcclOptions:
    host: str
    """Address of the trainer rank that sends (rank 0 of the sync group)."""
    port: int
    """Free TCP port on `host` for the group's rendezvous store."""
    num_receivers: int
    """Number of vLLM workers that receive (tensor_parallel_size x pipeline stages x replicas)."""

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"NcclOptions.port must be in 1..65535, got {self.port}")
        if self.num_receivers < 1:
            raise ValueError(f"NcclOptions.num_receivers must be >= 1, got {self.num_receivers}")


def _nccl_group(host: str, port: int, rank: int, world_size: int, device: int) -> Any:
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
    from vllm.distributed.utils import StatelessProcessGroup

    # A stateless group leaves torch.distributed's default group (the trainer's, or vLLM's)
    # untouched, so the trainer and the engine can form a third group between them.
    group = StatelessProcessGroup.create(host=host, port=port, rank=rank, world_size=world_size)
    return PyNcclCommunicator(group, device=device)


class NcclSender(BucketSender):
    """Rank 0 of a sync group; `connect` blocks until every receiver has joined, so call it
    while the engine runs `init_transport` (they are different processes in this layout)."""

    kind = TransportKind.NCCL

    def __init__(self, options: NcclOptions) -> None:
        _require_cuda(self.kind)
        self.options = options
        self._comm: Any = None
        self._live: dict[str, torch.Tensor] = {}

    def init_info(self) -> dict[str, Any]:
        o = self.options
        return {"host": o.host, "port": o.port, "world_size": o.num_receivers + 1}

    def connect(self) -> None:
        o = self.options
        self._comm = _nccl_group(o.host, o.port, 0, o.num_receivers + 1, torch.cuda.current_device())

    def pack(self, bucket: NamedTensors) -> Descriptor:
        if self._comm is None:
            raise RuntimeError("NcclSender.pack before connect()")
        entries, total = plan_layout(bucket)
        device = torch.device("cuda", torch.cuda.current_device())
        flat_U8 = torch.empty(max(total, 1), dtype=torch.uint8, device=device)
        pack_into(flat_U8, [(n, t.to(device)) for n, t in bucket], entries)
        # Enqueued, not waited on: the kernel completes once the receivers post theirs, which
        # they do when the engine handles this descriptor.
        self._comm.broadcast(flat_U8, src=0, stream=torch.cuda.current_stream())
        key = uuid.uuid4().hex
        self._live[key] = flat_U8
        return {"kind": self.kind.value, "key": key, "total_bytes": total,
                "entries": [e.to_wire() for e in entries]}

    def release(self, descriptor: Descriptor, retained: bool = False) -> None:
        torch.cuda.current_stream().synchronize()
        self._live.pop(descriptor["key"], None)

    def close(self) -> None:
        self._comm = None


class NcclReceiver(BucketReceiver):
    kind = TransportKind.NCCL

    def __init__(self) -> None:
        self._comm: Any = None

    def connect(self, init_info: dict[str, Any], worker_rank: int) -> None:
        _require_cuda(self.kind)
        self._comm = _nccl_group(
            init_info["host"], int(init_info["port"]), 1 + worker_rank,
            int(init_info["world_size"]), torch.cuda.current_device(),
        )

    def unpack(self, descriptor: Descriptor) -> NamedTensors:
        if self._comm is None:
            raise RuntimeError("nccl receiver used before init_transport")
        total = int(descriptor["total_bytes"])
        flat_U8 = torch.empty(max(total, 1), dtype=torch.uint8, device=torch.cuda.current_device())
        self._comm.broadcast(flat_U8, src=0, stream=torch.cuda.current_stream())
        torch.cuda.current_stream().synchronize()
        # A fresh buffer per bucket, so views suffice.
        return views_of(flat_U8, entries_of(descriptor))


def _registry() -> tuple[dict[TransportKind, type[BucketSender]],
                         dict[TransportKind, type[BucketReceiver]]]:
    # SHARED_MEMORY lives in its own module, which builds on this one: imported here, late.
    from megatron_ace.rollout.shm_transport import SharedMemoryReceiver, SharedMemorySender

    senders = {
        TransportKind.BYTES: BytesSender,
        TransportKind.SHARED_MEMORY: SharedMemorySender,
        TransportKind.CUDA_IPC: CudaIpcSender,
        TransportKind.NCCL: NcclSender,
    }
    receivers = {
        TransportKind.BYTES: BytesReceiver,
        TransportKind.SHARED_MEMORY: SharedMemoryReceiver,
        TransportKind.CUDA_IPC: CudaIpcReceiver,
        TransportKind.NCCL: NcclReceiver,
    }
    return senders, receivers


def sender_class(kind: TransportKind | str) -> type[BucketSender]:
    return _registry()[0][TransportKind(kind)]


def make_receiver(kind: TransportKind | str) -> BucketReceiver:
    return _registry()[1][TransportKind(kind)]()


def descriptor_kind(descriptor: Descriptor) -> TransportKind:
    try:
        return TransportKind(descriptor["kind"])
    except (KeyError, ValueError):
        raise ValueError(f"bucket descriptor has no valid 'kind': {descriptor.get('kind')!r}") from None


def make_sender(kind: TransportKind | str, **options: Any) -> BucketSender:
    """A sender of `kind`; `options` go to its constructor (NCCL needs `options=NcclOptions`)."""
    return sender_class(kind)(**options)
