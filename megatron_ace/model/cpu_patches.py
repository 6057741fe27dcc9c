"""Every CPU workaround for megatron-core, in one place.

megatron-core assumes CUDA: it places buffers with `device="cuda"` or
`torch.cuda.current_device()`, calls `torch.cuda.synchronize()`, and seeds through the CUDA RNG.
On a machine without CUDA (CI, laptops) the same model, TP/PP layouts and pipeline schedule run
on gloo once those calls are redirected to the CPU. Nothing here is applied when CUDA is
available, so GPU runs use upstream megatron-core untouched.

How: the modules listed in `_SHIMMED_MODULES` see a `torch` whose `cuda.current_device()` is
the CPU device, whose factory functions map `device="cuda"` to the CPU, and whose
`cuda.synchronize()` does nothing. Each entry names the upstream lines (megatron-core 0.19.2) it
exists for; drop an entry when upstream stops hard-coding CUDA there. Everything else about
`torch` is the real module.

Not patched on purpose: sequence parallelism (needs Transformer Engine norms; GPU-only) and the
CUDA RNG tracker (the CPU path seeds with `use_cpu_initialization=True` and never calls
`model_parallel_cuda_manual_seed`, see parallel.py).
"""

from __future__ import annotations

import contextlib
import importlib
import types
from typing import Any

import torch

# module -> upstream lines (megatron-core 0.19.2) that hard-code CUDA
_SHIMMED_MODULES: dict[str, str] = {
    "megatron.core.models.common.embeddings.rotary_pos_embedding":
        "rotary_pos_embedding.py:162 moves inv_freq to torch.cuda.current_device()",
    "megatron.core.utils":
        "utils.py:715 GlobalMemoryBuffer.get_tensor allocates on cuda",
    "megatron.core.transformer.utils":
        "transformer/utils.py:39 get_default_causal_mask uses device='cuda'",
    "megatron.core.pipeline_parallel.schedules":
        "schedules.py:749,1121,2292 torch.zeros(..., device='cuda') token counters",
    "megatron.core.pipeline_parallel.p2p_communication":
        "p2p_communication.py:211-223,334,342 buffers on current_device; :263,:419 synchronize",
    "megatron.core.tensor_parallel.mappings":
        "mappings.py:95,145,152,185,447 gather buffers on current_device",
    "megatron.core.tensor_parallel.layers":
        "layers.py:305,647,708,718,1000,1041 weights/buffers on current_device",
    "megatron.core.tensor_parallel.cross_entropy":
        "cross_entropy.py vocab-parallel CE scratch tensors (defensive)",
    "megatron.core.transformer.attention":
        "attention.py:530,846 inference/rotary buffers on current_device",
    "megatron.core.transformer.dot_product_attention":
        "dot_product_attention.py:123,132 attention scores buffer on current_device",
    "megatron.core.models.gpt.gpt_model":
        "gpt_model.py:452 MTP / loss buffers on current_device",
    "megatron.core.transformer.transformer_layer":
        "transformer_layer.py:1118,1376 buffers on current_device",
}

# (module, class, method) -> upstream line: methods that call `Tensor.cuda()` directly; on CPU
# `Tensor.cuda` is the identity for the duration of the call.
_TENSOR_CUDA_METHODS: dict[tuple[str, str, str], str] = {
    ("megatron.core.models.common.language_module.language_module", "LanguageModule",
     "setup_embeddings_and_output_layer"):
        "language_module.py:307 weight.data.cuda() when tying embeddings across PP stages",
}

_CPU = torch.device("cpu")
_applied = False


def _to_cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int) or str(device).startswith("cuda"):
        return _CPU
    return device


class _CpuCuda(types.SimpleNamespace):
    """`torch.cuda` as the shimmed modules see it: the current device is the CPU."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device():
        return _CPU

    @staticmethod
    def synchronize(*_args, **_kwargs):
        return None


def _wrap_factory(fn):
    def factory(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    factory.__name__ = getattr(fn, "__name__", "factory")
    return factory


class _CpuTorch(types.ModuleType):
    """`torch` as the shimmed modules see it; every attribute not overridden is the real one."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CpuCuda()
        for name in ("zeros", "ones", "empty", "full", "tensor", "arange", "randn", "rand",
                     "zeros_like", "empty_like", "ones_like"):
            setattr(self, name, _wrap_factory(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


def apply_cpu_patches() -> bool:
    """Redirect megatron-core's hard-coded CUDA calls to the CPU. Idempotent.

    Returns True when patches are in effect (no CUDA), False on a CUDA machine.
    """
    global _applied
    if torch.cuda.is_available():
        return False
    if _applied:
        return True
    shim = _CpuTorch()
    for module_name in _SHIMMED_MODULES:
        module = importlib.import_module(module_name)
        if getattr(module, "torch", None) is torch:
            module.torch = shim
    for (module_name, cls_name, method), _why in _TENSOR_CUDA_METHODS.items():
        cls = getattr(importlib.import_module(module_name), cls_name)
        setattr(cls, method, _tensor_cuda_is_identity(getattr(cls, method)))
    _applied = True
    return True


def _tensor_cuda_is_identity(fn):
    def wrapper(*args, **kwargs):
        original = torch.Tensor.cuda
        torch.Tensor.cuda = lambda self, *a, **k: self
        try:
            return fn(*args, **kwargs)
        finally:
            torch.Tensor.cuda = original

    wrapper.__name__ = fn.__name__
    wrapper.__wrapped__ = fn
    return wrapper


# ---- optimizer path (optim.backend=mcore on CPU) ---------------------------------------------
_OPTIMIZER_SHIMMED_MODULES: dict[str, str] = {
    "megatron.core.distributed.param_and_grad_buffer":
        "param_and_grad_buffer.py:1186 buffers on torch.cuda.current_device()",
    "megatron.core.distributed.distributed_data_parallel":
        "distributed_data_parallel.py stream / current_device calls",
    "megatron.core.distributed.finalize_model_grads":
        "finalize_model_grads.py num_tokens / norm buffers on cuda",
    "megatron.core.optimizer.optimizer":
        "optimizer.py found_inf / grad-norm buffers on cuda",
    "megatron.core.optimizer.distrib_optimizer":
        "distrib_optimizer.py shard buffers on current_device",
    "megatron.core.optimizer.clip_grads":
        "clip_grads.py total_norm / dummy_overflow_buf on cuda",
}


class _CpuStream:
    """A no-op CUDA stream: CPU work is synchronous (param_and_grad_buffer.py:632 waits on it)."""

    def wait_event(self, *_args: Any) -> None:
        return None

    def wait_stream(self, *_args: Any) -> None:
        return None


def _cpu_cuda_with_streams():
    """`torch.cuda` for the shimmed modules, plus streams and the allocator as CPU no-ops."""

    class CpuCudaStreams(_CpuCuda):
        @staticmethod
        def current_stream(*_args: Any, **_kwargs: Any) -> _CpuStream:
            return _CpuStream()

        @staticmethod
        def stream(*_args: Any, **_kwargs: Any):
            return contextlib.nullcontext()

        @staticmethod
        def empty_cache() -> None:
            return None

    return CpuCudaStreams()


def _clip_grad_by_total_norm_cpu(parameters: Any, max_norm: float, total_norm: float,
                                 use_decoupled_grad: bool = False) -> None:
    """clip_grads.py:174 asserts `grad.type() == 'torch.cuda.FloatTensor'` and scales through
    a CUDA multi-tensor kernel; the same scaling, on any device."""
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    coeff = max_norm / (total_norm + 1.0e-6)
    if isinstance(coeff, torch.Tensor):
        coeff = coeff.clamp_max(1.0)
    elif coeff >= 1.0:
        return
    with torch.no_grad():
        for param in parameters:
            grad = getattr(param, attr, None)
            if grad is not None:
                grad.mul_(coeff)


# DistributedOptimizer methods that accept only CUDA tensor types: `param.type()` is compared
# with 'torch.cuda.FloatTensor' / '...HalfTensor' / '...BFloat16Tensor'. On CPU the call reports
# the CUDA name of the same dtype for the duration of these methods.
_CUDA_TYPE_CHECKS: dict[str, str] = {
    "_build_model_and_main_param_groups":
        "distrib_optimizer.py:401,466 model_param.type() == 'torch.cuda.FloatTensor' else TypeError",
    "__init__": "distrib_optimizer.py:758 param.type() in ['torch.cuda.HalfTensor', ...]",
}


def _tensor_type_reports_cuda(fn):
    def wrapper(*args, **kwargs):
        original = torch.Tensor.type

        def cuda_type(self, *a, **k):
            name = original(self, *a, **k)
            if a or k or not isinstance(name, str) or not name.startswith("torch.") or ".cuda." in name:
                return name
            return "torch.cuda." + name[len("torch."):]

        torch.Tensor.type = cuda_type
        try:
            return fn(*args, **kwargs)
        finally:
            torch.Tensor.type = original

    wrapper.__name__ = fn.__name__
    wrapper.__wrapped__ = fn
    return wrapper


def _step_key_tolerated(fn):
    """distrib_optimizer.py:1229-1232 (`_set_main_param_and_optimizer_states`) copies every tensor
    of the inner optimizer's state from the loaded tensors, `step` included, but the
    fully_reshardable loader (:2392) leaves `step` out: a KeyError with torch's AdamW (TE's and
    apex's Adam hold no `step` tensor). A missing key is skipped like a non-tensor one."""

    def wrapper(self, model_param, tensors):
        return fn(self, model_param, {"step": None, **tensors})

    wrapper.__name__ = fn.__name__
    wrapper.__wrapped__ = fn
    return wrapper


def _patch_distributed_optimizer() -> None:
    cls = importlib.import_module("megatron.core.optimizer.distrib_optimizer").DistributedOptimizer
    for name in _CUDA_TYPE_CHECKS:
        method = cls.__dict__[name]
        if isinstance(method, classmethod):
            setattr(cls, name, classmethod(_tensor_type_reports_cuda(method.__func__)))
        else:
            setattr(cls, name, _tensor_type_reports_cuda(method))
    cls._set_main_param_and_optimizer_states = _step_key_tolerated(
        cls._set_main_param_and_optimizer_states)


_optimizer_applied = False


def _shim_torch_in(module_names) -> None:
    """Point each module's `torch` at a CPU shim whose `torch.cuda` has CPU streams."""
    shim = _CpuTorch()
    shim.cuda = _cpu_cuda_with_streams()
    for module_name in module_names:
        module = importlib.import_module(module_name)
        if getattr(module, "torch", None) is torch:
            module.torch = shim


def apply_optimizer_cpu_patches() -> bool:
    """The optimizer path's CUDA redirections (DDP wrapper, megatron optimizers). Idempotent.

    Only needed for `optim.backend=mcore` on CPU; the default CPU optimizer (torch AdamW) needs
    none. Returns False on a CUDA machine (nothing patched).
    """
    global _optimizer_applied
    if torch.cuda.is_available():
        return False
    apply_cpu_patches()
    if _optimizer_applied:
        return True
    _shim_torch_in(_OPTIMIZER_SHIMMED_MODULES)
    # optimizer.py imports the function by name; replace it where it is called.
    importlib.import_module("megatron.core.optimizer.optimizer").clip_grad_by_total_norm_fp32 = \
        _clip_grad_by_total_norm_cpu
    _patch_distributed_optimizer()
    _optimizer_applied = True
    return True


# ---- distributed checkpointing (megatron.core.dist_checkpointing on CPU) --------------------
_CHECKPOINT_SHIMMED_MODULES: dict[str, str] = {
    "megatron.core.dist_checkpointing.strategies.filesystem_async":
        "filesystem_async.py:248 preload_tensors calls torch.cuda.synchronize",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver":
        "state_dict_saver.py:204,252 failure/reuse flags on cuda",
    "megatron.core.dist_checkpointing.strategies.fully_parallel":
        "fully_parallel.py:287,296 torch.cuda.synchronize around the load exchange",
    "megatron.core.dist_checkpointing.strategies.async_utils":
        "async_utils.py:224,273,698 done flags on current_device; synchronize before fork",
    "megatron.core.dist_checkpointing.exchange_utils":
        "exchange_utils.py:103,109,329 exchange buffers on device='cuda'",
}

# exchange_utils functions that move loaded shards with `Tensor.cuda()` (exchange_utils.py:339,
# :506) and allocate missing shards with `ShardedTensor.init_data("cuda")` (:97, :105).
_CHECKPOINT_CUDA_FUNCTIONS: dict[tuple[str, str], str] = {
    ("megatron.core.dist_checkpointing.exchange_utils", "exchange_loaded_tensors_gather_rounds"):
        "exchange_utils.py:339 all_loaded_tensors[shard_id].cuda()",
    ("megatron.core.dist_checkpointing.exchange_utils", "exchange_loaded_tensors_broadcast"):
        "exchange_utils.py:506 all_loaded_tensors[shard_id].cuda()",
}
_checkpoint_applied = False


def _init_data_on_cpu(fn):
    """ShardedTensor.init_data(device) with a CUDA device mapped to the CPU (mapping.py:260)."""

    def init_data(self, device, init_fn=torch.empty):
        return fn(self, _to_cpu_device(device), init_fn)

    init_data.__wrapped__ = fn
    return init_data


def apply_checkpoint_cpu_patches() -> bool:
    """CPU redirections of megatron-core's distributed checkpointing (torch_dist save/load,
    fully parallel strategies, the fork-based async writer). Idempotent; False with CUDA."""
    global _checkpoint_applied
    if torch.cuda.is_available():
        return False
    apply_cpu_patches()
    if _checkpoint_applied:
        return True
    _shim_torch_in(_CHECKPOINT_SHIMMED_MODULES)
    for (module_name, fn_name), _why in _CHECKPOINT_CUDA_FUNCTIONS.items():
        module = importlib.import_module(module_name)
        setattr(module, fn_name, _tensor_cuda_is_identity(getattr(module, fn_name)))
    mapping = importlib.import_module("megatron.core.dist_checkpointing.mapping")
    mapping.ShardedTensor.init_data = _init_data_on_cpu(mapping.ShardedTensor.init_data)
    _checkpoint_applied = True
    return True
