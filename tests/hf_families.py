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

    path = cache / "tokenizer"
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


def write_all(root: Path) -> dict[str, Path]:
    return {f: (root / f if (root / f / "config.json").is_file() else write_checkpoint(root / f, f)) for f in FAMILIES}
