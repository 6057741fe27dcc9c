"""The tiny ChatML tokenizer: round trips, and loading through transformers like a Qwen2 one."""

from __future__ import annotations

import json

import pytest

from megatron_ace.data import tiny_tokenizer as tt

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return tt.build_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tok"))


@pytest.fixture(scope="module")
def hf_tok(tok_dir):
    return transformers.AutoTokenizer.from_pretrained(str(tok_dir))


TEXTS = [
    "Compute 7+5*3-2.",
    "=7+15-2\n=22-2\n=20\n\\boxed{20}",
    "\\boxed{-13}",
    "  two  spaces, a tab?\tno: tabs are not ASCII printable",
    "user assistant system computed Compute",
    "~!@#$%^&*()_+`-={}[]|\\:\";'<>?,./ 0123456789 abcXYZ",
]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_through_transformers(hf_tok, text):
    ids = hf_tok(text, add_special_tokens=False)["input_ids"]
    expected = text.replace("\t", tt.UNK_TOKEN)
    assert hf_tok.decode(ids) == expected


def test_files_written(tok_dir):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tok_dir / name).is_file(), name
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == tt.IM_END_TOKEN and cfg["pad_token"] == tt.PAD_TOKEN


def test_special_token_ids(hf_tok):
    assert hf_tok.eos_token == tt.IM_END_TOKEN and hf_tok.eos_token_id == tt.IM_END_ID
    assert hf_tok.pad_token == tt.PAD_TOKEN and hf_tok.pad_token_id == tt.PAD_ID
    assert hf_tok.convert_tokens_to_ids(tt.IM_START_TOKEN) == tt.IM_START_ID
    assert len(hf_tok) == tt.VOCAB_SIZE
    # A special token in text is one id, never spelled out in characters.
    ids = hf_tok("a<|im_end|>b", add_special_tokens=False)["input_ids"]
    assert ids[1] == tt.IM_END_ID and len(ids) == 3
    assert hf_tok.decode(ids, skip_special_tokens=True) == "ab"


def test_characters_are_single_tokens(hf_tok):
    for ch in tt.CHARACTERS:
        assert len(hf_tok(ch, add_special_tokens=False)["input_ids"]) == 1, repr(ch)
    ids = hf_tok("\\boxed{12}", add_special_tokens=False)["input_ids"]
    assert hf_tok.convert_ids_to_tokens(ids) == ["\\boxed{", "1", "2", "}"]


def test_no_bos_added(hf_tok):
    assert hf_tok("7+5")["input_ids"] == hf_tok("7+5", add_special_tokens=False)["input_ids"]


def _chatml(messages, add_generation_prompt):
    """ChatML written out by hand, as Qwen2.5 formats it (no default system prompt here)."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_is_chatml(hf_tok, add_generation_prompt):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Compute 1+2."},
        {"role": "assistant", "content": "=3\n\\boxed{3}"},
    ]
    text = hf_tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert text == _chatml(messages, add_generation_prompt)
    ids = hf_tok.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=True
    )["input_ids"]
    assert ids == hf_tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tt.IM_START_ID and ids.count(tt.IM_END_ID) == len(messages)


def test_unknown_characters_map_to_unk(hf_tok):
    ids = hf_tok("é", add_special_tokens=False)["input_ids"]
    assert ids == [tt.UNK_ID]
