"""Pipeline parallelism: zero_trainer's own model as DeepSpeed pipeline stages (deepspeed.pipe.PipelineModule).

The layers, in order: the embedding, the decoder layers, the final norm, the head. DeepSpeed partitions them over
parallel.pp stages balanced by decoder layers (partition_method "type:DecoderLayerPipe"): stage 0 also holds the
embedding, the last the final norm and the head. A tied head is a TiedLayerSpec: the first and the last stage each
hold the embedding matrix, DeepSpeed all-reduces its gradients between them. world = dp × pp; ranks [0, dp) are
stage 0 (PipeDataParallelTopology), so a rank's data-parallel index is rank % dp.

Between stages travel (hidden states, position_ids): only floats that need gradients may cross (the engine sends
a gradient back for every float), so positions go as integers and each stage rebuilds rope and the packed-document
mask from them (once a forward: `_StageCache`). The loss (labels = (shifted targets, items)) is the same fp32 sum
over targets divided by num_items as ZeroLMForCausalLM.loss_head, on the last stage.

The modules adopt the built model's parameters (initialised or loaded once, as without PP), so every pp starts
from the same weights. Activation checkpointing: each decoder layer non-reentrantly (torch.utils.checkpoint), as
the reentrant form breaks at the integer-input embedding stage (DeepSpeed#688).
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .model import DecoderLayer, RMSNorm, attention_bias, rope_cos_sin

TIED_KEY = "embed"


class _StageCache:
    """rope and the attention mask of the positions last seen: the stage's layers share them within a forward
    (positions arrive in a reused receive buffer, so they are compared by value)."""

    def __init__(self, config):
        self.config, self.key, self.value = config, None, None

    def __call__(self, positions, dtype):
        if self.key is None or self.key[1] != dtype or not torch.equal(self.key[0], positions):
            cos, sin = rope_cos_sin(positions, self.config, dtype)
            self.key, self.value = (positions.clone(), dtype), (cos, sin, attention_bias(positions, None, dtype))
        return self.value


class EmbeddingPipe(nn.Module):
    """(input_ids, position_ids) -> (hidden, position_ids). Tied, the last stage's copy is the head (`tied_head`)."""

    def __init__(self, source: nn.Embedding):
        super().__init__()
        self.weight = source.weight

    def forward(self, inputs):
        ids, positions = inputs
        return F.embedding(ids, self.weight), positions


def tied_head(module: EmbeddingPipe, x):
    return F.linear(x, module.weight)


class DecoderLayerPipe(nn.Module):
    """One DecoderLayer on (hidden, position_ids); its submodules keep their names (checkpoint files map back)."""

    def __init__(self, layer: DecoderLayer, cache: _StageCache, checkpointing: bool):
        super().__init__()
        self.input_layernorm, self.self_attn = layer.input_layernorm, layer.self_attn
        self.post_attention_layernorm, self.mlp = layer.post_attention_layernorm, layer.mlp
        self._cache, self._checkpointing = cache, checkpointing

    def forward(self, inputs):
        x, positions = inputs
        cos, sin, mask = self._cache(positions, x.dtype)
        if self._checkpointing and torch.is_grad_enabled():
            x = checkpoint(self.layer, x, cos, sin, mask, positions, use_reentrant=False)
        else:
            x = self.layer(x, cos, sin, mask, positions)
        return x, positions

    def layer(self, x, cos, sin, mask, positions):  # DecoderLayer.forward
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, positions)
        return x + self.mlp(self.post_attention_layernorm(x))


class NormPipe(nn.Module):
    """The final RMSNorm on (hidden, position_ids) -> hidden."""

    def __init__(self, norm: RMSNorm):
        super().__init__()
        self.weight, self.eps = norm.weight, norm.eps

    def forward(self, inputs):
        return RMSNorm.forward(self, inputs[0])


class HeadPipe(nn.Module):
    def __init__(self, head: nn.Linear):
        super().__init__()
        self.weight = head.weight

    def forward(self, x):
        return F.linear(x, self.weight)


def next_token_loss(logits, labels):
    """The last stage's loss: fp32 cross entropy summed over the targets that are not -100, / num_items."""
    targets, items = labels
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    return loss / items


def pipeline_model(model, pp: int, checkpointing: bool):
    """The built (initialised or loaded) ZeroLMForCausalLM as a PipelineModule of pp stages."""
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

    cfg = model.config
    cache = _StageCache(cfg)
    norm = model.model.norm
    layers = [TiedLayerSpec(TIED_KEY, EmbeddingPipe, model.model.embed_tokens) if cfg.tie_word_embeddings
              else LayerSpec(EmbeddingPipe, model.model.embed_tokens)]
    layers += [DecoderLayerPipe(layer, cache, checkpointing) for layer in model.model.layers]
    layers.append(NormPipe(norm))
    layers.append(TiedLayerSpec(TIED_KEY, EmbeddingPipe, model.model.embed_tokens, forward_fn=tied_head)
                  if cfg.tie_word_embeddings else HeadPipe(model.lm_head))
    pipe = PipelineModule(layers, num_stages=pp, loss_fn=next_token_loss, partition_method="type:DecoderLayerPipe")
    release_other_stages(pipe, layers)
    return pipe


def release_other_stages(pipe, layers) -> None:
    """Free the weights of the layers another stage runs: the PipelineModule keeps its whole layer list (and specs keep
    their source modules), so without this every rank would hold the whole model in fp32 beside its stage."""
    local = {id(p) for p in pipe.parameters()}
    for layer in layers:
        args = [layer] if isinstance(layer, nn.Module) else layer.module_args
        modules = [a for a in args if isinstance(a, nn.Module)]
        for module in modules:
            for param in module.parameters():
                if id(param) not in local:
                    param.data = torch.empty(0, dtype=param.dtype)


def hf_names(num_layers: int, tied: bool) -> dict[str, str]:
    """{PipelineModule parameter name: its ZeroLMForCausalLM / LlamaForCausalLM name}, for pipeline_model's layer order
    (index 0 the embedding, 1..L the decoder layers, L+1 the norm, L+2 an untied head). Decoder entries are prefixes."""
    names = {(f"tied_modules.{TIED_KEY}.weight" if tied else "0.weight"): "model.embed_tokens.weight"}
    names.update({f"{i + 1}.": f"model.layers.{i}." for i in range(num_layers)})
    names[f"{num_layers + 1}.weight"] = "model.norm.weight"
    if not tied:
        names[f"{num_layers + 2}.weight"] = "lm_head.weight"
    return names


def to_hf_name(name: str, num_layers: int, tied: bool) -> str:
    """A PipelineModule parameter name as the HF model's (`hf_names`)."""
    for pipe, hf in hf_names(num_layers, tied).items():
        if name == pipe or (pipe.endswith(".") and name.startswith(pipe)):
            return hf + name[len(pipe):]
    raise KeyError(name)


def alias_universal(universal_dir, model_cfg) -> None:
    """A universal checkpoint (checkpoint.to_universal) keeps one folder per parameter, named as the engine that saved
    it names them: a pipeline's (`3.mlp.up_proj.weight`) or the HF model's (`model.layers.2.mlp.up_proj.weight`).
    Link each under the other name too, so either engine (any pp, or none) loads it."""
    from pathlib import Path

    if type(model_cfg).__name__ != "ZeroLMConfig" or getattr(model_cfg, "num_local_experts", 0):
        return
    layers, tied = model_cfg.num_hidden_layers, model_cfg.tie_word_embeddings
    zero = Path(universal_dir) / "zero"
    pipe_of = {}
    for d in zero.iterdir():
        try:
            pipe_of[to_hf_name(d.name, layers, tied)] = d.name
        except KeyError:
            continue
    for hf, pipe in pipe_of.items():  # saved by a pipeline: link the HF names
        if not (zero / hf).exists():
            (zero / hf).symlink_to(pipe)
    if pipe_of:
        return
    for pipe_prefix, hf_prefix in hf_names(layers, tied).items():  # saved without one: link the pipeline's names
        for d in list(zero.iterdir()):
            if d.name == hf_prefix or (hf_prefix.endswith(".") and d.name.startswith(hf_prefix)):
                alias = zero / (pipe_prefix + d.name[len(hf_prefix):])
                if not alias.exists():
                    alias.symlink_to(d.name)


def check_pipeline(recipe, ds_config: dict) -> None:
    """What only the DeepSpeed config shows about parallel.pp (the planner's check_pipeline refuses the rest — other
    degrees, models, stages, accumulation — for `zero-trainer plan --pp` and runs alike): one UsageError."""
    from .ds_config import zero_stage
    from .errors import UsageError

    clip = float(ds_config.get("gradient_clipping", 0) or 0)
    if recipe.parallel.pp > 1 and zero_stage(ds_config) == 0 and recipe.train.precision == "fp32" and clip > 0:
        raise UsageError("fp32 ZeRO-0 with gradient clipping under parallel.pp: DeepSpeed 0.19.8 computes the global "
                         "gradient norm from the first stage's parameters only (runtime/utils.py clip_grad_norm_), so "
                         "clipping would scale by a wrong norm", "train.grad_clip",
                         "use --ds-config zero1 (its norm is right), or train.precision=bf16, or train.grad_clip=0")
