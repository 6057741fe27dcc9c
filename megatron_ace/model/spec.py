"""Which Megatron-Core layer spec to build: Transformer Engine when usable, local otherwise.

The one place that decides. Transformer Engine, apex and flash-attn cannot be installed on a
CPU machine, and a half-installed TE raises OSError or RuntimeError (missing libcudart, no
GPU) rather than ImportError, so all three are caught.
"""

from __future__ import annotations

import functools

import torch

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


def layer_spec(spec: Spec):
    """The Megatron-Core `ModuleSpec` of one Qwen2 transformer layer (RMSNorm, SwiGLU, QKV bias)."""
    from megatron.core.models.gpt import gpt_layer_specs

    if spec is Spec.TE:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    return gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
