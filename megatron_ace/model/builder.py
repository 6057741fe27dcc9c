"""Build a Qwen2 / Qwen2.5 model on Megatron-Core.

GPTModel rather than HybridModel, on purpose: in megatron-core 0.19 GPTModel logs a
deprecation notice, but it expresses a dense Qwen2 directly with both the local and the
Transformer Engine layer specs, its parameter names (`decoder.layers.{i}...`) are the ones every
Megatron-LM / NeMo checkpoint and tool uses, and HybridModel's shipped specs are TE-only (its
stack hard-codes TENorm) with a different layer layout (attention and MLP as separate layers).
Logits of the two were identical in a probe. The tested range is pinned in setup.py
(megatron-core >= 0.19.2, < 0.20).

One model chunk per pipeline stage (no virtual pipeline). The vocabulary is padded so every TP
rank holds the same number of rows (`mapping.padded_vocab_size`); the padded logits are never
sampled because the loss and logprob code ignore columns >= the real vocabulary.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from megatron_ace.model.attention import CoreAttention
from megatron_ace.model.config import Qwen2Config
from megatron_ace.model.mapping import Spec, padded_vocab_size
from megatron_ace.model.parallel import ParallelState
from megatron_ace.model.spec import choose_spec, layer_spec, te_usable


def transformer_config(cfg: Qwen2Config, ps: ParallelState, *, dtype: torch.dtype,
                       **overrides: Any):
    """The Megatron-Core TransformerConfig of a Qwen2 model under a parallel layout."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    on_gpu = torch.cuda.is_available()
    # Persistent layer norm and the fused masked softmax exist only in TE / apex builds; on a GPU
    # without them megatron-core's torch norm asserts and the fused softmax import fails.
    fused_kernels = on_gpu and te_usable()
    kwargs: dict[str, Any] = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps,
        gated_linear_unit=True,  # SwiGLU
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=True,  # Qwen2 keeps biases on q, k, v only
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        tensor_model_parallel_size=ps.tp_size,
        pipeline_model_parallel_size=ps.pp_size,
        context_parallel_size=ps.cp_size,
        sequence_parallel=ps.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        attention_softmax_in_fp32=True,
        # Fused kernels exist only on GPU; on CPU the unfused paths are the reference.
        use_cpu_initialization=not on_gpu,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=on_gpu,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=fused_kernels,
        apply_rope_fusion=False,
        persist_layer_norm=fused_kernels,
        cross_entropy_loss_fusion=False,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_model(cfg: Qwen2Config, ps: ParallelState, *, dtype: torch.dtype = torch.float32,
                spec: Spec | None = None, make_vocab_size_divisible_by: int = 128,
                core_attention: CoreAttention = CoreAttention.SDPA, **config_overrides: Any):
    """This rank's GPTModel chunk for `cfg` under layout `ps` (weights randomly initialised).

    `core_attention` picks the local spec's attention (see model/attention.py);
    `config_overrides` go to TransformerConfig (e.g. recompute settings).
    """
    from megatron.core.models.gpt import GPTModel

    resolved = choose_spec(spec)
    tcfg = transformer_config(cfg, ps, dtype=dtype, **config_overrides)
    # GPTModel's deprecation notice is logged on every construction; it is known (see above).
    gpt_logger = logging.getLogger("megatron.core.models.gpt.gpt_model")
    level = gpt_logger.level
    gpt_logger.setLevel(logging.ERROR)
    try:
        model = GPTModel(
            config=tcfg,
            transformer_layer_spec=layer_spec(resolved, core_attention),
            vocab_size=padded_vocab_size(cfg.vocab_size, ps.tp_size, make_vocab_size_divisible_by),
            max_sequence_length=cfg.max_position_embeddings,
            pre_process=ps.is_first_stage,
            post_process=ps.is_last_stage,
            share_embeddings_and_output_weights=cfg.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=int(cfg.rope_theta),
            parallel_output=True,
            pg_collection=ps.pg_collection,
        )
    finally:
        gpt_logger.setLevel(level)
    model.ace_spec = resolved
    model.ace_core_attention = core_attention
    model.ace_config = cfg
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model
