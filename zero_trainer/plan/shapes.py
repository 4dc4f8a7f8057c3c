"""What is planned: a model's shape (a preset, a config.json or a transformers config: exact parameter counts,
a mixture of experts' too, and what one AutoTP rank holds) and the workload (sequence, micro batch, precision,
parallel degrees)."""

import dataclasses
import math
import os
from dataclasses import dataclass

from ..errors import UsageError, did_you_mean
from ..hardware import Hardware
from ..presets import PRESETS

# ---------------------------------------------------------------------------------------------------------------
# what is planned: a model shape, the hardware, the workload


@dataclass(frozen=True)
class ModelShape:
    name: str
    params: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    max_positions: int | None
    largest_param: int  # elements of the largest single tensor (the embedding, usually)
    layer_params: int  # one decoder layer: what ZeRO-3 gathers at a time
    norm_params: int  # 1-D weights (the norms): under ZeRO-3's persistence threshold, kept whole on every rank
    param_sizes: tuple = ()  # every parameter's elements in the order DeepSpeed meets them (sub-groups, prefetch)
    experts: int = 0  # a MoE's experts per layer (0: dense); each of `ffn` width
    experts_per_token: int = 0
    model_type: str = ""  # the config's model_type: "zero_lm" is zero_trainer's own model (model.py)
    tied_embeddings: bool = True  # the head reuses the embedding matrix (tie_word_embeddings)

    @property
    def pipelines(self) -> bool:
        """Whether the pipeline runtime can split it into stages: zero_trainer's own dense model only."""
        return self.model_type == "zero_lm" and not self.experts


def _llama_shape(name: str, c: dict) -> ModelShape:
    """Exact parameter counts of zero_trainer.model's Llama from its config fields (tests compare with a meta build)."""
    if c.get("num_local_experts"):
        return _moe_shape(name, c)
    h, f, L, H, V = (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["num_attention_heads"],
                     c["vocab_size"])
    kv = c.get("num_key_value_heads") or H
    hd = h // H
    layer = 2 * h * H * hd + 2 * h * kv * hd + 3 * h * f + 2 * h  # q, o; k, v; gate, up, down; two norms
    tied = c.get("tie_word_embeddings", True)
    params = V * h * (1 if tied else 2) + L * layer + h
    # model.py's order: embedding; per layer norm, q, k, v, o, norm, gate, up, down; final norm; untied head
    one_layer = (h, h * H * hd, h * kv * hd, h * kv * hd, h * H * hd, h, h * f, h * f, h * f)
    sizes = (V * h,) + one_layer * L + (h,) + (() if tied else (V * h,))
    return ModelShape(name, params, h, L, H, kv, f, V, c.get("max_position_embeddings"),
                      largest_param=max(V * h, h * f, h * H * hd), layer_params=layer, norm_params=(2 * L + 1) * h,
                      param_sizes=sizes, model_type="zero_lm", tied_embeddings=bool(tied))


# --- mixture of experts --------------------------------------------------------------------------------------


def _moe_shape(name: str, c: dict) -> ModelShape:
    """zero_trainer.model's MoE: the Llama shape with a router and E experts (fused gate_up and down tensors) where
    the MLP was. Exact, like _llama_shape. ZeRO-3 gathers the MoE block whole (a leaf module): layer_params holds it."""
    dense = _llama_shape(name, {**c, "num_local_experts": 0})
    h, f, L, E = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["num_local_experts"]
    extra = E * h + (E - 1) * 3 * h * f  # per layer: the router, and E experts where the MLP was one
    one_layer = dense.param_sizes[1:7] + (E * h, E * 2 * f * h, E * h * f)
    sizes = dense.param_sizes[:1] + one_layer * L + dense.param_sizes[1 + 9 * L:]
    return dataclasses.replace(dense, params=dense.params + L * extra, layer_params=dense.layer_params + extra,
                               largest_param=max(dense.largest_param, E * 2 * f * h), param_sizes=sizes,
                               experts=E, experts_per_token=c.get("num_experts_per_tok", 1))


def expert_params(shape: ModelShape) -> int:
    """Parameters in experts (0 for a dense model)."""
    return shape.layers * shape.experts * 3 * shape.hidden * shape.ffn


def active_params(shape: ModelShape) -> int:
    """Parameters one token uses: the experts its router skips are not counted."""
    if not shape.experts:
        return shape.params
    return shape.params - expert_params(shape) * (shape.experts - shape.experts_per_token) // shape.experts


def model_shape(model, where: str = "--model") -> ModelShape:
    """A preset name, a local config.json (file or dir), or a transformers config. Raises UsageError."""
    if isinstance(model, ModelShape):
        return model
    if isinstance(model, str) and model in PRESETS:
        return _llama_shape(model, PRESETS[model])
    if isinstance(model, str) and not os.path.exists(model):
        raise UsageError(f"unknown model preset '{model}'", where,
                         did_you_mean(model, PRESETS) + " (or give a local config.json)")
    cfg = model
    if not hasattr(cfg, "to_dict"):
        from ..model import model_config

        try:
            cfg = model_config(model)
        except (ValueError, OSError, TypeError) as err:
            raise UsageError(f"'{model}' is not a usable causal-LM config: {str(err).splitlines()[0]}", where,
                             "give a preset name or a local config.json of a causal decoder LM") from None
    return shape_from_config(cfg, name=str(model) if isinstance(model, str) else "")


def shape_from_config(cfg, name: str = "") -> ModelShape:
    """The shape of a transformers config: exact for zero_lm, counted on the meta device for anything else."""
    name = name or getattr(cfg, "model_type", "model")
    if getattr(cfg, "model_type", None) == "zero_lm":
        return _llama_shape(name, cfg.to_dict())
    import torch

    from ..model import build_model

    with torch.device("meta"):
        model = build_model(cfg)
    sizes = [p.numel() for p in model.parameters()]
    h, L = cfg.hidden_size, cfg.num_hidden_layers
    H = cfg.num_attention_heads
    embed = cfg.vocab_size * h
    return ModelShape(name, sum(sizes), h, L, H, getattr(cfg, "num_key_value_heads", None) or H,
                      getattr(cfg, "intermediate_size", None) or 4 * h, cfg.vocab_size,
                      getattr(cfg, "max_position_embeddings", None), largest_param=max(sizes),
                      layer_params=max(1, (sum(sizes) - embed) // max(L, 1)),
                      norm_params=sum(n for n in sizes if n <= h), param_sizes=tuple(sizes),
                      model_type=getattr(cfg, "model_type", "") or "",
                      tied_embeddings=bool(getattr(cfg, "tie_word_embeddings", True)))


@dataclass(frozen=True)
class Workload:
    seq_len: int
    micro_batch: int
    precision: str = "bf16"
    tp: int = 1  # AutoTP degree
    sp: int = 1  # Ulysses degree: each rank holds seq_len / sp tokens
    tiled_mlp: bool = False
    tiled_loss: bool = False
    trainable: int | None = None  # LoRA: the parameters that train (frozen ones have no grads or optimizer states)
    pp: int = 1  # pipeline degree: the decoder layers run as pp stages (DeepSpeed's PipelineModule, 1F1B)
    # micro-batches per optimizer step (gradient accumulation steps, DeepSpeed's micro_batches): the m of 1F1B, which
    # sets how many micro-batches a stage holds in flight and the bubble; nothing reads it at pp 1
    micro_batches: int = 1

    @property
    def weight_bytes(self) -> int:
        return 4 if self.precision == "fp32" else 2

    @property
    def local_seq_len(self) -> int:
        return self.seq_len // self.sp

    @property
    def tiling(self) -> int:
        """0: none, 1: the loss, 2: the loss and the MLP (the order the planner adds them in)."""
        return int(self.tiled_loss) + int(self.tiled_mlp)

    @property
    def pipeline_bubble(self) -> float:
        """The share of a 1F1B step a stage idles: (pp - 1) / (m + pp - 1) (0 without a pipeline)."""
        return (self.pp - 1) / (self.micro_batches + self.pp - 1)


def zero_ranks(hw: Hardware, workload: Workload) -> int:
    """Ranks ZeRO partitions over: every rank without AutoTP (its ranks hold different shards, so ZeRO runs over the
    data-parallel group, world / tp); Ulysses' ranks count (ZeRO runs over its sequence-data-parallel group); with a
    pipeline, the data-parallel ranks of one stage (world / pp: PipeDataParallelTopology)."""
    return hw.world_size // (workload.tp * workload.pp)


def tp_rank_shape(shape: ModelShape, tp: int) -> ModelShape:
    """The parameters one AutoTP rank holds: DeepSpeed's llama preset (autotp_config.py) shards the q/k/v/o and
    gate/up/down projections by tp; the embedding and the untied head (vocab × hidden) and the norms stay whole."""
    if tp == 1:
        return shape
    whole = shape.vocab * shape.hidden
    if not shape.param_sizes:  # a hand-built shape: the largest tensor (the embedding) and the norms stay whole
        split = shape.params - shape.largest_param - shape.norm_params
        return dataclasses.replace(shape, params=shape.params - split + math.ceil(split / tp))
    sizes = tuple(n if n <= shape.hidden or n == whole else math.ceil(n / tp) for n in shape.param_sizes)
    layer_norms = 2 * shape.hidden
    return dataclasses.replace(shape, params=sum(sizes), largest_param=max(sizes), param_sizes=sizes,
                               layer_params=layer_norms + math.ceil((shape.layer_params - layer_norms) / tp))
