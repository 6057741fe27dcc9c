"""ChatML conversations -> token ids and an assistant-only loss mask.

What it does:
- `CHATML_TEMPLATE`: the Qwen2.5 ChatML chat template (`<|im_start|>role\\n...<|im_end|>\\n`)
  without Qwen's default system prompt and without tool calls; `tokenizer.py` installs it.
- `SystemPrompt` + `SYSTEM_PROMPTS`: the math prompt of Qwen2.5-Math and a code prompt.
- `encode_chat(tokenizer, messages)`: token ids plus a loss mask that is 1 on exactly the
  assistant content tokens and that message's closing `<|im_end|>`, 0 on every header
  (`<|im_start|>assistant\\n`), on system/user turns and on the newline after `<|im_end|>`.
- `render_generation_prompt(...)`: the prompt ids for generation (ending in
  `<|im_start|>assistant\\n`), as GRPO rollouts feed them to the inference engine.

How the mask is built: every message is tokenized as its own segments (special tokens by id,
then the header text, then the content) and the mask is set per segment, so no regular
expression over the rendered template is involved. Special tokens always split the byte-level
BPE, so segment-wise ids equal the ids of the whole rendered string, with one exception
handled explicitly: when assistant content starts with whitespace, the header's trailing
newline can merge with it into one token (`"\\n\\n"`). Then header and content are tokenized
together, and the merged token counts as header (mask 0), so the masked tokens decode to the
content minus (part of) that leading whitespace. This keeps the ids identical to
`apply_chat_template` in every case.

What it does not do: tool calls, multimodal content, or Qwen's default system prompt.
It works with any tokenizer that has the ChatML special tokens as single ids (the real Qwen2.5
vocabulary, the demo's tiny tokenizer).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence
from typing import Any

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)
"""ChatML as Qwen2.5 renders it, minus the default system prompt and tool calls."""


class Role(enum.Enum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"


class SystemPrompt(enum.Enum):
    """Which system message a prompt gets (`AUTO` picks math or code from a row's `domain`)."""

    NONE = "none"
    MATH = "math"
    CODE = "code"
    AUTO = "auto"


MATH_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
"""The system prompt of Qwen2.5-Math's chain-of-thought evaluation."""

CODE_SYSTEM_PROMPT = (
    "You are a helpful programming assistant. Reason step by step about the problem, then "
    "write your final solution in one ```python code block, in the form the problem asks for: "
    "a program that reads standard input and writes standard output, or the given class or "
    "function."
)
"""Our own wording: the code reward extracts the last ```python block of a response, and runs
it either as a stdin/stdout program or by calling the function / `Solution` method the tests
name (LeetCode-style problems come with starter code)."""

SYSTEM_PROMPTS: dict[SystemPrompt, str | None] = {
    SystemPrompt.NONE: None,
    SystemPrompt.MATH: MATH_SYSTEM_PROMPT,
    SystemPrompt.CODE: CODE_SYSTEM_PROMPT,
}


@dataclasses.dataclass(frozen=True)
class EncodedChat:
    """Token ids of one conversation and its loss mask (same length)."""

    input_ids: list[int]
    loss_mask: list[int]


def system_prompt_text(choice: SystemPrompt, domain: str | None = None) -> str | None:
    """The system message for `choice`; `AUTO` resolves through `domain` ('math' or 'code')."""
    if choice is SystemPrompt.AUTO:
        try:
            resolved = SystemPrompt(domain)
        except ValueError:
            raise ValueError(
                f"system prompt 'auto' needs domain 'math' or 'code', got {domain!r}"
            ) from None
        if resolved not in (SystemPrompt.MATH, SystemPrompt.CODE):
            raise ValueError(f"system prompt 'auto' needs domain 'math' or 'code', got {domain!r}")
        choice = resolved
    return SYSTEM_PROMPTS[choice]


def build_messages(
    prompt: str, response: str | None = None, *, system: str | None = None
) -> list[dict[str, str]]:
    """[system?, user, assistant?] messages for a single-turn prompt."""
    messages = [{"role": Role.SYSTEM.value, "content": system}] if system is not None else []
    messages.append({"role": Role.USER.value, "content": prompt})
    if response is not None:
        messages.append({"role": Role.ASSISTANT.value, "content": response})
    return messages


def special_token_id(tokenizer: Any, token: str) -> int:
    """Id of a ChatML special token; ValueError if the tokenizer splits it or lacks it."""
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"tokenizer has no single-id special token {token!r} (got ids {ids})")
    return int(ids[0])


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def _check_message(message: Mapping[str, Any], index: int) -> tuple[Role, str]:
    if not isinstance(message, Mapping):
        raise TypeError(f"messages[{index}] must be a mapping, got {type(message).__name__}")
    try:
        role = Role(message.get("role"))
    except ValueError:
        allowed = ", ".join(r.value for r in Role)
        raise ValueError(
            f"messages[{index}].role must be one of {allowed}, got {message.get('role')!r}"
        ) from None
    content = message.get("content")
    if not isinstance(content, str):
        raise TypeError(f"messages[{index}].content must be a string, got {content!r}")
    return role, content


def _assistant_body(tokenizer: Any, content: str) -> tuple[list[int], list[int]]:
    """Ids and mask of `assistant\\n` + content (without the special tokens)."""
    header = f"{Role.ASSISTANT.value}\n"
    if not content[:1].isspace():
        head_ids, body_ids = _encode(tokenizer, header), _encode(tokenizer, content)
        return head_ids + body_ids, [0] * len(head_ids) + [1] * len(body_ids)
    # Leading whitespace may merge with the header's newline: tokenize both together and
    # count as header every token that does not lie entirely inside the content.
    ids = _encode(tokenizer, header + content)
    num_header = 0
    while num_header < len(ids):
        num_header += 1
        if len(tokenizer.decode(ids[:num_header], skip_special_tokens=False)) >= len(header):
            break
    return ids, [0] * num_header + [1] * (len(ids) - num_header)


def encode_chat(tokenizer: Any, messages: Sequence[Mapping[str, Any]]) -> EncodedChat:
    """Token ids of `messages` rendered in ChatML, and the assistant-only loss mask.

    Ids equal `tokenizer.apply_chat_template(messages)` with `CHATML_TEMPLATE`. The mask is 1
    on assistant content tokens and on the `<|im_end|>` that closes each assistant message.
    """
    im_start = special_token_id(tokenizer, IM_START)
    im_end = special_token_id(tokenizer, IM_END)
    newline = _encode(tokenizer, "\n")
    input_ids: list[int] = []
    loss_mask: list[int] = []
    for index, message in enumerate(messages):
        role, content = _check_message(message, index)
        if role is Role.ASSISTANT:
            body, body_mask = _assistant_body(tokenizer, content)
            end_mask = 1
        else:
            body = _encode(tokenizer, f"{role.value}\n{content}")
            body_mask, end_mask = [0] * len(body), 0
        input_ids += [im_start, *body, im_end, *newline]
        loss_mask += [0, *body_mask, end_mask, *([0] * len(newline))]
    return EncodedChat(input_ids=input_ids, loss_mask=loss_mask)


def render_generation_prompt(
    tokenizer: Any,
    prompt: str | Sequence[Mapping[str, Any]],
    *,
    system: str | None = None,
) -> list[int]:
    """Prompt ids for generation: the conversation followed by `<|im_start|>assistant\\n`.

    `prompt` is a user message string (then `system`, if given, is prepended) or a list of
    messages that does not end with an assistant turn.
    """
    if isinstance(prompt, str):
        messages: Sequence[Mapping[str, Any]] = build_messages(prompt, system=system)
    else:
        messages = prompt
        if system is not None:
            raise ValueError("system: pass the system message inside `prompt` messages instead")
    if messages and messages[-1].get("role") == Role.ASSISTANT.value:
        raise ValueError("prompt: the last message is an assistant turn; nothing to generate")
    encoded = encode_chat(tokenizer, messages)
    header = [special_token_id(tokenizer, IM_START)] + _encode(tokenizer, "assistant\n")
    return encoded.input_ids + header
