"""The bundled Qwen2.5 tokenizer: Qwen2.5's added tokens, pad id, template, and BPE ids."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from megatron_ace.data import tokenizer as tok_mod
from megatron_ace.data.chat import CHATML_TEMPLATE

# Qwen2.5's 22 added tokens as its published tokenizer_config.json lists them (ids 151643..).
QWEN25_ADDED = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
]


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return tok_mod.save_qwen25_tokenizer(tmp_path_factory.mktemp("qwen25"))


@pytest.fixture(scope="module")
def qwen(qwen_dir):
    return AutoTokenizer.from_pretrained(str(qwen_dir), local_files_only=True)


def test_added_tokens_are_qwen25(qwen):
    assert len(qwen) == 151_665
    for offset, token in enumerate(QWEN25_ADDED):
        assert qwen.convert_tokens_to_ids(token) == 151_643 + offset, token
    # The Qwen3-only tokens are gone: <think> is plain text split by BPE.
    assert len(qwen.encode("<think>", add_special_tokens=False)) > 1
    assert len(qwen.encode("</tool_response>", add_special_tokens=False)) > 1


def test_pad_eos_and_template(qwen, qwen_dir):
    assert qwen.pad_token == "<|endoftext|>" and qwen.pad_token_id == 151_643
    assert qwen.eos_token == "<|im_end|>" and qwen.eos_token_id == 151_645
    assert qwen.bos_token is None
    assert qwen.chat_template == CHATML_TEMPLATE
    config = json.loads((qwen_dir / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHATML_TEMPLATE
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        assert (qwen_dir / name).is_file()


def test_bpe_ids_match_the_shipped_vocabulary(qwen):
    # Independent reference: the `tokenizers` library on the unmodified shipped file.
    raw = Tokenizer.from_file(str(tok_mod._source_dir() / "tokenizer.json"))
    texts = [
        "Hello world",
        "Let $x^2+y^2=1$. Find \\boxed{x}.",
        "def f(a):\n    return a * 2\n",
        "中文数学题：求解方程",
        "  leading spaces\n\n\ttabs",
    ]
    for text in texts:
        assert qwen.encode(text, add_special_tokens=False) == raw.encode(text).ids
    assert qwen.encode("Hello world", add_special_tokens=False) == [9707, 1879]


def test_load_by_name_uses_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ACE_CACHE_DIR", str(tmp_path))
    tok = tok_mod.load_tokenizer("qwen2.5")
    assert tok.pad_token_id == 151_643 and len(tok) == 151_665
    assert (tmp_path / "tokenizers").is_dir()
    fp = tok_mod.tokenizer_fingerprint(tok)
    assert fp == tok_mod.tokenizer_fingerprint(tok_mod.load_tokenizer(tok_mod.bundled_qwen25_dir()))


def test_load_rejects_missing_path(tmp_path):
    with pytest.raises(ValueError, match="neither a directory"):
        tok_mod.load_tokenizer(tmp_path / "nope")


def test_vllm_loads_the_directory(qwen_dir):
    # A separate interpreter: importing vLLM sets process-wide state we keep out of pytest.
    import os
    import subprocess
    import sys

    code = (
        "import json, sys\n"
        "from vllm.tokenizers import get_tokenizer\n"
        "t = get_tokenizer(sys.argv[1])\n"
        "ids = t.apply_chat_template([{'role': 'user', 'content': 'hi'}], add_generation_prompt=True)\n"
        "ids = ids if isinstance(ids, list) else ids['input_ids']\n"
        "print(json.dumps([len(t), t.pad_token_id, t.eos_token_id, list(ids)]))\n"
    )
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
    out = subprocess.run(
        [sys.executable, "-c", code, str(qwen_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=True,
    )
    size, pad, eos, ids = json.loads(out.stdout.strip().splitlines()[-1])
    hf = AutoTokenizer.from_pretrained(str(qwen_dir))
    ref = hf.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    ref = ref if isinstance(ref, list) else ref["input_ids"]
    assert (size, pad, eos) == (151_665, 151_643, 151_645)
    assert ids == list(ref)
