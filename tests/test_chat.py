"""zero_trainer/chat.py in-process: every chat format normalises to the same messages and token ids; masks from
{% generation %} blocks and from prefix rendering agree; bad rows and templates are one line each."""

import pytest
from hf_families import tokenizer as shared_tokenizer

from zero_trainer.chat import CHATML, ChatError, assistant_spans, encode, normalize

SYSTEM, Q1, A1, Q2, A2 = "Be brief.", "What is 2+2?", "4.", "And 3+3?", "6, as 3+3 is 6."
EXPECTED = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": Q1},
            {"role": "assistant", "content": A1}, {"role": "user", "content": Q2},
            {"role": "assistant", "content": A2}]
FORMATS = {
    "openai": {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": Q1},
                            {"role": "assistant", "content": [{"type": "text", "text": A1}]},
                            {"role": "user", "content": Q2}, {"role": "assistant", "content": A2}]},
    "minimind": {"conversations": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": Q1},
                                   {"role": "assistant", "content": A1}, {"role": "user", "content": Q2},
                                   {"role": "assistant", "content": A2}]},
    "sharegpt": {"system": SYSTEM, "conversations": [{"from": "human", "value": Q1}, {"from": "gpt", "value": A1},
                                                     {"from": "human", "value": Q2}, {"from": "gpt", "value": A2}]},
    "alpaca": {"system": SYSTEM, "history": [[Q1, A1]], "instruction": Q2, "output": A2},
}
CHATML_GENERATION = ("{%- for message in messages %}{%- if message['role'] == 'assistant' %}"
                     "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>\\n' }}"
                     "{% endgeneration %}{%- else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                     "'<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
                     "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return shared_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_every_format_is_the_same_conversation(name, tok):
    conv = normalize(FORMATS[name])
    assert conv["messages"] == EXPECTED
    assert encode(tok, CHATML, conv) == encode(tok, CHATML, normalize(FORMATS["openai"]))


def test_assistant_tokens_are_the_answers_and_their_end_of_turn(tok):
    conv = normalize(FORMATS["openai"])
    ids, learn = encode(tok, CHATML, conv)
    learned = tok.decode([i for i, keep in zip(ids, learn, strict=True) if keep])
    assert learned == f"{A1}<|im_end|>\n{A2}<|im_end|>\n"
    assert encode(tok, CHATML, conv, train_on_prompt=True)[1] == [True] * len(ids)


def test_generation_blocks_and_prefix_rendering_agree(tok):
    conv = normalize(FORMATS["sharegpt"])
    assert encode(tok, CHATML_GENERATION, conv) == encode(tok, CHATML, conv)


def test_alpaca_input_follows_the_instruction_on_its_own_line():
    conv = normalize({"instruction": "Translate:", "input": "bonjour", "output": "hello"})
    assert conv["messages"] == [{"role": "user", "content": "Translate:\nbonjour"},
                                {"role": "assistant", "content": "hello"}]


def test_sharegpt_tools_and_observations(tok):
    row = {"conversations": [{"from": "human", "value": "weather?"},
                             {"from": "function_call", "value": '{"name": "weather", "arguments": {}}'},
                             {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "Sunny."}],
           "tools": '[{"name": "weather"}]'}
    conv = normalize(row)
    assert [m["role"] for m in conv["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert conv["tools"] == [{"name": "weather"}]


@pytest.mark.parametrize("row, expected", [
    ({"messages": [{"role": "robot", "content": "x"}]}, 'messages[0] has role "robot"'),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
     "assistant turn 1 is empty"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content is int"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"conversations": [{"from": "bot", "value": "x"}]}, 'conversations[0] has from "bot"'),
    ({"instruction": "x", "output": 5}, '"output" is int'),
    ({"text": "plain"}, "not a conversation"),
    (["a list"], "a JSON object, not list"),
])
def test_bad_rows_say_what_is_wrong(row, expected):
    with pytest.raises(ChatError) as err:
        normalize(row)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_template_that_rewrites_earlier_turns_is_refused(tok):
    """A template that renders the last assistant turn differently from earlier ones (as reasoning templates drop
    earlier thoughts) breaks the prefix property: one line, not wrong masks."""
    rewrites = ("{%- for m in messages %}{%- if loop.last %}{{ m['role'] + ': ' + m['content'] + '.\\n' }}"
                "{%- else %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{%- endif %}{%- endfor %}"
                "{%- if add_generation_prompt %}{{ 'assistant: ' }}{%- endif %}")
    with pytest.raises(ChatError, match="prefix property"):
        assistant_spans(tok, rewrites, normalize(FORMATS["openai"]))
