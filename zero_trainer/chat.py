"""Chat data: conversations in the formats people keep them in, as one messages list, rendered by a chat template with
the tokens to learn marked.

Formats, one conversation per JSONL line (or per item of a JSON array):
  - OpenAI: {"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": str or [{"type": "text",
    "text": str}, ...]}], "tools": [...]?}
  - minimind: {"conversations": [{"role": ..., "content": ...}]}
  - ShareGPT: {"conversations": [{"from": "system" | "human" | "gpt" | "function_call" | "observation", "value": str}],
    "system": str?, "tools": [...] or str?}
  - Alpaca: {"instruction": str, "input": str?, "output": str, "system": str?, "history": [[user, assistant], ...]?}
All become {"messages": [{"role", "content": str}], "tools": list | None}: the same conversation in any of them gives
the same token ids. A row that is none of these, or has a role it cannot map, an empty assistant turn, a value of the
wrong type or no assistant turn at all, is a ChatError naming what is wrong (the caller adds file and line).

Masks (`encode`): a template with {% generation %} blocks marks the assistant spans itself (transformers'
return_assistant_tokens_mask); any other template is rendered by prefixes — the conversation up to assistant turn k
with the generation prompt, then with turn k — and the text between is turn k's: its content and its end-of-turn
tokens. A template whose renderings are not prefixes of one another cannot be split this way: a ChatError.
"""

import json
import re

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "function_call": "assistant", "observation": "tool", "tool": "tool"}
GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")
# ChatML (Qwen's, minimind's layout), for tokenizers that carry no chat_template (a BPE zero_trainer trained);
# data.chat_template: chatml names it
CHATML = ("{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}")
TEMPLATES = {"chatml": CHATML}


class ChatError(ValueError):
    """What is wrong with one conversation (or the template), in words a user can act on."""


def _text(value, what: str) -> str:
    """A message's content: a string, or OpenAI's list of typed parts (text parts joined)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        texts = []
        for part in value:
            if part.get("type", "text") != "text" or not isinstance(part.get("text"), str):
                raise ChatError(f"{what} has a content part that is not text ({json.dumps(part)[:80]}): only "
                                '{"type": "text", "text": ...} parts are trained on')
            texts.append(part["text"])
        return "".join(texts)
    raise ChatError(f"{what} is {type(value).__name__}, not a string (or a list of text parts)")


def _messages(turns, role_key: str, content_key: str, roles: dict, what: str) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise ChatError(f'"{what}" must be a non-empty list of turns')
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ChatError(f'{what}[{i}] is {type(turn).__name__}, not an object')
        role = turn.get(role_key)
        if role not in roles:
            known = ", ".join(sorted(roles))
            raise ChatError(f'{what}[{i}] has {role_key} {json.dumps(role)}: use one of {known}')
        out.append({"role": roles[role], "content": _text(turn.get(content_key), f"{what}[{i}].{content_key}")})
    return out


def normalize(row) -> dict:
    """One conversation in any supported format -> {"messages": [...], "tools": list | None}."""
    if not isinstance(row, dict):
        raise ChatError(f"a conversation is a JSON object, not {type(row).__name__}")
    tools = row.get("tools")
    if isinstance(tools, str):  # ShareGPT keeps them as a JSON string
        try:
            tools = json.loads(tools) if tools.strip() else None
        except ValueError:
            raise ChatError('"tools" is a string that is not JSON') from None
    if tools is not None and not isinstance(tools, list):
        raise ChatError(f'"tools" is {type(tools).__name__}, not a list')
    if "messages" in row:
        messages = _messages(row["messages"], "role", "content", {r: r for r in ROLES}, "messages")
    elif "conversations" in row:
        turns = row["conversations"]
        sharegpt = isinstance(turns, list) and turns and isinstance(turns[0], dict) and "from" in turns[0]
        if sharegpt:
            messages = _messages(turns, "from", "value", SHAREGPT_ROLES, "conversations")
        else:
            messages = _messages(turns, "role", "content", {r: r for r in ROLES}, "conversations")
        if row.get("system") is not None:
            messages = [{"role": "system", "content": _text(row["system"], '"system"')}] + messages
    elif "instruction" in row or "output" in row:
        messages = _alpaca(row)
    else:
        raise ChatError('not a conversation: expected "messages" (OpenAI), "conversations" (ShareGPT or minimind) or '
                        '"instruction"/"output" (Alpaca)')
    assistant = [m for m in messages if m["role"] == "assistant"]
    if not assistant:
        raise ChatError("no assistant turn: nothing to learn from this conversation")
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip():
            raise ChatError(f"assistant turn {i} is empty")
    return {"messages": messages, "tools": tools}


def _alpaca(row: dict) -> list[dict]:
    for key in ("instruction", "output"):
        if not isinstance(row.get(key), str):
            raise ChatError(f'Alpaca row: "{key}" is {type(row.get(key)).__name__}, not a string')
    prompt = row["instruction"]
    if row.get("input"):
        extra = _text(row["input"], '"input"')
        prompt = f"{prompt}\n{extra}"  # LLaMA-Factory's and Alpaca's own join
    messages = []
    if row.get("system") is not None:
        messages.append({"role": "system", "content": _text(row["system"], '"system"')})
    history = row.get("history") or []
    if not isinstance(history, list):
        raise ChatError(f'Alpaca row: "history" is {type(history).__name__}, not a list of [user, assistant] pairs')
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise ChatError(f'Alpaca row: history[{i}] is not a [user, assistant] pair of strings')
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]


def has_generation_blocks(template: str) -> bool:
    return bool(GENERATION_BLOCK.search(template))


def assistant_spans(tokenizer, template: str, conversation: dict) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered text, the character spans of its assistant turns) by rendering prefixes: the text a turn adds
    after the generation prompt is that turn's content and end-of-turn tokens."""
    messages, tools = conversation["messages"], conversation["tools"]

    def render(upto, prompt):
        return tokenizer.apply_chat_template(messages[:upto], tools=tools, chat_template=template, tokenize=False,
                                             add_generation_prompt=prompt)

    full = render(len(messages), False)
    spans = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, through = render(k, True), render(k + 1, False)
        if not (through.startswith(before) and full.startswith(through)):
            raise ChatError(f"the chat template does not render turn {k} as an extension of the turns before it "
                            "(prefix property), so the assistant's tokens cannot be told apart: use a template with "
                            "{% generation %} blocks, or one that renders earlier turns unchanged")
        spans.append((len(before), len(through)))
    return full, spans


def encode(tokenizer, template: str, conversation: dict, train_on_prompt: bool = False) -> tuple[list, list]:
    """(token ids, learn: one bool per token) of a normalized conversation. learn marks the assistant turns' tokens
    (their content and end-of-turn), or every token with train_on_prompt."""
    if has_generation_blocks(template):
        out = tokenizer.apply_chat_template(conversation["messages"], tools=conversation["tools"],
                                            chat_template=template, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids, learn = list(out["input_ids"]), [bool(x) for x in out["assistant_masks"]]
    else:
        text, spans = assistant_spans(tokenizer, template, conversation)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, learn, s = list(enc["input_ids"]), [], 0
        for start, end in enc["offset_mapping"]:  # a token overlapping a span is learned (spans are in order)
            while s < len(spans) and start >= spans[s][1]:
                s += 1
            learn.append(s < len(spans) and end > spans[s][0])
    if train_on_prompt:
        learn = [True] * len(ids)
    if not any(learn):
        raise ChatError("no assistant token survives the template: nothing to learn from this conversation")
    return ids, learn
