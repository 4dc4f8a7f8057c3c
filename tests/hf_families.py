"""Tiny Hugging Face checkpoints written with transformers' own classes: the model families users bring.

Each is what `save_pretrained` writes (config.json, model.safetensors in transformers' saved layout, Mixtral's
per-expert w1/w2/w3 included) plus a byte-level BPE tokenizer of TOKENIZER_VOCAB tokens trained on the standard
library's sources, so `model.pretrained=DIR` finds everything in one directory.
"""

from pathlib import Path

TOKENIZER_VOCAB = 512
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=TOKENIZER_VOCAB, max_position_embeddings=256, bos_token_id=0, eos_token_id=0, pad_token_id=0)


def family_configs() -> dict:
    """family -> (config, dtype the checkpoint is saved in): tied and untied heads, attention biases (Qwen2), a sliding
    window (Mistral), experts (Mixtral, its aux loss on), fused qkv/gate_up (Phi3), soft-capping and (1 + w) norms
    (Gemma2, saved in bf16)."""
    import torch
    import transformers as T

    return {
        "llama": (T.LlamaConfig(**SHAPE, tie_word_embeddings=False), torch.float32),
        "qwen2": (T.Qwen2Config(**SHAPE, tie_word_embeddings=True), torch.float32),
        "mistral": (T.MistralConfig(**SHAPE, sliding_window=32, tie_word_embeddings=False), torch.float32),
        "mixtral": (T.MixtralConfig(**SHAPE, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True,
                                    router_aux_loss_coef=0.01, tie_word_embeddings=False), torch.float32),
        "phi3": (T.Phi3Config(**SHAPE, tie_word_embeddings=False), torch.float32),
        "gemma2": (T.Gemma2Config(**SHAPE, head_dim=16, tie_word_embeddings=True), torch.bfloat16),
    }


FAMILIES = ("llama", "qwen2", "mistral", "mixtral", "phi3", "gemma2")


def tokenizer(cache: Path):
    """One BPE for every family (so their token streams are one cache entry), trained once per directory."""
    from transformers import AutoTokenizer

    from zero_trainer.data import _train_bpe, load_documents

    path = cache / "shared-bpe-tokenizer"
    if not (path / "tokenizer.json").is_file():
        _train_bpe(load_documents(None).select(range(200)), TOKENIZER_VOCAB).save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def write_checkpoint(out: Path, family: str, seed: int = 0) -> Path:
    """A randomly initialised `family` model saved by transformers, and the shared tokenizer beside it."""
    import torch
    from transformers import AutoModelForCausalLM

    config, dtype = family_configs()[family]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out)
    tokenizer(out.parent).save_pretrained(out)
    return out


def write_zero_lm(out: Path, tied: bool, seed: int = 0) -> Path:
    """zero_trainer's own model (the debug preset's shape, tied or not) saved by save_pretrained: model_type zero_lm,
    so model.pretrained builds our class again."""
    import torch

    from zero_trainer.model import ZeroLMForCausalLM, model_config

    torch.manual_seed(seed)
    ZeroLMForCausalLM(model_config("debug", tie_word_embeddings=tied)).save_pretrained(out)
    tokenizer(out.parent).save_pretrained(out)
    return out


WRITERS = {**{f: (lambda out, f=f: write_checkpoint(out, f)) for f in FAMILIES},
           "zero_lm_tied": lambda out: write_zero_lm(out, True),
           "zero_lm_untied": lambda out: write_zero_lm(out, False)}


def write_all(root: Path, names=WRITERS) -> dict[str, Path]:
    """Each named checkpoint under root, written once (atomically, under a lock: test workers share the root)."""
    import fcntl
    import shutil

    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for name in names:
            if not (root / name / "config.json").is_file():
                shutil.rmtree(root / f".{name}", ignore_errors=True)
                WRITERS[name](root / f".{name}")
                (root / f".{name}").rename(root / name)
    return {name: root / name for name in names}
