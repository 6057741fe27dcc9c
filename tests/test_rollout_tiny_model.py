"""A tiny random Qwen2 checkpoint (float32, safetensors) with its own tokenizer, for rollout tests.

`make_tiny_qwen2_dir(out_dir)` writes an HF model directory that both transformers and vLLM load:
a random-init `Qwen2ForCausalLM` (hidden 128, 4 query heads and 2 KV heads of head_dim 32 -- vLLM's
CPU attention rejects head_dim 16 --, 2 layers, vocab 1000) saved with `save_pretrained`, and a
WordLevel tokenizer (`tokenizer.json` + `tokenizer_config.json`) whose eos is id 2. Other rollout
test files import it; the tests here check that the directory is self-consistent.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

VOCAB_SIZE = 1000
EOS_ID = 2
PAD_ID = 0
_SPECIALS = ("<pad>", "<unk>", "<eos>")


def _write_tokenizer(out_dir: Path) -> None:
    """WordLevel tokenizer: ids 0..2 are specials, then one word `w<i>` per remaining id."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(_SPECIALS)}
    for i in range(len(_SPECIALS), VOCAB_SIZE):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # No decoder: tokenizers then joins words with single spaces, which is what we want.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _SPECIALS])
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def make_tiny_qwen2_dir(
    out_dir: str | Path, *, seed: int = 0, tie_word_embeddings: bool = False, eos_prob: float = 0.08
) -> Path:
    """Write a random float32 Qwen2 checkpoint and tokenizer to `out_dir`; return the path."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = Qwen2Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
        rope_theta=10000.0,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.float32).eval()
    with torch.no_grad():
        # Random init gives near-uniform logits; sharpen them so that temperature matters and
        # logprob comparisons are not between near-equal numbers.
        head = model.get_output_embeddings().weight
        head.mul_(12.0)
        if not tie_word_embeddings:
            _tune_eos_row(model, eos_prob)
    model.save_pretrained(out, safe_serialization=True)
    _write_tokenizer(out)
    return out


def _tune_eos_row(model, eos_prob: float) -> None:
    """Point the EOS row of the head along the mean final hidden state and scale it (bisection)
    so EOS gets about `eos_prob` of the mass on random contexts: responses then end by EOS
    now and then instead of always running to the length budget."""
    import torch

    ids = torch.randint(len(_SPECIALS), VOCAB_SIZE, (8, 32), generator=torch.Generator().manual_seed(0))
    hidden = model.model(ids).last_hidden_state.reshape(-1, model.config.hidden_size)
    direction = hidden.mean(0)
    head = model.lm_head.weight
    lo, hi = 0.0, 10.0 / float(direction.norm())
    for _ in range(40):
        mid = (lo + hi) / 2
        head[EOS_ID] = direction * mid
        p = torch.softmax(model.lm_head(hidden), -1)[:, EOS_ID].mean()
        lo, hi = (mid, hi) if p < eos_prob else (lo, mid)


def test_tiny_checkpoint_loads_in_transformers(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make_tiny_qwen2_dir(tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.eos_token_id == EOS_ID
    assert tok.decode([5, 6]).replace(" ", "") == "w5w6"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    logits = model(torch.tensor([[5, 6, 7]])).logits
    assert logits.shape == (1, 3, VOCAB_SIZE)
    assert model.config.head_dim == 32


def test_tiny_checkpoint_is_seeded(tmp_path):
    from safetensors.torch import load_file

    a = load_file(make_tiny_qwen2_dir(tmp_path / "a", seed=1) / "model.safetensors")
    b = load_file(make_tiny_qwen2_dir(tmp_path / "b", seed=1) / "model.safetensors")
    c = load_file(make_tiny_qwen2_dir(tmp_path / "c", seed=2) / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert set(a) == set(b) and (a[name] == b[name]).all()
    assert not (a[name] == c[name]).all()


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__])
