"""A tiny character-level ChatML tokenizer for from-scratch demo models.

`build_tiny_tokenizer(out_dir)` writes a Hugging Face tokenizer directory (`tokenizer.json`,
`tokenizer_config.json`, `special_tokens_map.json`, `chat_template.jinja`) that
`transformers.AutoTokenizer` and vLLM load like any Qwen2 tokenizer: the same three ChatML
special tokens (`<|endoftext|>` as pad, `<|im_start|>`, `<|im_end|>` as eos) and a ChatML chat
template, so ChatML data code written for Qwen2.5 works unchanged.

The vocabulary is every printable ASCII character plus newline, one token each, and a few
whole words that the demo task repeats (`\\boxed{`, `Compute`, the role names) as added tokens
so that responses stay short. Characters outside it map to `<unk>`. It is not a general-purpose
tokenizer: there are no merges, no byte fallback and no Unicode beyond ASCII.

Only the `tokenizers` library is needed to build it; nothing here imports transformers or torch.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models

from megatron_ace.data import chat

PAD_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
UNK_TOKEN = "<unk>"

# Ids are fixed here (not left to insertion order) so a model config can name them.
PAD_ID = 0
IM_START_ID = 1
IM_END_ID = 2
UNK_ID = 3
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, IM_START_TOKEN, IM_END_TOKEN, UNK_TOKEN)

# Newline, then printable ASCII (space .. tilde), one token each.
CHARACTERS: tuple[str, ...] = ("\n",) + tuple(chr(c) for c in range(32, 127))

# Whole words matched before the character model runs; they shorten the demo's prompts and,
# more importantly, its generated responses (`\boxed{` is 7 characters, 1 token here).
WORD_TOKENS: tuple[str, ...] = ("\\boxed{", "Compute", "system", "user", "assistant")

VOCAB_SIZE = len(SPECIAL_TOKENS) + len(CHARACTERS) + len(WORD_TOKENS)
"""Number of token ids in use; a model's embedding table may be padded above it."""

CHATML_TEMPLATE = chat.CHATML_TEMPLATE
"""The same ChatML template the data pipeline uses (Qwen2.5's, minus its default system prompt)."""


def _vocab() -> dict[str, int]:
    """Token -> id for the character model (specials and words are added tokens)."""
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for tok in CHARACTERS + WORD_TOKENS:
        vocab[tok] = len(vocab)
    assert len(vocab) == VOCAB_SIZE
    return vocab


def make_tokenizer() -> Tokenizer:
    """The `tokenizers.Tokenizer` object behind the saved directory."""
    vocab = _vocab()
    # A BPE model with no merges splits every word into single characters; with no
    # pre-tokenizer the whole text is one word, so spaces and newlines are ordinary characters.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN))
    # Fuse joins tokens with no separator; the default decoder would insert spaces.
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
    )
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in WORD_TOKENS])
    for t, expected_id in vocab.items():
        assert tok.token_to_id(t) == expected_id, t
    return tok


def build_tiny_tokenizer(out_dir: str | Path) -> Path:
    """Write the tokenizer directory to `out_dir` (created if missing) and return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    make_tokenizer().save(str(out / "tokenizer.json"))
    special_map = {
        "eos_token": IM_END_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": UNK_TOKEN,
        "additional_special_tokens": [IM_START_TOKEN, IM_END_TOKEN],
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 4096,
        "bos_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHATML_TEMPLATE,
        **special_map,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    # transformers 5 reads the template from this file first; keep both copies identical.
    (out / "chat_template.jinja").write_text(CHATML_TEMPLATE)
    return out
