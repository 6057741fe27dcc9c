"""Megatron-Core Qwen2 at a given TP/PP vs HF Qwen2ForCausalLM on the same weights.

As a torchrun worker it writes {max_logp_diff, max_entropy_diff, roundtrip_ok, logp_std} to the
output JSON from global rank 0; `compare` gives the same figures in the calling process (TP1 PP1).
"""

import json
import sys

import torch
from transformers import Qwen2Config as HFConfig
from transformers import Qwen2ForCausalLM

from megatron_ace.model.builder import build_model
from megatron_ace.model.config import preset
from megatron_ace.model.forward import forward_logprobs
from megatron_ace.model.parallel import ParallelConfig, destroy_parallel, init_parallel
from megatron_ace.model.weights import iter_hf_tensors, load_hf_into_model


def compare(tp: int, pp: int, name: str) -> dict | None:
    """The figures on global rank 0 (None on the others)."""
    with torch.random.fork_rng():
        return _compare(tp, pp, name)


def _compare(tp: int, pp: int, name: str) -> dict | None:
    cfg = preset(name)
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(HFConfig(**cfg.to_hf_config(), attn_implementation="eager"))
    hf = hf.float().eval()
    for p in hf.parameters():  # non-zero biases / norms so every mapping rule matters
        torch.nn.init.normal_(p, std=0.05 if p.dim() > 1 else 0.3)
    sd = hf.state_dict()
    ps = init_parallel(ParallelConfig(tp=tp, pp=pp))
    model = build_model(cfg, ps)
    load_hf_into_model(model, lambda n: sd[n], cfg, ps)
    tokens = torch.randint(0, cfg.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
    got = forward_logprobs(model, [{"tokens": tokens}], ps, vocab_size=cfg.vocab_size,
                           with_entropy=True)[0]
    with torch.no_grad():
        logp_all = hf(tokens).logits.float().log_softmax(-1)[:, :-1]
    ref = torch.gather(logp_all, -1, tokens[:, 1:, None]).squeeze(-1)
    ref_entropy = -(logp_all.exp() * logp_all).sum(-1)
    exported = dict(iter_hf_tensors(model, cfg, ps))
    result = None
    if ps.rank == 0:
        expected = {k for k in sd if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
        roundtrip = set(exported) == expected and all(torch.equal(exported[k], sd[k])
                                                      for k in expected)
        result = {
            "max_logp_diff": (got["logp"] - ref).abs().max().item(),
            "max_entropy_diff": (got["entropy"] - ref_entropy).abs().max().item(),
            "roundtrip_ok": roundtrip,
            "logp_std": ref.std().item(),
        }
    destroy_parallel()
    return result


def main() -> None:
    tp, pp, name, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    result = compare(tp, pp, name)
    if result is not None:
        with open(out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
