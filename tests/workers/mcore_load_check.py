"""Load a training checkpoint with megatron-core's own API into a freshly built model.

    python tests/workers/mcore_load_check.py CHECKPOINT_DIR HF_DIR OUT_JSON PORT

Builds a GPTModel from megatron-core's public pieces only (TransformerConfig, the local layer
spec, `dist_checkpointing.load({"model": model.sharded_state_dict()}, CHECKPOINT_DIR)` as
Megatron-LM loads a training checkpoint), nothing of
megatron_ace's model or checkpoint code except the CPU workarounds (CUDA absent here), then
writes the logits of a fixed batch next to those of HF transformers on HF_DIR, an HF export of
the same checkpoint, so the caller can compare two independent readers of the same file.
"""

import json
import os
import sys


def main(ckpt: str, hf_dir: str, out: str, port: str) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig
    from transformers import AutoModelForCausalLM

    from megatron_ace.model.cpu_patches import apply_checkpoint_cpu_patches

    apply_checkpoint_cpu_patches()  # CPU only: megatron-core hard-codes CUDA in places
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(0, inference_rng_tracker=True)
    hf = json.load(open(os.path.join(hf_dir, "config.json")))
    config = TransformerConfig(
        num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"], num_attention_heads=hf["num_attention_heads"],
        num_query_groups=hf["num_key_value_heads"], kv_channels=hf["head_dim"],
        normalization="RMSNorm", layernorm_epsilon=hf["rms_norm_eps"], gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, add_qkv_bias=True, hidden_dropout=0.0,
        attention_dropout=0.0, use_cpu_initialization=True, params_dtype=torch.float32,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, gradient_accumulation_fusion=False)
    model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(
        normalization="RMSNorm"), vocab_size=-(-hf["vocab_size"] // 128) * 128,
        max_sequence_length=hf["max_position_embeddings"],
        share_embeddings_and_output_weights=hf["tie_word_embeddings"], position_embedding_type="rope",
        rotary_base=int(hf["rope_theta"]))
    # As Megatron-LM loads a training checkpoint: the model's tensors under "model".
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, ckpt)
    model.load_state_dict(loaded["model"])
    model.eval()
    tokens = torch.arange(24).remainder(hf["vocab_size"]).reshape(2, 12)
    mask = ~torch.ones(12, 12, dtype=torch.bool).tril()
    with torch.no_grad():
        mcore = model(tokens, torch.arange(12)[None].expand(2, -1), mask[None, None])
        ref = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)(tokens).logits
    json.dump({"mcore": mcore[..., :hf["vocab_size"]].tolist(), "hf": ref.tolist()}, open(out, "w"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])
