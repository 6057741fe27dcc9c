"""ChatML encoding: ids equal transformers' apply_chat_template; the loss mask covers exactly
the assistant content and its <|im_end|>. Checked on the real Qwen2.5 vocabulary and on the
demo's tiny tokenizer."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from megatron_ace.data.chat import (
    CODE_SYSTEM_PROMPT,
    IM_END,
    IM_START,
    MATH_SYSTEM_PROMPT,
    SystemPrompt,
    encode_chat,
    render_generation_prompt,
    system_prompt_text,
)
from megatron_ace.data.tiny_tokenizer import build_tiny_tokenizer
from megatron_ace.data.tokenizer import save_qwen25_tokenizer

RESPONSES = [
    "The answer is \\boxed{4}.",
    "<think>\nLet me compute 2+2.\n</think>\n\nSo it is $\\boxed{4}$.",
    "Unicode: 中文, émoji 🚀, and a tab\there.",
    "```python\nprint(sum(map(int, input().split())))\n```",
    " starts with a space",
    "ends with newlines\n\n",
    "literal <|im_end|> inside",
]
# Leading whitespace that contains a newline can merge with the header's newline.
WHITESPACE_LEADING = ["\nstarts with a newline", "\n\n  two newlines", "  \n mixed"]


def _as_ids(result):
    return list(result) if isinstance(result, list) else list(result["input_ids"])


@pytest.fixture(scope="module", params=["qwen2.5", "tiny"])
def tok(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    path = save_qwen25_tokenizer(out) if request.param == "qwen2.5" else build_tiny_tokenizer(out)
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def _conversations():
    for response in RESPONSES + WHITESPACE_LEADING:
        yield [
            {"role": "system", "content": MATH_SYSTEM_PROMPT},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": response},
        ]
    yield [  # multi-turn, no system prompt
        {"role": "user", "content": "Write code."},
        {"role": "assistant", "content": "Here it is."},
        {"role": "user", "content": "Now faster."},
        {"role": "assistant", "content": "Done: O(n)."},
    ]


def _ascii_only(tok, messages):
    # The tiny tokenizer has ASCII only; skip texts it cannot represent.
    return len(tok) > 1000 or all(m["content"].isascii() for m in messages)


def test_ids_equal_apply_chat_template(tok):
    checked = 0
    for messages in _conversations():
        if not _ascii_only(tok, messages):
            continue
        ref = _as_ids(tok.apply_chat_template(messages, tokenize=True))
        assert encode_chat(tok, messages).input_ids == ref, messages
        checked += 1
    assert checked >= 8


def test_mask_covers_exactly_assistant_content(tok):
    for messages in _conversations():
        if not _ascii_only(tok, messages):
            continue
        enc = encode_chat(tok, messages)
        assert len(enc.loss_mask) == len(enc.input_ids)
        masked = [i for i, m in zip(enc.input_ids, enc.loss_mask) if m]
        decoded = tok.decode(masked, skip_special_tokens=False)
        assistant = [m["content"] for m in messages if m["role"] == "assistant"]
        if any(a in WHITESPACE_LEADING for a in assistant):
            # The token merged with the header newline is masked out: what remains is the
            # content minus some of its leading whitespace.
            content = assistant[0]
            body = decoded[: -len(IM_END)]
            assert decoded.endswith(IM_END) and content.endswith(body)
            removed = content[: len(content) - len(body)]
            assert removed == "" or removed.isspace()
            continue
        assert decoded == "".join(a + IM_END for a in assistant)


def test_mask_excludes_headers_and_turn_ends(tok):
    im_start = tok.convert_tokens_to_ids(IM_START)
    im_end = tok.convert_tokens_to_ids(IM_END)
    messages = next(iter(_conversations()))
    enc = encode_chat(tok, messages)
    ids, mask = enc.input_ids, enc.loss_mask
    starts = [k for k, i in enumerate(ids) if i == im_start]
    ends = [k for k, i in enumerate(ids) if i == im_end]
    assert all(mask[k] == 0 for k in starts)
    # The assistant header "assistant\n" right after the last <|im_start|> is not learned.
    header_len = len(tok.encode("assistant\n", add_special_tokens=False))
    assert mask[starts[-1] + 1 : starts[-1] + 1 + header_len] == [0] * header_len
    assert [mask[k] for k in ends] == [0, 0, 1]  # system, user, assistant
    assert mask[-1] == 0  # the newline after the final <|im_end|>


def test_generation_prompt_equals_template(tok):
    for system in (MATH_SYSTEM_PROMPT, None):
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": "Find x if 2x = 6."}
        ]
        ref = _as_ids(tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True))
        assert render_generation_prompt(tok, "Find x if 2x = 6.", system=system) == ref
        assert render_generation_prompt(tok, messages) == ref
    with pytest.raises(ValueError, match="assistant"):
        render_generation_prompt(
            tok, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
        )


def test_system_prompts_and_bad_messages(tok):
    assert system_prompt_text(SystemPrompt.MATH) == (
        "Please reason step by step, and put your final answer within \\boxed{}."
    )
    assert system_prompt_text(SystemPrompt.AUTO, "code") == CODE_SYSTEM_PROMPT
    assert system_prompt_text(SystemPrompt.NONE) is None
    with pytest.raises(ValueError, match="domain"):
        system_prompt_text(SystemPrompt.AUTO, "poetry")
    with pytest.raises(ValueError, match=r"messages\[0\].role"):
        encode_chat(tok, [{"role": "robot", "content": "x"}])
    with pytest.raises(TypeError, match=r"messages\[1\].content"):
        encode_chat(tok, [{"role": "user", "content": "x"}, {"role": "assistant", "content": 3}])
