"""LoRA through peft: the model's weights frozen, low-rank adapters trained (the recipe's `lora:` section).

The adapters are added after the weights are in (a random init, model.pretrained's, or a checkpoint's about to be
loaded), seeded, so every ZeRO stage and world size starts from the same adapters. DeepSpeed then sees only the
adapters as trainable: ZeRO partitions their gradients and optimizer states, and at stage 3 converts their
parameters like the rest. A checkpoint holds the peft-wrapped model's state (frozen weights included, under peft's
names); `export` turns it back into an adapter directory (PeftModel.from_pretrained) or, with --merge, a plain
Hugging Face model with the update merged into the weights.
"""

import torch

from .recipe import LoraSection

ADAPTER_NAME = "default"  # peft's adapter name: the infix in checkpoint keys (`lora_A.default.weight`)


def peft_config(s: LoraSection, base_path: str | None = None):
    from peft import LoraConfig

    targets = s.target_modules if isinstance(s.target_modules, str) else list(s.target_modules)
    return LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=targets, bias="none",
                      task_type="CAUSAL_LM", base_model_name_or_path=base_path)


def add_adapters(model: torch.nn.Module, section: LoraSection | dict, seed: int, base_path: str | None = None):
    """The model wrapped by peft with fresh adapters (A: peft's kaiming init from `seed`, B: zeros, so the first
    forward is the base model's); every other weight frozen. `section`: the recipe's, or a checkpoint's saved dict.
    A target name that matches nothing is an error."""
    import warnings

    from peft import get_peft_model

    section = LoraSection(**section) if isinstance(section, dict) else section
    torch.manual_seed(seed)
    try:
        with warnings.catch_warnings():  # peft asks transformers' deprecated is_gradient_checkpointing
            warnings.simplefilter("ignore", FutureWarning)
            return get_peft_model(model, peft_config(section, base_path))
    except ValueError as err:  # peft: "Target modules {...} not found in the base model"
        raise LoraError(f"target modules {section.target_modules} match no linear layer of the model "
                        f"({str(err).splitlines()[0][:120]})") from None


class LoraError(ValueError):
    pass


def trainable_count(model: torch.nn.Module) -> int:
    """Parameters that train, counting ZeRO-3 partitioned ones by their full size (ds_numel)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)


def check(recipe, model_cfg) -> int | None:
    """The recipe's LoRA, checked before anything launches: the combinations not supported, one line each, and the
    target modules matched on a meta-device build of the model. Returns the trainable parameters (None: no LoRA)."""
    if not recipe.lora.enabled:
        return None
    check_parallel(recipe)
    return trainable_params(model_cfg, recipe.lora, "lora.target_modules")


def check_parallel(recipe) -> None:
    """The parallel degrees LoRA does not combine with, one line each (also after `auto` chose an sp)."""
    from .errors import UsageError

    lora, par = recipe.lora, recipe.parallel
    if not lora.enabled:
        return
    for field, degree, why in (("parallel.tp", par.tp, "AutoTP shards nn.Linear layers, peft wraps them"),
                               ("parallel.ep", par.ep, "expert parallelism rebuilds the MoE blocks peft wrapped"),
                               ("parallel.sp", par.sp, "Ulysses with peft's wrapped attention is not tested here")):
        if degree > 1:
            raise UsageError(f"lora.r {lora.r} with {field} {degree}: {why}", field,
                             f"set {field}=1 (ZeRO shards a LoRA run's frozen weights at stage 3), or lora.r=0")


def trainable_params(model_cfg, section: LoraSection, field: str) -> int:
    """The parameters LoRA trains on this model (its adapters), counted on a meta-device build; a target that
    matches nothing is a UsageError naming `field`."""
    from .errors import UsageError
    from .model import build_model

    with torch.device("meta"):
        model = build_model(model_cfg)
    try:
        wrapped = add_adapters(model, section, seed=0)
    except LoraError as err:
        raise UsageError(str(err), field, "use all-linear, or names of the model's linear layers "
                         f"({', '.join(linear_names(model)[:8])})") from None
    return trainable_count(wrapped)


def linear_names(model: torch.nn.Module) -> list[str]:
    """The last names of the model's nn.Linear modules (what target_modules matches), output head aside."""
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return sorted(names - {"lm_head"})
