"""Which Megatron-Core layer spec to build: Transformer Engine when usable, local otherwise.

The one place that decides. Transformer Engine, apex and flash-attn cannot be installed on a
CPU machine, and a half-installed TE raises OSError or RuntimeError (missing libcudart, no
GPU) rather than ImportError, so all three are caught.
"""

from __future__ import annotations

import functools

import torch

from megatron_ace.model.attention import CoreAttention, sdpa_core_attention_cls
from megatron_ace.model.mapping import Spec
from megatron_ace.utils.logging import get_logger

log = get_logger(__name__)


@functools.cache
def te_usable() -> bool:
    """True when Transformer Engine imports and a CUDA device is present."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except (ImportError, OSError, RuntimeError) as exc:
        log.warning("Transformer Engine unusable (%s): using the local layer spec", exc)
        return False
    return True


def choose_spec(requested: Spec | None = None) -> Spec:
    """Resolve the layer spec: an explicit request wins; TE is refused where it cannot run."""
    if requested is Spec.TE and not te_usable():
        raise ValueError("model.spec=te requested but Transformer Engine is not usable here")
    if requested is not None:
        return requested
    return Spec.TE if te_usable() else Spec.LOCAL


def layer_spec(spec: Spec, core_attention: CoreAttention = CoreAttention.SDPA):
    """The Megatron-Core `ModuleSpec` of one Qwen2 transformer layer (RMSNorm, SwiGLU, QKV bias).

    `core_attention` applies to the local spec only (the TE spec uses TE's attention). The
    attention module holds no parameters, so the choice never changes checkpoint names.
    """
    from megatron.core.models.gpt import gpt_layer_specs

    if spec is Spec.TE:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    layer = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    if core_attention is CoreAttention.SDPA:
        layer.submodules.self_attention.submodules.core_attention = sdpa_core_attention_cls()
    return layer


def supports_packed_thd(spec: Spec, core_attention: CoreAttention) -> bool:
    """Whether the model takes packed rows as THD (cu_seqlens) instead of a dense mask."""
    return spec is Spec.TE or core_attention is CoreAttention.SDPA
