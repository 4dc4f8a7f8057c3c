"""zero_trainer: a minimal causal LM trained through DeepSpeed ZeRO, with tested recipes."""

__version__ = "0.1.0"
