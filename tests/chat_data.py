"""A small chat corpus the tests write: arithmetic questions and answers, in the formats zero_trainer reads."""

import json
import os
import random
from pathlib import Path

SYSTEM = "You are a calculator. Answer with the result."


def conversations(n: int, seed: int = 0) -> list[dict]:
    """n OpenAI-format conversations, one to three user/assistant turns each, half with a system prompt."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        messages = [{"role": "system", "content": SYSTEM}] if i % 2 else []
        for _ in range(rng.randint(1, 3)):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            messages += [{"role": "user", "content": f"What is {a} + {b}?"},
                         {"role": "assistant", "content": f"{a} + {b} = {a + b}."}]
        out.append({"messages": messages})
    return out


def write_chat(path: Path, n: int = 64, seed: int = 0) -> Path:
    """n conversations as .jsonl at path, written whole or not at all (test workers may write the same file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text("".join(json.dumps(c) + "\n" for c in conversations(n, seed)))
    os.replace(tmp, path)
    return path
