"""SHARED_MEMORY transport: weights reach an engine on the same host through tmpfs files.

Two ways, mixed freely within one bucket:

- copied: the bucket's tensors are written into a bucket file that is reused from bucket to
  bucket and across syncs (one memcpy, no page faults once warm); the engine keeps the file
  mapped and gets views on it (no parse, no copy).
- shared: tensors whose bytes already lie in a *parameter file* are not copied at all; the
  descriptor says where they lie (file, element offset, shape, strides) and the engine reads
  them there. `SharedMemorySender.share_tensors(model.parameters())` moves the trainer's
  parameters into such a file once (`param.data` becomes a view of it). At TP1 the HF-named
  tensors of a sync are views of the parameters (all but the q/k/v split, which the gather
  copies), so a sync then copies almost nothing on the trainer's side.

The engine maps a parameter file shared and read-only: it always reads the trainer's current
bytes, and a write into them (a bug: vLLM's loaders copy from the tensors they are given) faults
instead of changing the trainer's weights. Once an update is finished the engine must hold no
view of a parameter file any more (vLLM's layerwise reload copies every weight into its own
storage); `SharedMemoryReceiver.finished` checks that, since a view kept past the update would
follow the trainer's later optimizer steps.

Any normal exit of the sender's process, an exception included, removes its files. A process
killed outright (SIGKILL) leaves them (`ace-bucket-<pid>-*`, `ace-params-<pid>-*`): the next
sender in the same directory removes those whose pid names no running process (a resumed run
cleans up after the run it replaces). Files of a process in another pid namespace sharing the
directory would look stale too: give such jobs directories of their own.

What this module does not do: decide bucket boundaries, or validate names or shapes (the worker
does).
"""

from __future__ import annotations

import dataclasses
import errno
import mmap
import os
import re
import threading
import uuid
import warnings
import weakref
from collections.abc import Iterable
from typing import Any

import torch

from megatron_ace.rollout.transport import (
    BucketReceiver,
    BucketSender,
    Descriptor,
    NamedTensors,
    TransportKind,
    dtype_from_name,
    dtype_name,
    entries_of,
    pack_into,
    plan_layout,
    views_of,
)
from megatron_ace.utils.logging import get_logger

log = get_logger(__name__)


@dataclasses.dataclass(kw_only=True)
class SharedMemoryOptions:
    directory: str = "/dev/shm"
    """tmpfs directory for bucket files; must be visible to the engine's workers."""
    reuse_files: bool = True
    """Keep bucket files (and the sender's mappings of them) from one bucket to the next and
    across syncs: their pages are allocated and faulted in once, so packing a bucket is one
    memcpy (a fresh tmpfs file costs ~3x that in page allocation, zeroing and freeing). The
    files, each about max(bucket, largest tensor), stay in tmpfs until `close()`. False: a
    fresh file per bucket, unlinked once loaded (nothing held between syncs)."""
    max_files: int = 1
    """Files kept for reuse: 1 when buckets go one at a time, 2 when the next bucket is packed
    while the engine loads the current one."""
    min_file_bytes: int = 0
    """Smallest size of a new file: the bucket bound, so that any later bucket fits a kept file
    (tmpfs allocates a page only when it is first written)."""

    def __post_init__(self) -> None:
        if not os.path.isdir(self.directory):
            raise ValueError(f"SharedMemoryOptions.directory: {self.directory!r} is not a directory")
        if self.max_files < 1:
            raise ValueError(f"SharedMemoryOptions.max_files must be >= 1, got {self.max_files}")
        if self.min_file_bytes < 0:
            raise ValueError(
                f"SharedMemoryOptions.min_file_bytes must be >= 0, got {self.min_file_bytes}")


@dataclasses.dataclass
class _ShmFile:
    """A tmpfs file and the sender's shared mapping of it."""

    path: str
    flat_U8: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.flat_U8.numel()


@dataclasses.dataclass(frozen=True)
class SharedEntry:
    """A tensor read where it lies in a parameter file: a strided view, in elements."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    file: int
    """Index into the descriptor's `shared_files`."""
    offset: int
    """Storage offset in elements of `dtype` from the start of the file."""

    def to_wire(self) -> list[Any]:
        return [self.name, self.dtype, list(self.shape), list(self.stride), self.file, self.offset]

    @classmethod
    def from_wire(cls, item: list[Any]) -> SharedEntry:
        name, dtype, shape, stride, file, offset = item
        return cls(name, dtype, tuple(int(s) for s in shape), tuple(int(s) for s in stride),
                   int(file), int(offset))


def _extent_bytes(tensor: torch.Tensor) -> int:
    """Bytes from the tensor's first element to just past its last one (strides >= 0)."""
    last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    return (last + 1) * tensor.element_size()


class SharedMemorySender(BucketSender):
    """Writes each bucket into a tmpfs file that the engine maps, except tensors that already
    lie in a parameter file (see `share_tensors`), which are described instead.

    With `reuse_files`, bucket files serve bucket after bucket and sync after sync. A file is
    written again only after the engine has reported (`release(..., retained=False)`) that
    nothing of its previous bucket is referenced any more. A retained file is retired instead:
    unlinked, never written again, freed by the kernel once the engine drops its mapping
    (vLLM's layerwise reload keeps a module's first tensors until its last one arrives, so a
    module split across buckets pins the first part; `iter_buckets` avoids such cuts in model
    order). A bucket larger than every idle file gets a new file of its size; of the idle
    files, the largest `max_files` are kept.
    """

    kind = TransportKind.SHARED_MEMORY
    concurrent_pack = True  # the file bookkeeping is locked; each bucket has its own file

    def __init__(self, options: SharedMemoryOptions | None = None) -> None:
        self.options = options or SharedMemoryOptions()
        self._lock = threading.Lock()
        self._idle: list[_ShmFile] = []
        """Reusable bucket files holding no bucket, at most `max_files`."""
        self._busy: dict[str, _ShmFile] = {}
        """Bucket files holding a bucket the engine has not released yet, by path."""
        self._params: list[_ShmFile] = []
        """Parameter files (`share_tensors`), kept until `close()`."""
        self.files_created = 0
        """Bucket files created so far (1 or 2 after any number of syncs when all were reused)."""
        self._paths: set[str] = set()
        # Files outlive a sync: remove them even if the owner forgets `close()` or the
        # interpreter exits on an exception.
        self._finalizer = weakref.finalize(self, _unlink_all, self._paths)
        remove_stale_files(self.options.directory)

    @property
    def held_bytes(self) -> int:
        """tmpfs memory of this sender's bucket files now (between syncs: the files kept for
        reuse), pages written so far; parameter files are the parameters themselves, see
        `shared_bytes`."""
        with self._lock:
            return sum(_allocated_bytes(f) for f in [*self._busy.values(), *self._idle])

    @property
    def shared_bytes(self) -> int:
        """tmpfs bytes of the parameter files (the shared tensors' own memory, not extra)."""
        return sum(f.nbytes for f in self._params)

    def _new_file(self, nbytes: int, prefix: str = "ace-bucket") -> _ShmFile:
        free = _free_bytes(self.options.directory)
        if free is not None and nbytes > free:
            # tmpfs files are sparse: a write past the room left would kill us with SIGBUS.
            raise OSError(errno.ENOSPC, f"{self.options.directory} has {free / 1e6:.1f} MB free, "
                          f"a bucket file needs {nbytes / 1e6:.1f} MB (lower the bucket size or "
                          "give the tmpfs more room)")
        path = os.path.join(self.options.directory, f"{prefix}-{os.getpid()}-{uuid.uuid4().hex}")
        self._paths.add(path)
        storage = torch.UntypedStorage.from_file(path, shared=True, nbytes=nbytes)
        return _ShmFile(path, torch.empty(0, dtype=torch.uint8).set_(storage))

    def _unlink(self, path: str) -> None:
        self._paths.discard(path)
        _unlink_all([path])

    # ---- parameters read where they lie ------------------------------------------------------

    def share_tensors(self, tensors: Iterable[torch.Tensor]) -> int:
        """Move the bytes of `tensors` (e.g. `model.parameters()`) into one new parameter file,
        in place (`tensor.data` becomes a view of it: values, identity, autograd and optimizer
        state are unchanged), so that buckets holding them or views of them are described
        rather than copied. Returns the bytes moved.

        Only CPU tensors that are the sole owner of their whole storage move; others (views into
        a larger buffer, such as a distributed optimizer's, or storages another tensor also
        refers to) are left where they are and keep being copied, as is everything when the
        directory has too little free space."""
        movable = [t for t in _unique(tensors) if self._locate(t) is None and _sole_owner(t)]
        entries, total = plan_layout([("", t) for t in movable])
        if total == 0:
            return 0
        free = _free_bytes(self.options.directory)
        if free is not None and total > free:
            log.warning("weight sync: %s has %.1f MB free, sharing the parameters needs %.1f MB; "
                        "they are copied at every sync instead", self.options.directory,
                        free / 1e6, total / 1e6)
            return 0
        shm = self._new_file(total, prefix="ace-params")
        pack_into(shm.flat_U8, [("", t) for t in movable], entries)
        with torch.no_grad():
            for tensor, entry in zip(movable, entries, strict=True):
                slot = shm.flat_U8[entry.offset : entry.offset + entry.nbytes]
                tensor.data = slot.view(tensor.dtype).view(entry.shape)
        self._params.append(shm)
        log.info("weight sync: %d tensors (%.1f MB) moved into %s, read by the engine where they lie",
                 len(movable), total / 1e6, shm.path)
        return total

    def _locate(self, tensor: torch.Tensor) -> tuple[int, int] | None:
        """(parameter file index, element offset) of a tensor lying wholly in a parameter file."""
        if tensor.device.type != "cpu" or tensor.numel() == 0:
            return None
        start = tensor.data_ptr()
        for index, shm in enumerate(self._params):
            base = shm.flat_U8.data_ptr()
            if base <= start and start + _extent_bytes(tensor) <= base + shm.nbytes:
                offset, misaligned = divmod(start - base, tensor.element_size())
                return None if misaligned else (index, offset)
        return None

    def copied_bytes(self, tensor: torch.Tensor) -> int:
        return 0 if self._locate(tensor) is not None else tensor.numel() * tensor.element_size()

    # ---- buckets -----------------------------------------------------------------------------

    def _take_file(self, total: int) -> _ShmFile:
        """The smallest idle file that fits, else a new one."""
        with self._lock:
            fitting = [f for f in self._idle if f.nbytes >= total]
            if fitting:
                shm = min(fitting, key=lambda f: f.nbytes)
                self._idle.remove(shm)
            else:
                shm = self._new_file(max(total, self.options.min_file_bytes, 1))
                self.files_created += 1
            self._busy[shm.path] = shm
            return shm

    def pack(self, bucket: NamedTensors) -> Descriptor:
        copied: NamedTensors = []
        shared: list[SharedEntry] = []
        files: dict[int, int] = {}  # parameter file index -> index in this descriptor
        for name, tensor in bucket:
            where = self._locate(tensor)
            if where is None:
                copied.append((name, tensor))
                continue
            file = files.setdefault(where[0], len(files))
            shared.append(SharedEntry(name, dtype_name(tensor.dtype), tuple(tensor.shape),
                                      tuple(tensor.stride()), file, where[1]))
        descriptor: Descriptor = {
            "kind": self.kind.value, "path": "", "total_bytes": 0, "file_bytes": 0,
            "reused": self.options.reuse_files, "entries": [],
            "shared_files": [[self._params[i].path, self._params[i].nbytes] for i in files],
            "shared_entries": [e.to_wire() for e in shared],
            "shared_bytes": _nbytes(bucket) - _nbytes(copied),
        }
        if copied:
            entries, total = plan_layout(copied)
            if self.options.reuse_files:
                shm = self._take_file(total)
            else:
                with self._lock:
                    shm = self._new_file(max(total, 1))
                    self.files_created += 1
            pack_into(shm.flat_U8, copied, entries)
            # Without reuse the mapping goes with `shm` (MAP_SHARED: the bytes are in the file).
            descriptor.update(path=shm.path, total_bytes=total, file_bytes=shm.nbytes,
                              entries=[e.to_wire() for e in entries])
        return descriptor

    def release(self, descriptor: Descriptor, retained: bool = False) -> None:
        # Unlinking is safe while the worker still maps the file: tmpfs keeps the pages until
        # the last mapping goes, and no one else can open it any more.
        if not descriptor["path"]:
            return  # nothing was copied: parameter files are never retired by a bucket
        with self._lock:
            shm = self._busy.pop(descriptor["path"], None)
            if shm is None or retained:  # retained, or a one-off file (not reused)
                self._unlink(descriptor["path"])
                return
            # Keep the largest `max_files` idle files: any bucket fits one of them next time.
            self._idle.append(shm)
            self._idle.sort(key=lambda f: f.nbytes, reverse=True)
            for extra in self._idle[self.options.max_files:]:
                self._unlink(extra.path)
            del self._idle[self.options.max_files:]

    def close(self) -> None:
        """Remove every file. Shared tensors stay valid: their mapping holds the pages."""
        with self._lock:
            self._busy.clear()
            self._idle.clear()
            self._finalizer()


def _nbytes(named: NamedTensors) -> int:
    return sum(t.numel() * t.element_size() for _, t in named)


def _unique(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """`tensors` without repeats of one object (tied weights appear once in
    `model.parameters()`, but a caller's list may repeat them)."""
    seen: set[int] = set()
    out = []
    for tensor in tensors:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"share_tensors: expected tensors, got {type(tensor).__name__}")
        if id(tensor) not in seen:
            seen.add(id(tensor))
            out.append(tensor)
    return out


def _sole_owner(tensor: torch.Tensor) -> bool:
    """The tensor covers its whole storage and no other tensor refers to that storage, so
    moving it cannot break an alias (False where torch does not tell)."""
    if tensor.device.type != "cpu" or tensor.numel() == 0 or not tensor.is_contiguous():
        return False
    storage = tensor.untyped_storage()
    if tensor.storage_offset() != 0 or storage.nbytes() != tensor.numel() * tensor.element_size():
        return False
    count = _storage_use_count(storage)
    return count is not None and count <= 2  # the tensor and `storage` here


_FILE_NAME = re.compile(r"^ace-(?:bucket|params)-(\d+)-[0-9a-f]{32}$")
"""Names of this module's files: kind, the creating process's pid, a random id."""


def remove_stale_files(directory: str) -> int:
    """Remove the files of senders whose process no longer runs (killed outright); returns how
    many were removed."""
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    removed = 0
    for name in names:
        match = _FILE_NAME.match(name)
        if match is None or _running(int(match.group(1))):
            continue
        try:
            os.unlink(os.path.join(directory, name))
            removed += 1
        except OSError:
            pass  # another sender removed it first, or it is not ours to remove
    if removed:
        log.info("weight sync: removed %d file(s) left in %s by killed processes", removed,
                 directory)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _allocated_bytes(shm: _ShmFile) -> int:
    """Memory a tmpfs file takes: its pages written so far (files are sparse until written)."""
    try:
        return min(os.stat(shm.path).st_blocks * 512, shm.nbytes)
    except OSError:
        return shm.nbytes


def _free_bytes(directory: str) -> int | None:
    try:
        stat = os.statvfs(directory)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


def _unlink_all(paths) -> None:
    for path in list(paths):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    if isinstance(paths, set):
        paths.clear()


class SharedMemoryReceiver(BucketReceiver):
    """Maps bucket and parameter files and hands out views on them (no parse, no copy).

    A bucket file the sender keeps for reuse stays mapped here too (shared, so its rewrites
    show), which spares the page-table set-up and tear-down of a fresh mapping per bucket; such
    a mapping is dropped once the sender unlinks its file (checked at every `unpack`) or once a
    bucket in it is retained (the sender retires that file; the views keep what they need). A
    one-off bucket file is mapped copy-on-write for its bucket only. Parameter files stay
    mapped read-only until the sender removes them.
    """

    kind = TransportKind.SHARED_MEMORY

    def __init__(self) -> None:
        self._kept: dict[str, torch.UntypedStorage] = {}
        """Mappings of the sender's reused bucket files, by path."""
        self._params: dict[str, tuple[torch.Tensor, int | None]] = {}
        """Read-only mappings of parameter files, by path, with their reference count when
        no view of them exists."""
        self._open: dict[str, tuple[torch.UntypedStorage, int | None]] = {}
        """Mapping of each unpacked, not yet `loaded` bucket file, with its reference count
        before any tensor viewed it."""

    def _forget_unlinked(self) -> None:
        for kept in (self._kept, self._params):
            for stale in [p for p in kept if not os.path.exists(p)]:
                del kept[stale]  # the sender unlinked it: the mapping is all that holds it

    def _storage(self, descriptor: Descriptor) -> torch.UntypedStorage:
        path, total = descriptor["path"], int(descriptor["total_bytes"])
        if not descriptor.get("reused"):
            # Copy-on-write: nothing the engine does can write into the sender's file, and the
            # views stay valid after the sender unlinks it.
            return torch.UntypedStorage.from_file(path, shared=False, nbytes=max(total, 1))
        storage = self._kept.get(path)
        if storage is None or storage.nbytes() < total:
            file_bytes = max(int(descriptor.get("file_bytes", total)), total, 1)
            storage = torch.UntypedStorage.from_file(path, shared=True, nbytes=file_bytes)
            self._kept[path] = storage
        return storage

    def _param_file(self, path: str, nbytes: int) -> torch.Tensor:
        if path not in self._params:
            flat_U8 = _map_read_only(path, nbytes)
            self._params[path] = (flat_U8, _storage_use_count(flat_U8.untyped_storage()))
        return self._params[path][0]

    def unpack(self, descriptor: Descriptor) -> NamedTensors:
        self._forget_unlinked()
        out: NamedTensors = []
        if descriptor["path"]:
            storage = self._storage(descriptor)
            self._open[descriptor["path"]] = (storage, _storage_use_count(storage))
            flat_U8 = torch.empty(0, dtype=torch.uint8).set_(storage)
            out = views_of(flat_U8, entries_of(descriptor))
        files = [self._param_file(p, int(n)) for p, n in descriptor.get("shared_files", [])]
        for item in descriptor.get("shared_entries", []):
            e = SharedEntry.from_wire(item)
            typed = files[e.file].view(dtype_from_name(e.dtype))
            # as_strided checks that the view stays inside the file.
            out.append((e.name, typed.as_strided(e.shape, e.stride, e.offset)))
        return out

    def loaded(self, descriptor: Descriptor) -> bool:
        storage, base = self._open.pop(descriptor["path"], (None, None))
        if storage is None:
            return False
        count = _storage_use_count(storage)
        retained = count is None or base is None or count > base
        if retained:
            self._kept.pop(descriptor["path"], None)  # the sender retires this file
        return retained

    def finished(self) -> None:
        held = [path for path, (flat_U8, base) in self._params.items()
                if base is not None and (_storage_use_count(flat_U8.untyped_storage()) or 0) > base]
        if held:
            raise RuntimeError(
                f"the engine still references the trainer's parameter file(s) {held} after the "
                "update: its weights would follow the trainer's next steps")


def _map_read_only(path: str, nbytes: int) -> torch.Tensor:
    """The file as a flat uint8 tensor on a shared, read-only mapping: it always shows the
    file's current bytes, and a write through it faults (SIGSEGV) instead of changing them."""
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), nbytes, access=mmap.ACCESS_READ)
    with warnings.catch_warnings():
        # torch warns that it cannot mark the tensor read-only; the mapping enforces it.
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(mapping, dtype=torch.uint8)  # keeps `mapping` alive


def _storage_use_count(storage: torch.UntypedStorage) -> int | None:
    """How many tensors and handles share `storage` (None where torch does not say: then every
    bucket counts as retained, which is safe and only costs the file reuse)."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None:
        return None
    try:
        return int(count(storage._cdata))
    except (AttributeError, RuntimeError, TypeError):
        return None
