"""The planner: which rung of the ZeRO ladder trains a model on given hardware, predicted before anything is allocated.

    zero-trainer plan --model 7b --gpus-per-node 8 --gpu-mem 80      # a table of every rung, then the choice
    zero-trainer plan --model 8b.json --seq-len 524288 --gpus-per-node 8 --gpu-mem 80   # sp (Ulysses) when needed
    zero-trainer plan --model 7b --gpus-per-node 8 --gpu-mem 24 --pp 4   # a pipeline: each stage, and the bubble
    deepspeed.config: auto                                            # resolve.py asks plan_recipe() instead

Nothing here imports torch or deepspeed on the common path (presets, no GPU): `plan --model 70b` answers in well
under a second. DeepSpeed JSON is read through ds_config.py, the one module that knows it.

The memory model, per rank (Ψ parameters, N = the ranks ZeRO partitions over: nodes × gpus_per_node, ÷ tp with
AutoTP; w = 2 bytes a weight for bf16/fp16 and 4 for fp32, s = seq_len (÷ sp with Ulysses), b = micro batch,
h/f/V/L/H = hidden, ffn, vocab, layers, heads):

Model states — ZeRO paper (Rajbhandari et al. 2020, §3): mixed-precision Adam keeps 2Ψ weights + 2Ψ gradients +
KΨ optimizer states with K = 12 (fp32 master copy, momentum, variance); stage 1 divides the K part by N, stage 2
also the gradients, stage 3 also the weights. DeepSpeed's estimate_zero2/zero3_model_states_mem_needs give the same
per-GPU numbers (and, with offload, CPU 16-18 bytes a parameter times a flat 1.5 buffer factor). fp32 training keeps
4 + 4 + 8 (momentum, variance; the weights are the master). What DeepSpeed 0.19.8 really holds differs in ways
that cost memory, found by reading it and confirmed by the calibration below (`STATE_BYTES`):
  - bf16/fp16 at stage 0 goes through FP16_Optimizer: an fp32 flat master, and at step() an fp32 copy of the
    flattened gradients (4Ψ) on top of the 2Ψ low-precision ones.
  - stages 1 and 2 clone an fp32 master partition even in fp32 training, and at step() flatten the gradient
    partition into a new fp32 tensor (4Ψ/N); stage 1 keeps full-size gradients (wΨ) until the step.
  - stage 3 keeps a flat gradient partition (wΨ/N) plus an fp32 gradient buffer the size of its largest
    sub-group; its parameters live in flat partitions plus what is gathered (below).
  - offload moves the fp32 master, fp32 gradients and Adam moments to CPU memory (16Ψ/N) and, at stage 3, the
    parameter partitions and the low-precision gradient partition too (pinned).
  - NVMe (ZeRO-Infinity) moves the optimizer (fp32 master, moments, fp32 gradients: 16Ψ/N) and the parameter
    partitions (wΨ/N) to disk, and keeps pinned CPU swap buffers whose sizes come from the JSON:
    offload_optimizer.buffer_count × min(sub_group_size, Ψ/N) fp32 elements, offload_param.buffer_count ×
    buffer_size elements, and min(max_in_cpu, Ψ/N) parameter elements cached in CPU memory.
Buffers, read from the resolved JSON ("auto" filled as HF does: reduce_bucket_size = h² (at least
min(Ψ, 1M) elements: ds_config.MIN_REDUCE_BUCKET), prefetch = 0.9·h²,
persistence threshold = 10·h): the gradient reduce bucket (reduce_bucket_size × w, twice with overlap_comm);
allgather_bucket_size only chunks an in-place all-gather (utils.all_gather_dp_groups), so it costs nothing;
at stage 3 the gathered parameters and the tensors under stage3_param_persistence_threshold (the norms), kept
whole. A gathered layer stays whole until its backward when fewer than stage3_max_reuse_distance parameters are
fetched in between (partitioned_param_coordinator.py): about the last reuse/2 parameters of the forward, plus the
layer in use and the prefetch bucket, capped by stage3_max_live_parameters.
Stage-2 offload adds a device and a pinned CPU buffer of the largest parameter (temp_grad_buffer_for_*_offload).

Activations — Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", give
s·b·h·(34 + 5·a·s/h) bytes per layer for a GPT layer in fp16. This model's layer differs, so the tensors autograd
saves were counted (torch.autograd.graph.saved_tensors_hooks on this repo's model, any s, b, dtype) and the count
is exact: per layer s·b·(8h + 6·w·h + 2·w·kv·d + 4·w·f + 4H) bytes — the two RMSNorms save their fp32 input (8h)
and two w-byte tensors each; attention saves q and the output (2wh) and k and v at the key/value heads' width
(2·w·kv·d, d = h/H: transformers' sdpa hands GQA to the kernel unrepeated); SwiGLU saves four ffn-wide tensors
(4wf); the fused SDPA kernel saves an fp32 logsumexp (4H) and no s² score matrix (flash/memory-efficient kernels
on GPU, the flash kernel on CPU: measured, identical bytes for s = 512·b = 4 and s = 2048·b = 1). The loss head
peaks at 12 bytes a logit (b·s·V·12: the fp32 logits, their log-softmax and its gradient — measured 12.2-12.5 for
bf16 and fp32 alike), often the largest single term.
With activation checkpointing each layer keeps only its input (w·s·b·h) and one layer is recomputed at a time.

Tensor and sequence parallelism (parallel.tp / parallel.sp, `plan --tp / --sp`; world = dp × tp × sp):
  - AutoTP (tensor_parallel.autotp_size with DeepSpeed's llama preset, module_inject/autotp_config.py) splits
    q/k/v/gate/up by their output and o/down by their input dimension over tp ranks; the embedding, an untied head
    and the norms match no pattern and stay whole on every TP rank (`tp_rank_shape`). ZeRO partitions what one TP
    rank holds over the data-parallel group only, N = world / tp (`zero_ranks`). Inside attention and the MLP the
    head- and ffn-wide activations (q, k, v, output, logsumexp, the four ffn tensors) are ÷ tp; the norms' tensors,
    the residual stream and the loss head are full size on each TP rank.
  - Ulysses (runtime/sequence_parallel/ulysses_sp.py) gives each rank s/sp tokens of every activation, the loss head
    included. Attention all-to-alls q, k, v from [s/sp, heads] to [s, heads/sp] and the output back: same bytes
    as before, plus ALL_TO_ALL_COPIES buffers of each during the call (kv heads fewer than sp are replicated up to
    sp first). ZeRO partitions over the whole dp·sp group, N = world, as plain data parallelism at that size.
  - Tiling (parallel.tiled_loss / tiled_mlp, ALST — Bekman et al. 2025): the loss runs over loss_tiles() tiles of
    about LOSS_TILE_LOGIT_BYTES of fp32 logits, each checkpointed: one tile's LOGIT_BYTES a logit exist at once, an
    upper bound, as chunked_cross_entropy inside a tile keeps no fp32 copy of its logits (plus the gradient
    of the head's input); TiledMLP runs each MLP over mlp_tiles() = ceil(s/sp / h) tiles and keeps only its input,
    so the four ffn-wide tensors exist for one tile of one layer (plus the gradient of its input).
  Not modelled: activation checkpoint offload to CPU (ALST's trick for 500k tokens on one GPU).

Pipeline parallelism (parallel.pp, `plan --pp`; world = dp × pp, beside neither tp nor sp; zero_trainer's own dense
model only, `ModelShape.pipelines`):
  - DeepSpeed's PipelineModule cuts the decoder layers into pp stages of whole layers (partition_method
    "type:DecoderLayerPipe": layers // pp each, the first layers % pp stages one more: `stage_layers`). The first
    stage also holds the embedding, the last the final norm and the head; with tied embeddings that head is a copy
    of the embedding (TiedLayerSpec), so both stages hold its weights, gradients and optimizer states
    (`pipeline_stages`, as zero_trainer/pipeline.py builds them).
  - ZeRO partitions a stage's parameters over that stage's data-parallel ranks, N = world / pp (ranks [s·N, (s+1)·N)
    are stage s: PipeDataParallelTopology). Beside a pipeline DeepSpeed runs ZeRO 0 and 1 only (a named JSON may
    offload the optimizer to CPU; nothing else offloads: `pipeline_rung_problem`) and turns overlap_comm off. ZeRO-0
    in bf16 goes through BF16_Optimizer there: the fp32 master and Adam moments partitioned as at ZeRO-1 and a bf16
    gradient accumulation buffer beside the gradients (`bf16_pipeline_states`). The ladder under a pipeline is
    PIPELINE_LADDER, ZeRO-0 in bf16 only (the runtime refuses fp32 ZeRO-0 with gradient clipping: a DeepSpeed bug).
  - 1F1B (DeepSpeed's TrainSchedule) with m micro-batches a step (gradient accumulation, train.grad_accum; the
    runtime wants m ≥ pp, one a stage in flight): stage s holds the activations of min(pp − s, m) micro-batches at
    once, of its own layers only (checkpointed: each layer's input per micro-batch, one layer recomputed live), and
    rope's cos and sin for each; the final norm and the loss head exist on the last stage only. The pipe engine
    keeps max(2, min(pp − s, m)) input and output slots, each one micro-batch's [b, s, h] activation in the run's
    dtype with its int64 position ids (token ids on the first stage, labels on the last), and one receive buffer
    for activations and one for gradients (`pipeline_activation_terms`). With m ≥ pp the first stage thus keeps as
    many layer activations as the whole model does without a pipeline: a pipeline divides model states, not the
    first stage's activations.
  - A layout fits when its heaviest stage fits; on a CPU-only node the node's ranks, of whichever stages, share the
    RAM: their sum must fit. The bubble, the share of a step each stage idles, is (pp − 1)/(m + pp − 1); the plan
    warns below BUBBLE_MICRO_BATCHES·pp micro-batches a step.
  Not measured yet on this machine: the pipe engine's own overhead (its rung's RUNTIME_BYTES stands in).

Runtime overhead, measured on this CPU machine (bench/plan_calibration.py): a rank's process after importing torch
and deepspeed and init_distributed holds HOST_PROCESS_BYTES of RSS before any model exists; the engine, data
loader and allocator then add RUNTIME_BYTES whatever the model (per stage: DeepSpeed's ZeRO optimizer wrapper at
stages 1-3 adds ~40 MiB over stage 0's). On a GPU the device also holds the CUDA context and
library workspaces, DEVICE_RUNTIME_BYTES, which this CPU machine cannot measure: it is the one assumed number.

CPU-only machines: the "device" is the CPU, every rank on a node shares its RAM, and offload to CPU moves bytes
within the same memory. A rung fits when ranks × (everything one rank holds) fits the RAM; offload never helps.

Choice rule: keep SAFETY_MARGIN (10%) of every memory free for what the model does not see (allocator
fragmentation, a longer eval batch, the OS), then take the cheapest candidate that fits (`preference_key`):
rungs that keep everything on the device first, then CPU offload, then NVMe; within each group without activation
checkpointing before with it, and less sharding before more. Recomputing every layer costs about a third more
compute on every step, but offload puts the CPU (Adam on the CPU, PCIe copies) on the critical path of every step,
which costs more; once the optimizer runs on the CPU anyway, DeepSpeed overlaps parameter fetches with compute, so
avoiding recomputation comes first there. NVMe rungs only when NVMe space is given. Only when no candidate fits does
the planner tile the loss (it recomputes nothing), then the MLP too (recomputed in backward), and only when nothing
fits at sp 1 even so does it search sp (`plan_model(sp=None)`; deepspeed.config auto with parallel.sp 1): the
smallest degree that divides world / tp, seq_len and the heads, and whose kv heads Ulysses can shard or replicate.
Only when nothing fits with the sp search either does it search pp (`plan_model(pp=None)`; auto with parallel.pp 1
too, zero_trainer's dense model): the smallest degree that divides the world size and is at most the layers, each
planned at sp 1 (the two do not combine) on ZeRO 0/1 without added tiling. Last, because a pipeline idles each stage
for the bubble and leaves the first stage's activations whole, while sp divides every activation. It never picks tp,
and never searches sp or pp beside tp > 1 (nor pp beside a fixed sp). When nothing fits, the error names the
candidate that needs the least extra memory, and how much of which.
"""

import dataclasses
import math
import os
from dataclasses import dataclass, field

from .ds_config import (
    DS_CONFIG_DIR,
    fill_sized,
    load_ds_config,
    offload_device,
    resolve_auto_values,
    uses_nvme,
    zero_stage,
)
from .errors import UsageError, did_you_mean
from .hardware import GiB, Hardware, free_bytes, local_gpus, local_world_size, physical_memory_bytes
from .presets import PRESETS
from .recipe import PRECISIONS, Recipe

# zero3_offload_optimizer (optimizer on CPU, parameters on the device) sits between zero3 and zero3_offload when
# its JSON exists; the ladder is read in this order from ds_configs/.
LADDER = ("zero0", "zero1", "zero2", "zero2_offload", "zero3", "zero3_offload_optimizer", "zero3_offload",
          "zero3_nvme")
SAFETY_MARGIN = 0.10
DEFAULT_SEQ_LEN = 2048

# Measured by bench/plan_calibration.py on this machine (see bench/results/plan_calibration.json, "overhead"):
HOST_PROCESS_BYTES = 452 * 2**20  # RSS of a rank after importing torch + deepspeed and init_distributed
# What a run adds above that whatever the model (data, engine, allocator), measured with a 4k-parameter model at world
# size 1 and 2: 41 MiB at stage 0, 82-84 MiB with the ZeRO optimizer (stages 1-3, offload included), 2026-11-28. The
# same pins installed a day earlier measured 59-60 / 101-105 MiB (the rows of that install are in the calibration
# file, within ±15% of these values): the constant moves with the install, not with the trainer.
RUNTIME_BYTES = {0: 41 * 2**20, 1: 84 * 2**20, 2: 84 * 2**20, 3: 84 * 2**20}
# Not measurable without a GPU: CUDA context, cuBLAS/NCCL workspaces, caching-allocator slack. Assumed.
DEVICE_RUNTIME_BYTES = 1 * GiB
LOGIT_BYTES = 12  # peak bytes per logit of the loss head (measured, bf16 and fp32)
# CPU offload holds another 4 bytes per partition element beyond the tensors traced in DeepSpeed's code (measured:
# minimind-26m/104m, zero2_offload and zero3_offload at world size 1 and 2).
OFFLOAD_EXTRA = 4

# Tiling (parallel.tiled_loss / tiled_mlp): the runtime imports these, so the run cuts the tiles the plan counted.
LOSS_TILE_LOGIT_BYTES = GiB  # fp32 logits of one loss tile (ALST's 1 GiB slices); a tile peaks at LOGIT_BYTES a logit
ALL_TO_ALL_COPIES = 2  # Ulysses: a contiguous send buffer and the received tensor exist together, per q/k/v/output


def loss_tiles(tokens: int, vocab: int, tile_bytes: int | None = None) -> int:
    """Tiles the tiled loss cuts a rank's tokens (micro batch × its sequence slice) into (at most one a token)."""
    return min(tokens, max(1, math.ceil(4 * tokens * vocab / (tile_bytes or LOSS_TILE_LOGIT_BYTES))))


def mlp_tiles(seq_tokens: int, hidden: int) -> int:
    """Tiles TiledMLP cuts a rank's sequence slice into: ALST's rule, ceil(tokens / hidden)."""
    return max(1, math.ceil(seq_tokens / hidden))


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


def moe_activation_bytes(shape: ModelShape, workload: "Workload", checkpointing: bool) -> int:
    """What a MoE layer holds beyond activation_bytes' dense MLP (one expert's width per token): the k-1 further
    experts per token, and the dispatch and combine buffers ([experts, capacity, hidden], before and after each
    all-to-all: 4 per layer) at a balanced capacity of tokens*k/experts. Capacity follows the busiest expert (no token
    is dropped), so a collapsed router can make it k*experts/k = up to experts times this."""
    if not shape.experts:
        return 0
    s, b, w, k = workload.seq_len, workload.micro_batch, workload.weight_bytes, shape.experts_per_token
    per_layer = s * b * ((k - 1) * 4 * w * shape.ffn + 4 * k * w * shape.hidden)
    return per_layer if checkpointing else shape.layers * per_layer


def expert_parallel_split(shape: ModelShape, ep: int, world_size: int, workload: "Workload") -> dict:
    """Per-rank expert numbers at expert-parallel degree `ep` (ZeRO-1/2, deepspeed.moe): each rank holds experts/ep
    of every layer's experts, its weights and gradients whole, its optimizer state partitioned over the world/ep
    ranks that hold the same experts; the all-to-all sends each MoE layer's dispatch and combine buffers."""
    w, s, b = workload.weight_bytes, workload.seq_len, workload.micro_batch
    local = expert_params(shape) // max(ep, 1)
    buffer = s * b * shape.experts_per_token * shape.hidden * w  # [experts, capacity, hidden] at balanced capacity
    return {"experts_per_rank": shape.experts // max(ep, 1), "expert_params_per_rank": local,
            "expert_weight_and_grad_bytes": 2 * w * local,
            "expert_optimizer_bytes": 12 * local // max(world_size // max(ep, 1), 1),
            "all_to_all_bytes_per_layer": 2 * buffer if ep > 1 else 0,
            "all_to_all_bytes_per_layer_worst": 2 * buffer * shape.experts // max(shape.experts_per_token, 1)
            if ep > 1 else 0}


def experts_line(shape: ModelShape, ep: int, world_size: int, workload: "Workload") -> str:
    """A MoE's experts in one line for `zero-trainer plan`: total vs active parameters, the split at `ep`."""
    split = expert_parallel_split(shape, ep, world_size, workload)
    line = (f"experts: {shape.experts} per layer x {shape.layers} layers, top-{shape.experts_per_token}; "
            f"{shape.params / 1e6:.2f}M parameters, {active_params(shape) / 1e6:.2f}M active per token; at ep={ep} "
            f"{split['experts_per_rank']} experts a rank ({split['expert_params_per_rank'] / 1e6:.2f}M parameters)")
    if ep > 1:
        mib = {k: split[k] / 2**20 for k in ("all_to_all_bytes_per_layer", "all_to_all_bytes_per_layer_worst")}
        line += (f", all-to-all {mib['all_to_all_bytes_per_layer']:.1f} MiB a MoE layer when balanced, up to "
                 f"{mib['all_to_all_bytes_per_layer_worst']:.1f} MiB; the rung is chosen as if every rank held "
                 "every expert")
    return line


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
        from .model import model_config

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

    from .model import build_model

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


# ---------------------------------------------------------------------------------------------------------------
# pipeline parallelism: the decoder layers cut into stages, micro-batches flowing through them (1F1B)

PIPELINE_LADDER = ("zero0", "zero1")  # DeepSpeed refuses ZeRO-2/3 beside a PipelineModule
MEMORY_OPT_ALLREDUCE_SIZE = 500_000_000  # elements the pipe engine's gradient all-reduce flattens at once
INDEX_BYTES = 8  # int64 token ids, position ids and labels that travel with a micro-batch
BUBBLE_MICRO_BATCHES = 4  # micro-batches a step per stage that keep the bubble small: m >= 4·pp (Megatron's advice)


@dataclass(frozen=True)
class PipelineStage:
    index: int
    layers: int  # decoder layers
    shape: ModelShape  # what it holds: its layers; the first stage the embedding, the last the final norm and the head
    in_flight: int  # micro-batches whose activations it holds at once under 1F1B: min(pp - index, m)
    pipe_buffers: int  # the engine's buffer slots per kind: TrainSchedule.num_pipe_buffers() = max(2, in_flight)
    first: bool
    last: bool

    @property
    def params(self) -> int:
        return self.shape.params


def stage_layers(layers: int, pp: int) -> list[int]:
    """Decoder layers per stage. DeepSpeed's partition_method "type:DecoderLayerPipe" runs partition_balanced on
    one-hot weights, which gives every stage layers // pp and the first layers % pp stages one more (checked against
    it in tests/test_plan_pp.py)."""
    return [layers // pp + (i < layers % pp) for i in range(pp)]


def _layer_sizes(shape: ModelShape) -> tuple:
    """One decoder layer's tensors in model order (the layer's parameters as one tensor for a hand-built shape)."""
    extra = 2 + (0 if shape.tied_embeddings else 1)  # the embedding, the final norm, an untied head
    if not shape.param_sizes or (len(shape.param_sizes) - extra) % shape.layers:
        return (shape.layer_params,)
    per_layer = (len(shape.param_sizes) - extra) // shape.layers
    return tuple(shape.param_sizes[1:1 + per_layer])


def pipeline_stages(shape: ModelShape, pp: int, micro_batches: int = 1) -> list[PipelineStage]:
    """The stages DeepSpeed's PipelineModule cuts zero_trainer's model into: whole decoder layers (stage_layers); the
    first stage also holds the embedding, the last the final norm and the head (vocab × hidden) — its own when
    untied, a copy of the embedding when tied (TiedLayerSpec: both stages own the weight, its gradients are
    all-reduced between them), so with tied embeddings the stages hold one embedding more than the model has."""
    h, table = shape.hidden, shape.vocab * shape.hidden
    layer = _layer_sizes(shape)
    stages = []
    for i, n in enumerate(stage_layers(shape.layers, pp)):
        first, last = i == 0, i == pp - 1
        sizes = ((table,) if first else ()) + layer * n + ((h, table) if last else ())
        held = dataclasses.replace(shape, params=sum(sizes), layers=n, largest_param=max(sizes), param_sizes=sizes,
                                   norm_params=2 * h * n + (h if last else 0))
        in_flight = min(pp - i, micro_batches)
        stages.append(PipelineStage(i, n, held, in_flight, max(2, in_flight), first, last))
    return stages


def pipeline_activation_terms(shape: ModelShape, workload: Workload, checkpointing: bool,
                              stage: PipelineStage) -> dict:
    """activation_bytes by term on one pipeline stage: `layers` (what its layers keep for backward, for each of the
    micro-batches in flight), `live` (the layer being recomputed or run backward), `all_to_all` (0: no Ulysses beside a
    pipeline), `loss` (rope's cos and sin for each micro-batch in flight; on the last stage the final norm and the
    loss head), `pipe` (the pipe engine's buffers, pipe/engine.py: input and output slots of pipe_buffers per
    micro-batch — the received activation, kept until its gradient is sent, and the stage's output, kept until
    its backward — each a [b, s, h] tensor in the run's dtype with the int64 position ids; the first stage's input
    slots hold token and position ids, the last stage's output slots its labels; plus one receive buffer for
    activations (not on the first stage) and one for gradients (not on the last))."""
    one = activation_terms(dataclasses.replace(shape, layers=1), workload, checkpointing)
    tokens, w, h = workload.local_seq_len * workload.micro_batch, workload.weight_bytes, shape.hidden
    rope = tokens * 2 * w * (h // shape.heads)
    activation, ids = w * tokens * h, INDEX_BYTES * tokens
    inputs = 2 * ids if stage.first else activation + ids
    outputs = ids if stage.last else activation + ids
    receive = (0 if stage.first else activation + ids) + (0 if stage.last else activation)
    return {"layers": stage.in_flight * stage.layers * one["layers"], "live": one["live"], "all_to_all": 0,
            "loss": (one["loss"] - rope if stage.last else 0) + stage.in_flight * rope,
            "pipe": stage.pipe_buffers * (inputs + outputs) + receive}


def bf16_pipeline_states(shape: ModelShape, world_size: int) -> dict:
    """Device bytes of one rank's model states at ZeRO-0 in bf16 under a pipeline. DeepSpeed then wraps the optimizer
    in BF16_Optimizer (engine.py _do_optimizer_sanity_check), not FP16_Optimizer: the bf16 weights and their
    gradients, a flat gradient accumulation buffer in the gradient-accumulation dtype (bf16 unless
    data_types.grad_accum_dtype says otherwise), and the fp32 master and Adam moments partitioned over the stage's
    data-parallel ranks as at ZeRO-1 (12Ψ/N); at step() the gradient partition is cast to fp32 (4Ψ/N), and before it
    the gradient all-reduce flattens up to MEMORY_OPT_ALLREDUCE_SIZE elements at once (the larger of the two)."""
    P = shape.params
    part = math.ceil(P / world_size)
    return {"params": 2 * P, "grads": 2 * P + 2 * P + max(4 * part, 2 * min(P, MEMORY_OPT_ALLREDUCE_SIZE)),
            "optimizer": 12 * part, "buffers": 0}


def pipeline_parallel_degrees(shape: ModelShape, hw: Hardware, micro_batches: int | None = None) -> list[int]:
    """The degrees a pp search tries, smallest first: divisors of the world size up to the layers (a stage needs
    one) and up to the micro-batches a step where they are fixed (the runtime wants one a stage in flight), for
    zero_trainer's own dense model only."""
    if not shape.pipelines:
        return []
    top = min(hw.world_size, shape.layers, micro_batches or hw.world_size)
    return [d for d in range(2, top + 1) if hw.world_size % d == 0]


def default_micro_batches(pp: int) -> int:
    """`plan --pp` without --grad-accum: enough micro-batches that the bubble stays small (BUBBLE_MICRO_BATCHES·pp)."""
    return BUBBLE_MICRO_BATCHES * pp if pp > 1 else 1


def pipeline_rung_problem(rung: "Rung") -> str:
    """Why a JSON cannot run under a pipeline ("" if it can): DeepSpeed refuses ZeRO-2/3 beside a PipelineModule, and
    parameter or NVMe offload (zero_trainer/pipeline.py check_pipeline refuses the same; it also refuses fp32 ZeRO-0
    with gradient clipping, a DeepSpeed bug under PP, by train.grad_clip)."""
    if rung.stage > 1:
        return f"it is ZeRO stage {rung.stage}; DeepSpeed's pipeline engine runs ZeRO 0 and 1 only"
    if rung.uses_nvme or rung.offload_param != "none":
        return "it offloads parameters or to NVMe; only CPU optimizer offload runs with the pipeline engine"
    return ""


# ---------------------------------------------------------------------------------------------------------------
# the rungs: DeepSpeed JSON read through ds_config.py


@dataclass(frozen=True)
class Rung:
    name: str
    stage: int
    offload_optimizer: str  # none | cpu | nvme
    offload_param: str
    zero: dict = field(repr=False)  # the resolved zero_optimization block, every knob sized
    sized: dict = field(default_factory=dict, repr=False)  # the knobs the planner filled ("auto"): dotted -> value
    ds: dict = field(default_factory=dict, repr=False)  # the whole resolved config
    tighter: "Rung | None" = field(default=None, repr=False)  # the same rung holding less in RAM (NVMe params)

    @property
    def uses_nvme(self) -> bool:
        return "nvme" in (self.offload_optimizer, self.offload_param)


def ladder_rungs(shape: ModelShape, workload: Workload, hw: Hardware) -> list[Rung]:
    """Every ladder rung that has a JSON in ds_configs/, with its "auto" values filled and knobs sized for `hw`; under a
    pipeline PIPELINE_LADDER, ZeRO-0 in bf16 only (the runtime refuses fp32 ZeRO-0 with clipping, and bf16 is what it
    calibrates)."""
    names = LADDER if workload.pp == 1 else [n for n in PIPELINE_LADDER if n != "zero0" or workload.precision == "bf16"]
    return [sized_rung(name, load_ds_config(name)[1], shape, workload, hw) for name in names
            if (DS_CONFIG_DIR / f"{name}.json").is_file()]


def sized_rung(name: str, raw: dict, shape: ModelShape, workload: Workload, hw: Hardware,
               recipe: Recipe | None = None) -> Rung:
    """A DeepSpeed JSON with the recipe's and the model's "auto" values filled, and every memory knob left "auto" or out
    sized for this model on this hardware (`size_knobs`). A number the user wrote stays."""
    if recipe is None:
        recipe = Recipe()
        recipe.train.micro_batch, recipe.train.precision = workload.micro_batch, workload.precision
    held = tp_rank_shape(shape, workload.tp)
    dp = hw.world_size // (workload.tp * workload.sp * workload.pp)  # the batch counts data-parallel ranks only
    ds = resolve_auto_values(raw, recipe, world_size=dp, hidden_size=shape.hidden, params=held.params)

    def make(keep_params_in_cpu: bool) -> Rung:
        wanted = size_knobs(shape, ds, hw, workload, keep_params_in_cpu)
        filled, sized = fill_sized(ds, wanted)
        return Rung(name, zero_stage(filled), offload_device(filled, "optimizer"), offload_device(filled, "param"),
                    filled.get("zero_optimization", {}), sized, filled)

    roomy = make(True)
    if "zero_optimization.offload_param.max_in_cpu" in roomy.sized and roomy.sized[
            "zero_optimization.offload_param.max_in_cpu"] > 0:
        return dataclasses.replace(roomy, tighter=make(False))
    return roomy


# ---------------------------------------------------------------------------------------------------------------
# sizing the knobs: what DeepSpeed's buffers hold follows from the model's tensors and the memory they live in

KNOB_SHARE = 1 / 8  # of a rank's memory, for what a knob lets DeepSpeed hold beyond the model states
PIN_SHARE = 1 / 2  # of a node's RAM that may be page-locked: the OS and the page cache need the rest
DS_DEFAULT_KNOB = 10**9  # DeepSpeed's default sub group, live parameters and reuse distance; never sized above it
MIN_AIO_BYTES = 1024**2  # partitions smaller than this (or aio.block_size) stay in RAM (partitioned_param_swapper)
AIO_BLOCK_SIZE = 1024**2  # DeepSpeed's default aio.block_size
# DeepSpeed 0.19.8's defaults (zero/config.py, offload_config.py) for a zero_optimization key a JSON leaves out
ZERO_DEFAULTS = {"stage3_param_persistence_threshold": 10**5, "stage3_prefetch_bucket_size": 5 * 10**7,
                 "stage3_max_live_parameters": DS_DEFAULT_KNOB, "stage3_max_reuse_distance": DS_DEFAULT_KNOB,
                 "sub_group_size": DS_DEFAULT_KNOB, "offload_param.buffer_count": 5,
                 "offload_param.buffer_size": 10**8, "offload_param.max_in_cpu": DS_DEFAULT_KNOB,
                 "offload_optimizer.buffer_count": 4}
AIO_ALIGNED_BYTES = 1024
ADAM_STATES = {"adam": 2, "adamw": 2, "fusedadam": 2, "cpuadam": 2, "lamb": 2, "onebitadam": 2, "zerooneadam": 2,
               "onebitlamb": 2, "lion": 1, "adagrad": 1, "muon": 1, "sgd": 1}


def optimizer_states(ds: dict) -> int:
    """fp32 tensors the optimizer keeps per parameter besides the master weights (Adam: momentum and variance)."""
    kind = str((ds.get("optimizer") or {}).get("type", "adamw")).lower().replace("_", "")
    return ADAM_STATES.get(kind, 2)


def optimizer_buffers_needed(ds: dict) -> int:
    """NVMe optimizer swap buffers one sub-group takes at once: master weights, each state, the gradients
    (PartitionedOptimizerSwapper's required_buffer_count)."""
    return 1 + optimizer_states(ds) + 1


def partitions(shape: ModelShape, world_size: int) -> list[int]:
    """Each parameter's partition on one rank, in model order (DeepSpeed pads every tensor to the world size)."""
    sizes = shape.param_sizes or (shape.largest_param, shape.params - shape.largest_param)
    return [math.ceil(n / world_size) for n in sizes if n > 0]


def largest_sub_group(parts: list[int], sub_group_size: int) -> int:
    """stage3.py _create_fp16_sub_groups: parameters join a group until it holds >= sub_group_size elements."""
    if sub_group_size >= sum(parts):
        return sum(parts)
    largest = current = 0
    for n in parts:
        current += n
        if current >= sub_group_size:
            largest, current = max(largest, current), 0
    return max(largest, current)


def _window_count(sizes: list[int], budget: int, reach: bool) -> int:
    """The most consecutive tensors one window holds: up to `budget` elements, or (reach) until it reaches it."""
    best = 0
    for i in range(len(sizes)):
        total = count = 0
        for n in sizes[i:]:
            if total >= budget if reach else total + n > budget:
                break
            total, count = total + n, count + 1
        best = max(best, count)
    return best


def swapped_tensors(shape: ModelShape, zero: dict, ds: dict, world_size: int, w: int) -> list[int]:
    """Elements of each tensor ZeRO-Infinity swaps to NVMe, in model order: not persistent (the norms), and a
    partition of at least one aio block."""
    persistence = zero_knob(zero, "stage3_param_persistence_threshold")
    block = max(MIN_AIO_BYTES, _int((ds.get("aio") or {}).get("block_size"), AIO_BLOCK_SIZE))
    return [n for n in (shape.param_sizes or (shape.largest_param,))
            if n >= persistence and math.ceil(n / world_size) * w >= block]


def swapped_partitions(shape: ModelShape, zero: dict, ds: dict, world_size: int, w: int) -> list[int]:
    """Partitions ZeRO-Infinity swaps to NVMe (see swapped_tensors)."""
    return [math.ceil(n / world_size) for n in swapped_tensors(shape, zero, ds, world_size, w)]


def param_buffers_needed(shape: ModelShape, zero: dict, ds: dict, world_size: int, w: int) -> int:
    """Swap buffers NVMe parameters need at once: each swapped-in partition holds a whole buffer while it is live —
    the tensor in use, the prefetch bucket's (stage3_prefetch_bucket_size, filled until reached), and those kept
    for reuse within stage3_max_reuse_distance (partitioned_param_coordinator.py). Fewer and DeepSpeed asserts
    "Not enough buffers 0 for swapping 1" mid-step."""
    full = swapped_tensors(shape, zero, ds, world_size, w)
    if not full:
        return 1
    prefetch = _window_count(full, zero_knob(zero, "stage3_prefetch_bucket_size"), reach=True)
    kept = _window_count(full, zero_knob(zero, "stage3_max_reuse_distance"), reach=False)
    return 1 + prefetch + kept


def _int(value, default: int) -> int:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def zero_knob(zero: dict, key: str) -> int:
    """A number from a zero_optimization block (`offload_param.buffer_count` reads a sub-block), or DeepSpeed's
    default where it is absent (or still "auto")."""
    *block, leaf = key.split(".")
    node = (zero.get(block[0]) or {}) if block else zero
    return _int(node.get(leaf), ZERO_DEFAULTS[key])


def _aligned(numel: int, w: int, intra_op: int) -> int:
    align = max(1, AIO_ALIGNED_BYTES * intra_op // w)
    return math.ceil(numel / align) * align


def size_knobs(shape: ModelShape, ds: dict, hw: Hardware, workload: Workload, keep_params_in_cpu: bool) -> dict:
    """A value for every DeepSpeed knob that moves memory on this rung (dotted path -> value), derived from the
    model's tensors and the memory each buffer lives in. The caller sets the ones the JSON leaves "auto" or out.

    - sub_group_size: the optimizer steps one sub-group at a time and holds it in fp32 (with NVMe, buffer_count
      swap buffers of it): as large as KNOB_SHARE of the memory it lives in allows (large groups step faster),
      never below the largest partition, never above DeepSpeed's default.
    - stage3_max_live_parameters / stage3_max_reuse_distance: gathered weights kept for the next use, within
      KNOB_SHARE of the device; at least one layer (or the embedding) plus the prefetch bucket. With parameters
      on NVMe every kept weight holds a swap buffer, so nothing is kept (reuse distance 0).
    - offload_param (NVMe): buffer_size the largest partition (aio-aligned), buffer_count twice what the prefetch
      and reuse window holds at once, max_in_cpu all parameters when they fit in RAM (then nothing is swapped),
      else 0 (the caller judges both).
    - offload_optimizer (NVMe): buffer_count = the master weights, each optimizer state and the gradient of one
      sub-group at once (PartitionedOptimizerSwapper's required_buffer_count).
    - pin_memory: while everything pinned stays within PIN_SHARE of the RAM, on a CPU-only machine too: there
      DeepSpeed's pin_memory is a no-op (aio page-locks its own swap buffers whatever the flag), so it costs
      nothing, and it keeps the value the JSONs had before they were sized.
    - aio.intra_op_parallelism: half a rank's cores (the other half runs the CPU optimizer), 1 to 8.
    """
    zero = ds.get("zero_optimization") or {}
    stage = zero_stage(ds)
    opt_dev, param_dev = offload_device(ds, "optimizer"), offload_device(ds, "param")
    w, N = workload.weight_bytes, zero_ranks(hw, workload)
    shape = tp_rank_shape(shape, workload.tp)
    parts = partitions(shape, N)
    part, largest_part = sum(parts), max(parts)
    ram_rank = hw.cpu_mem // hw.gpus_per_node
    dev_rank = ram_rank if hw.cpu_only else hw.gpu_mem
    sized = {}
    z = "zero_optimization."
    intra_op = max(1, min(8, (os.cpu_count() or 2) // max(1, hw.gpus_per_node) // 2))
    if stage == 3:
        if opt_dev == "nvme":
            buffers = optimizer_buffers_needed(ds)
            sized[z + "offload_optimizer.buffer_count"] = buffers
            per_elem, home = 4 * (buffers + 1), ram_rank  # the swap buffers and the fp32 gradients
        else:
            per_elem, home = (4 if opt_dev == "cpu" else 4 + w), (ram_rank if opt_dev == "cpu" else dev_rank)
        sized[z + "sub_group_size"] = int(min(DS_DEFAULT_KNOB, max(largest_part, KNOB_SHARE * home // per_elem)))
        prefetch = zero_knob(zero, "stage3_prefetch_bucket_size")
        floor = max(shape.layer_params, shape.largest_param) + prefetch
        live = int(min(DS_DEFAULT_KNOB, max(floor, KNOB_SHARE * dev_rank // w)))
        sized[z + "stage3_max_live_parameters"] = live
        swaps_params = param_dev == "nvme" and not keep_params_in_cpu
        sized[z + "stage3_max_reuse_distance"] = 0 if swaps_params else live
        if param_dev == "nvme":
            intra = _int((ds.get("aio") or {}).get("intra_op_parallelism"), intra_op)
            sized[z + "offload_param.buffer_size"] = _aligned(largest_part, w, intra)
            sized[z + "offload_param.max_in_cpu"] = part if keep_params_in_cpu else 0
            probe = {**zero, **{k[len(z):]: v for k, v in sized.items() if "." not in k[len(z):]}}
            if keep_params_in_cpu:  # nothing is swapped in while training: the buffers serve the start-up only
                probe["stage3_max_reuse_distance"] = 0
            sized[z + "offload_param.buffer_count"] = 2 * param_buffers_needed(shape, probe, ds, N, w)
        if param_dev == "nvme" or opt_dev == "nvme":
            sized["aio.intra_op_parallelism"] = intra_op
    pinned = _pinned_bytes(shape, ds, sized, hw, w, N)
    for what, dev in (("optimizer", opt_dev), ("param", param_dev)):
        if dev in ("cpu", "nvme") and (stage == 3 or what == "optimizer"):
            sized[f"{z}offload_{what}.pin_memory"] = pinned <= PIN_SHARE * hw.cpu_mem
    return sized


def _pinned_bytes(shape: ModelShape, ds: dict, sized: dict, hw: Hardware, w: int, zero_world: int) -> int:
    """Per node: what pin_memory would page-lock (offloaded parameters and optimizer states)."""
    part = math.ceil(shape.params / zero_world)
    total = 0
    if offload_device(ds, "optimizer") == "cpu":
        total += 16 * part
    if offload_device(ds, "param") == "cpu":
        total += w * part
    if offload_device(ds, "param") == "nvme":
        in_cpu = sized.get("zero_optimization.offload_param.max_in_cpu")
        total += w * min(part, in_cpu if in_cpu is not None else
                         zero_knob(ds.get("zero_optimization") or {}, "offload_param.max_in_cpu"))
    return total * hw.gpus_per_node


# ---------------------------------------------------------------------------------------------------------------
# the memory model


def activation_bytes(shape: ModelShape, workload: Workload, checkpointing: bool) -> int:
    """Peak bytes of activations for one micro batch on one rank (see the module docstring)."""
    return sum(activation_terms(shape, workload, checkpointing).values())


def activation_terms(shape: ModelShape, workload: Workload, checkpointing: bool) -> dict:
    """activation_bytes by term: `layers` (what every layer keeps for its backward: its input with checkpointing),
    `live` (the layer being recomputed or run backward, beyond what it keeps), `all_to_all` (Ulysses' buffers),
    `loss` (the loss head with the final norm and rope)."""
    s, b, w, tp = workload.local_seq_len, workload.micro_batch, workload.weight_bytes, workload.tp
    h, f, H, V = shape.hidden, shape.ffn, shape.heads, shape.vocab
    tokens, hd = s * b, h // H
    # the two norms are full width on every TP rank; attention's q, k, v, output, logsumexp and the MLP's four
    # ffn-wide tensors are split by tp
    kv_width = shape.kv_heads * hd  # sdpa takes GQA's key/value heads as they are (enable_gqa): saved unrepeated
    norms_attention = tokens * (8 * h + 4 * w * h + (2 * w * h + 2 * w * kv_width + 4 * H) // tp)
    mlp = tokens * math.ceil(4 * w * f / tp)
    if workload.tiled_mlp:  # TiledMLP keeps only its input (the norm's output): one tile's tensors at a time,
        tile = b * math.ceil(s / mlp_tiles(s, h))  # and the gradient of its whole input
        kept, live_mlp = 0, tile * math.ceil(4 * w * f / tp) + w * tokens * h
    else:
        kept, live_mlp = mlp, mlp
    layer = norms_attention + kept
    terms = {"layers": shape.layers * (w * tokens * h if checkpointing else layer),
             "live": (norms_attention + live_mlp) if checkpointing else live_mlp - kept}
    # Ulysses turns q, k, v ([s/sp, heads]) into [s, heads/sp] and the output back; kv heads fewer than sp are
    # replicated to sp first (ulysses_sp.py kv_replication_factor)
    kv = max(shape.kv_heads, workload.sp)
    terms["all_to_all"] = 0 if workload.sp == 1 else ALL_TO_ALL_COPIES * w * tokens * hd * (2 * H + 2 * kv) // tp
    if workload.tiled_loss:  # one tile's logits (parallelize._tiled_loss_head), and the gradient of the whole input
        logits = math.ceil(tokens / loss_tiles(tokens, V)) * LOGIT_BYTES * V + w * tokens * h
    else:
        logits = tokens * LOGIT_BYTES * V
    terms["loss"] = logits + tokens * ((4 + 2 * w) * h + 2 * w * hd)  # logits, final norm, rope
    return terms


@dataclass
class Candidate:
    name: str
    activation_checkpointing: bool
    device: dict  # bytes per rank: params, grads, optimizer, activations, buffers (with the runtime overhead)
    cpu_bytes: int  # per node
    nvme_bytes: int  # per node
    cpu_rank: dict = field(default_factory=dict)  # per rank, what lives in CPU memory
    fits: bool = False
    why: str = ""
    shortfall: dict = field(default_factory=dict)  # bytes missing: {"device": per rank, "cpu"/"nvme": per node}
    rung: Rung | None = field(default=None, repr=False)  # the rung as sized for this candidate
    tiled_mlp: bool = False
    tiled_loss: bool = False
    # under a pipeline: each stage's rank (stage, layers, params, in_flight, device_bytes, predicted_peak_bytes);
    # `device` is then the heaviest stage's
    stages: list = field(default_factory=list)

    @property
    def tiling(self) -> int:
        return int(self.tiled_loss) + int(self.tiled_mlp)

    @property
    def sized(self) -> dict:
        return dict(self.rung.sized) if self.rung else {}

    @property
    def device_bytes(self) -> int:
        return sum(self.device.values())

    def to_json(self) -> dict:
        return {"name": self.name, "activation_checkpointing": self.activation_checkpointing,
                "tiled_mlp": self.tiled_mlp, "tiled_loss": self.tiled_loss, "device_bytes": self.device_bytes,
                "cpu_bytes": self.cpu_bytes, "nvme_bytes": self.nvme_bytes,
                "fits": self.fits, "why": self.why, "device_split": dict(self.device), "sized": self.sized,
                **({"stages": self.stages} if self.stages else {})}


def model_states(shape: ModelShape, rung: Rung, world_size: int, precision: str,
                 trainable: int | None = None) -> tuple[dict, dict, int]:
    """(device, cpu, nvme) bytes of parameters, gradients, optimizer and DeepSpeed buffers on one rank, at the peak.

    Gradients include the step's transient copies: DeepSpeed flattens the gradient partition (w bytes) and casts it
    to fp32 (4 bytes) right before the optimizer runs (stage_1_and_2.py step(), stage3.py
    _prepare_fp32_grad_for_sub_group); stage 0 in fp32 instead flattens all gradients into one all-reduce bucket.

    trainable (LoRA): parameters that train; the rest are frozen weights, held (and at stage 3 partitioned) like the
    others but without gradients, fp32 masters or optimizer states. None: every parameter trains.
    """
    P, N, z = shape.params, world_size, rung.zero
    T = P if trainable is None else trainable
    tpart = math.ceil(T / N)
    w = 4 if precision == "fp32" else 2
    mixed = w == 2
    part = math.ceil(P / N)
    dev = {"params": 0, "grads": 0, "optimizer": 0, "buffers": 0}
    cpu = {"params": 0, "grads": 0, "optimizer": 0, "buffers": 0}
    nvme = 0
    bucket = int(z.get("reduce_bucket_size", 5e8)) * w
    overlap = bool(z.get("overlap_comm", rung.stage == 3))
    flat_cast = (w if mixed else 0) + 4  # bytes per element the step's flatten + fp32 cast allocate
    if rung.stage == 0:
        dev["params"] = w * P
        dev["grads"] = w * T + (flat_cast * T if mixed else 4 * T)
        dev["optimizer"] = (12 if mixed else 8) * T  # fp32 master + 2 moments; fp32: the weights are the master
        return dev, cpu, nvme
    if rung.stage in (1, 2):
        dev["params"] = w * P
        dev["buffers"] = bucket * (2 if overlap else 1)
        if rung.offload_optimizer == "none":
            # stage 1 keeps full-size gradients until the step, stage 2 only its partition
            dev["grads"] = (w * T if rung.stage == 1 else w * tpart) + flat_cast * tpart
            dev["optimizer"] = 12 * tpart
        else:
            largest = min(shape.largest_param, T)
            dev["buffers"] += w * largest  # temp_grad_buffer_for_gpu_offload
            cpu["params"] = w * tpart  # param_buffer_of_bit16_for_cpu_offload: the updated weights, pinned
            # the fp32 gradient partition the CPU optimizer reads, and as much again measured (OFFLOAD_EXTRA)
            cpu["grads"] = (4 + OFFLOAD_EXTRA) * tpart
            cpu["optimizer"] = 12 * tpart
            cpu["buffers"] = w * largest  # temp_grad_buffer_for_cpu_offload (pinned)
        return dev, cpu, nvme
    # stage 3
    persistence = zero_knob(z, "stage3_param_persistence_threshold")
    prefetch = zero_knob(z, "stage3_prefetch_bucket_size")
    max_live = zero_knob(z, "stage3_max_live_parameters")
    reuse = zero_knob(z, "stage3_max_reuse_distance")
    persistent = shape.norm_params if persistence > shape.hidden else 0
    # A gathered layer is kept until its backward when fewer than stage3_max_reuse_distance parameters are fetched
    # in between (2× the layers after it): the last reuse/2 parameters of the forward stay whole, plus the layer
    # in use and the prefetch bucket, all capped by stage3_max_live_parameters (partitioned_param_coordinator.py).
    gathered = min(max_live, min(P, reuse // 2) + shape.layer_params + prefetch) * w
    sub_group = largest_sub_group(partitions(shape, N), zero_knob(z, "sub_group_size"))
    if trainable is not None:  # LoRA: only the adapters' partition is stepped
        sub_group = min(sub_group, tpart)
    dev["buffers"] = bucket * (2 if overlap else 1) + gathered + persistent * w
    if rung.offload_param == "none":
        dev["params"] = w * part
    elif rung.offload_param == "cpu":
        cpu["params"] = w * part
    if rung.offload_optimizer == "none":
        dev["grads"] = w * tpart + flat_cast * sub_group  # flat gradient partition + one sub-group's fp32 copy
        dev["optimizer"] = 12 * tpart
    elif rung.offload_optimizer == "cpu":
        # grad_partitions_flat_buffer + the fp32 sub-group gradient buffers (+ OFFLOAD_EXTRA, measured)
        cpu["grads"] = w * tpart + (4 + OFFLOAD_EXTRA) * tpart
        cpu["optimizer"] = 12 * tpart
    else:
        cpu["grads"] = w * tpart + 4 * sub_group  # the fp32 gradients are swapped out with the optimizer
        # optimizer swap buffers, plus the fp32 master of the sub-group being stepped (measured)
        cpu["buffers"] = (zero_knob(z, "offload_optimizer.buffer_count") + 1) * sub_group * 4
        nvme += 16 * tpart  # fp32 master, momentum, variance, fp32 gradients
        if rung.offload_param == "nvme":
            cpu["params"] = min(zero_knob(z, "offload_param.max_in_cpu"), part) * w
            intra = _int((rung.ds.get("aio") or {}).get("intra_op_parallelism"), 1)
            cpu["buffers"] += zero_knob(z, "offload_param.buffer_count") * _aligned(
                zero_knob(z, "offload_param.buffer_size"), w, intra) * w
            nvme += w * part
    return dev, cpu, nvme


MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc: larger allocations are mmapped, and go back to the OS when freed


def init_retained_bytes(shape: ModelShape, rung: Rung, precision: str) -> int:
    """CPU only: what stays of the fp32 model the trainer builds before DeepSpeed flattens and casts it.

    Tensors below glibc's mmap threshold come from the heap, and freeing them does not shrink the RSS (measured
    on every rung but fp32 stage 0, which trains the built tensors in place); larger ones are mmapped and go back
    to the OS when freed (the 4.16B scale run kept under 1 GiB of its 16.6 GB fp32 build). zero.Init at stage 3
    also materialises every full tensor before it keeps its partition, so the same holds there.
    """
    if rung.stage == 0 and precision == "fp32":
        return 0
    sizes = shape.param_sizes or (shape.params,)
    return 4 * sum(n for n in sizes if 4 * n <= MMAP_THRESHOLD_MAX)


def load_peak_bytes(shape: ModelShape, rung: Rung, hw: Hardware, workload: Workload) -> int:
    """One rank's host memory (RSS) at the peak of building the model and loading model.pretrained's weights, before
    deepspeed.initialize: what summary.json's load_peak_bytes measures. The process itself (HOST_PROCESS_BYTES), then:
      - ZeRO-3: the model is built under zero.Init in the run's dtype (w bytes), each tensor whole for a moment and
        then cut to this rank's partition, the heap trimmed as it goes (metrics.heap_trimmed_per_parameter). The
        peak: the partitions, w·Ψ/N (in host memory on a CPU-only machine or with offload_param to CPU; on a GPU
        they are on the device; with offload_param to NVMe they go to disk as they are made, through
        offload_param.buffer_count pinned buffers of buffer_size, which exist from the start), plus the largest
        tensor whole beside its partition. pretrained.load_pretrained then fills the partitions from disk, one read
        chunk at a time.
      - below ZeRO-3: the whole model in fp32 (the trainer builds fp32; DeepSpeed casts at initialize), filled tensor
        by tensor, one read chunk at a time.
    A random init builds the same way but keeps the heap's garbage (init_retained_bytes) and gathers each module to
    initialise it: more than this. Measured: bench/results/load.json (a 1.04B Llama, bf16, 2 CPU ranks, ZeRO-3)
    and scale_pretrained.json (3.12B, bf16, zero3_nvme, 1 rank).
    """
    from .pretrained import READ_CHUNK_BYTES

    if workload.pp > 1:  # each rank builds and loads its own stage: the largest one
        shape = max((st.shape for st in pipeline_stages(shape, workload.pp)), key=lambda held: held.params)
    P, w, N = shape.params, workload.weight_bytes, zero_ranks(hw, workload)
    chunk = min(READ_CHUNK_BYTES, shape.largest_param * w)
    if rung.stage < 3:
        return HOST_PROCESS_BYTES + 4 * P + chunk
    in_host = rung.offload_param == "cpu" or (hw.cpu_only and rung.offload_param == "none")
    partitions = w * math.ceil(P / N) if in_host else 0
    transient = w * (shape.largest_param + (math.ceil(shape.largest_param / N) if in_host else 0))
    buffers = 0
    if rung.offload_param == "nvme":
        intra = _int((rung.ds.get("aio") or {}).get("intra_op_parallelism"), 1)
        buffers = zero_knob(rung.zero, "offload_param.buffer_count") * _aligned(
            zero_knob(rung.zero, "offload_param.buffer_size"), w, intra) * w
    return HOST_PROCESS_BYTES + partitions + buffers + max(transient, chunk)


def estimate(shape: ModelShape, rung: Rung, hw: Hardware, workload: Workload, checkpointing: bool) -> Candidate:
    if workload.pp > 1:
        return pipeline_estimate(shape, rung, hw, workload, checkpointing)
    dev, cpu, nvme = model_states(tp_rank_shape(shape, workload.tp), rung, zero_ranks(hw, workload),
                                  workload.precision, workload.trainable)
    device = {k: dev[k] for k in ("params", "grads", "optimizer")}
    device["activations"] = activation_bytes(shape, workload, checkpointing)
    device["activations"] += moe_activation_bytes(shape, workload, checkpointing)
    device["buffers"] = dev["buffers"]
    host = HOST_PROCESS_BYTES + RUNTIME_BYTES[rung.stage]  # the rank's process itself, on the CPU
    cpu_rank = {k: v for k, v in cpu.items() if v}
    if hw.cpu_only:  # one memory: what is "offloaded" stays in the same RAM, in the same process
        for key, value in cpu.items():
            device[key] = device.get(key, 0) + value
        device["buffers"] += host + init_retained_bytes(shape, rung, workload.precision)
        cpu_node = hw.gpus_per_node * sum(device.values())
    else:
        device["buffers"] += DEVICE_RUNTIME_BYTES
        cpu_node = hw.gpus_per_node * (sum(cpu.values()) + host)
    return Candidate(rung.name, checkpointing, device, cpu_node, hw.gpus_per_node * nvme, cpu_rank=cpu_rank,
                     rung=rung, tiled_mlp=workload.tiled_mlp, tiled_loss=workload.tiled_loss)


def pipeline_estimate(shape: ModelShape, rung: Rung, hw: Hardware, workload: Workload,
                      checkpointing: bool) -> Candidate:
    """estimate() under a pipeline: every stage's rank (its parameters over the stage's world / pp data-parallel
    ranks, its activations under 1F1B: pipeline_activation_terms), the heaviest one as the candidate's `device`. On a
    CPU-only machine a node holds ranks of different stages (PipeDataParallelTopology: ranks [s·dp, (s+1)·dp) are
    stage s), so its RAM must hold the sum over its ranks; the fullest node counts."""
    N, gpus = zero_ranks(hw, workload), hw.gpus_per_node
    serial = dataclasses.replace(rung, zero={**rung.zero, "overlap_comm": False})  # the pipe engine turns it off
    host = HOST_PROCESS_BYTES + RUNTIME_BYTES[rung.stage]
    base = HOST_PROCESS_BYTES if hw.cpu_only else DEVICE_RUNTIME_BYTES
    per_stage, in_host, offloaded, stages = [], [], [], []
    for st in pipeline_stages(shape, workload.pp, workload.micro_batches):
        if rung.stage == 0 and workload.precision == "bf16":
            dev, cpu = bf16_pipeline_states(st.shape, N), {}
        else:  # ZeRO-1 (its CPU optimizer offload too), ZeRO-0 in fp32 / fp16 as without a pipeline
            dev, cpu, _ = model_states(st.shape, serial, N, workload.precision)
        device = {k: dev[k] for k in ("params", "grads", "optimizer")}
        device["activations"] = sum(pipeline_activation_terms(shape, workload, checkpointing, st).values())
        device["buffers"] = dev["buffers"]
        if hw.cpu_only:  # one memory, as in estimate()
            for key, value in cpu.items():
                device[key] = device.get(key, 0) + value
            device["buffers"] += host + init_retained_bytes(st.shape, rung, workload.precision)
            in_host.append(sum(device.values()))
        else:
            device["buffers"] += DEVICE_RUNTIME_BYTES
            in_host.append(sum(cpu.values()) + host)
        per_stage.append(device)
        offloaded.append({k: v for k, v in cpu.items() if v})
        total = sum(device.values())
        stages.append({"stage": st.index, "layers": st.layers, "params": st.params, "in_flight": st.in_flight,
                       "device_bytes": total, "predicted_peak_bytes": total - base})
    ranks = [in_host[r // N] for r in range(hw.world_size)]
    cpu_node = max(sum(ranks[n * gpus:(n + 1) * gpus]) for n in range(hw.nodes))
    worst = max(range(len(per_stage)), key=lambda i: sum(per_stage[i].values()))
    return Candidate(rung.name, checkpointing, per_stage[worst], cpu_node, 0, cpu_rank=offloaded[worst],
                     rung=rung, tiled_mlp=workload.tiled_mlp, tiled_loss=workload.tiled_loss, stages=stages)


def _judge(c: Candidate, rung: Rung, hw: Hardware) -> None:
    """Set fits / why / shortfall with SAFETY_MARGIN kept free of every memory."""
    keep = 1 - SAFETY_MARGIN
    usable_cpu, usable_nvme = int(hw.cpu_mem * keep), int(hw.nvme * keep)
    short, reasons = {}, []
    if rung.uses_nvme and hw.nvme <= 0:
        c.fits, c.why = False, "no NVMe given (--nvme)"
        short["nvme"] = math.ceil(c.nvme_bytes / keep)
        c.shortfall = short
        return
    if hw.cpu_only:
        if c.cpu_bytes > usable_cpu:
            short["cpu"] = math.ceil((c.cpu_bytes - usable_cpu) / keep)
            reasons.append(f"RAM {_gib(c.cpu_bytes)} > {_gib(usable_cpu)} usable")
    else:
        usable_dev = int(hw.gpu_mem * keep)
        if c.device_bytes > usable_dev:
            short["device"] = math.ceil((c.device_bytes - usable_dev) / keep)
            reasons.append(f"device {_gib(c.device_bytes)} > {_gib(usable_dev)} usable")
        if c.cpu_bytes > usable_cpu:
            short["cpu"] = math.ceil((c.cpu_bytes - usable_cpu) / keep)
            reasons.append(f"CPU {_gib(c.cpu_bytes)} > {_gib(usable_cpu)} usable")
    if c.nvme_bytes > usable_nvme:
        short["nvme"] = math.ceil((c.nvme_bytes - usable_nvme) / keep)
        reasons.append(f"NVMe {_gib(c.nvme_bytes)} > {_gib(usable_nvme)} usable")
    c.fits, c.shortfall = not short, short
    if c.fits:
        limit = hw.cpu_mem / hw.gpus_per_node if hw.cpu_only else hw.gpu_mem
        c.why = f"fits: {100 * c.device_bytes / limit:.0f}% of {'RAM share' if hw.cpu_only else 'device'}"
    else:
        c.why = "; ".join(reasons)


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, int) and not isinstance(value, bool) and value >= 10**5 else str(value)


# ---------------------------------------------------------------------------------------------------------------
# the plan


@dataclass
class Plan:
    model: ModelShape
    hardware: Hardware
    workload: Workload
    candidates: list
    chosen: Candidate | None
    reason: str
    notes: list = field(default_factory=list)
    searched: list = field(default_factory=list)  # sequence-parallel search: (sp, why it did not fit) before this sp
    parallel_reason: str = ""  # why these tp / sp / pp degrees
    # pp search: (pp, why it did not fit) before this pp, pp 1 first; with no pp fitting, every degree tried (pp 1's
    # plan is the answer then, its reason the error)
    pipeline_search: list = field(default_factory=list)

    @property
    def activation_checkpointing(self) -> bool:
        return bool(self.chosen and self.chosen.activation_checkpointing)

    @property
    def tensor_parallel(self) -> int:
        return self.workload.tp

    @property
    def sequence_parallel(self) -> int:
        return self.workload.sp

    @property
    def pipeline_parallel(self) -> int:
        return self.workload.pp

    @property
    def pipeline_bubble(self) -> float:
        """(pp - 1) / (m + pp - 1): the share of a step each stage idles (0 without a pipeline)."""
        return self.workload.pipeline_bubble

    @property
    def staged(self) -> Candidate | None:
        """The candidate whose pipeline stages a plan shows: the chosen one, else the lightest."""
        return self.chosen or min(self.candidates, key=lambda c: c.device_bytes, default=None)

    @property
    def stages(self) -> list:
        """Each pipeline stage of `staged` (layers, params, in flight, predicted bytes); [] without a pipeline."""
        return self.staged.stages if self.staged else []

    @property
    def tiled_mlp(self) -> bool:
        return self.chosen.tiled_mlp if self.chosen else self.workload.tiled_mlp

    @property
    def tiled_loss(self) -> bool:
        return self.chosen.tiled_loss if self.chosen else self.workload.tiled_loss

    @property
    def parallel(self) -> str:
        """"tp 2", "sp 8, tiled loss and MLP", ...: what the plan adds to plain data parallelism ("" if nothing)."""
        parts = [f"{k} {v}" for k, v in (("tp", self.tensor_parallel), ("sp", self.sequence_parallel),
                                          ("pp", self.pipeline_parallel)) if v > 1]
        tiled = [k for k, on in (("loss", self.tiled_loss), ("MLP", self.tiled_mlp)) if on]
        return ", ".join(parts + (["tiled " + " and ".join(tiled)] if tiled else []))

    @property
    def sized(self) -> dict:
        return self.chosen.sized if self.chosen else {}

    @property
    def predicted_peak_bytes(self) -> int | None:
        """One rank's peak in the measure a run reports: on CPU its RSS above the process before the model
        (summary.json peak_mem_bytes - rss_before_model_bytes); on a GPU torch.cuda.max_memory_allocated."""
        if self.chosen is None:
            return None
        base = HOST_PROCESS_BYTES if self.hardware.cpu_only else DEVICE_RUNTIME_BYTES
        return self.chosen.device_bytes - base

    @property
    def load_peak_bytes(self) -> int | None:
        """One rank's host RSS at the peak of building and loading the model (load_peak_bytes), absolute: the
        measure summary.json's load_peak_bytes reports."""
        if self.chosen is None:
            return None
        return load_peak_bytes(self.model, self.chosen.rung, self.hardware, self.workload)

    def summary(self) -> dict:
        """summary.json's `plan`."""
        return {"rung": self.chosen.name if self.chosen else None, "predicted_load_peak_bytes": self.load_peak_bytes,
                "activation_checkpointing": self.activation_checkpointing,
                "tensor_parallel": self.tensor_parallel, "sequence_parallel": self.sequence_parallel,
                "tiled_mlp": self.tiled_mlp, "tiled_loss": self.tiled_loss,
                "predicted_peak_bytes": self.predicted_peak_bytes, "sized": self.sized,
                "trainable_params": self.workload.trainable, **self._pipeline_keys()}

    def _pipeline_keys(self) -> dict:
        """summary() and to_json()'s pipeline part: the degree, micro-batches a step, the bubble, each stage."""
        return {"pipeline_parallel": self.pipeline_parallel, "micro_batches": self.workload.micro_batches,
                "pipeline_bubble": round(self.pipeline_bubble, 4),
                "stages": [{k: st[k] for k in ("stage", "layers", "params", "in_flight", "predicted_peak_bytes")}
                           for st in self.stages]}

    @property
    def pipeline(self) -> str:
        """The pipeline in words ("" without one): stages, their predicted peaks, the bubble."""
        if self.pipeline_parallel == 1:
            return ""
        m = self.workload.micro_batches
        peaks = " / ".join(f"{st['predicted_peak_bytes'] / GiB:.1f}" for st in self.stages)
        return (f"pipeline: {self.pipeline_parallel} stages of {'+'.join(str(st['layers']) for st in self.stages)} "
                f"layers, predicted {peaks} GiB a rank; bubble {self.pipeline_bubble:.0%} at {m} micro-batch"
                f"{'es' if m > 1 else ''} a step")

    def line(self) -> str:
        """The plan in one line, printed when a run starts."""
        knobs = ", ".join(f"{k.removeprefix('zero_optimization.')}={_short(v)}" for k, v in self.sized.items())
        return (f"plan: {self.reason}; predicted peak {_gib(self.predicted_peak_bytes)} a rank, "
                f"{_gib(self.load_peak_bytes)} of host memory while the model loads"
                + (f"; {self.parallel}" if self.parallel else "") + (f"; {self.pipeline}" if self.pipeline else "")
                + (f"; sized {knobs}" if knobs else "")
                + (f"; {self.lora}" if self.lora else ""))

    @property
    def lora(self) -> str:
        """How many parameters train, when LoRA freezes the rest ("" without LoRA)."""
        t = self.workload.trainable
        if t is None:
            return ""
        return (f"LoRA: {t:,} of {self.model.params:,} parameters train ({100 * t / self.model.params:.2f}%); the "
                "frozen weights hold no gradients or optimizer states")

    def to_json(self) -> dict:
        hw = self.hardware
        return {
            "model": self.model.name, "params": self.model.params,
            "chosen": self.chosen.name if self.chosen else None,
            "activation_checkpointing": self.activation_checkpointing, "sized": self.sized,
            "tensor_parallel": self.tensor_parallel, "sequence_parallel": self.sequence_parallel,
            "data_parallel": hw.world_size // (self.tensor_parallel * self.sequence_parallel * self.pipeline_parallel),
            "zero_partitions": zero_ranks(hw, self.workload), "tiled_mlp": self.tiled_mlp,
            "tiled_loss": self.tiled_loss,
            "sequence_parallel_search": [{"sequence_parallel": sp, "fits": False, "reason": why}
                                         for sp, why in self.searched], "parallel_reason": self.parallel_reason,
            "predicted_peak_bytes": self.predicted_peak_bytes, "predicted_load_peak_bytes": self.load_peak_bytes,
            "reason": self.reason, "trainable_params": self.workload.trainable,
            "hardware": {"nodes": hw.nodes, "gpus_per_node": hw.gpus_per_node, "gpu_mem_bytes": hw.gpu_mem,
                         "cpu_mem_bytes": hw.cpu_mem, "nvme_bytes": hw.nvme, "cpu_only": hw.cpu_only},
            "seq_len": self.workload.seq_len, "micro_batch": self.workload.micro_batch,
            "precision": self.workload.precision, "safety_margin": SAFETY_MARGIN, "notes": self.notes,
            "candidates": [c.to_json() for c in self.candidates], **self._pipeline_keys(),
            "pipeline_parallel_search": [{"pipeline_parallel": pp, "fits": False, "reason": why}
                                         for pp, why in self.pipeline_search],
        }


def preference_key(rung: Rung, checkpointing: bool, tiling: int = 0, sp: int = 1) -> tuple:
    """Cheapest first: no offload, then CPU offload, then NVMe; within each, without activation checkpointing
    first; then the ladder order (less sharding first). Tiling and then a searched sequence-parallel degree come
    only when nothing fits without them, so they lead the key."""
    tier = 2 if rung.uses_nvme else 1 if "cpu" in (rung.offload_optimizer, rung.offload_param) else 0
    return sp, tiling, tier, checkpointing, LADDER.index(rung.name) if rung.name in LADDER else len(LADDER)


def judged(shape: ModelShape, rung: Rung, hw: Hardware, workload: Workload, checkpointing: bool) -> Candidate:
    """One candidate, judged; an NVMe rung that can keep its parameters in RAM does so only when that fits."""
    c = estimate(shape, rung, hw, workload, checkpointing)
    _judge(c, rung, hw)
    if not c.fits and rung.tighter is not None:
        c = estimate(shape, rung.tighter, hw, workload, checkpointing)
        _judge(c, rung.tighter, hw)
    return c


def make_plan(shape: ModelShape, hw: Hardware, workload: Workload, checkpointing: bool | None = None,
              rungs: list[Rung] | None = None, tiling: bool = True) -> Plan:
    """Every candidate (rung × activation checkpointing) judged, and the first that fits in preference order.

    checkpointing=True: the run checkpoints activations anyway (a recipe that asks for it), so only those
    candidates are eligible; False: only those without (a model that cannot checkpoint); None: both, without
    first. `rungs`: the ladder (default) or the one JSON a run names. tiling: when nothing fits, the same
    candidates again with the loss tiled, then the MLP too (long context); the workload's own tiling always holds.
    """
    rungs = rungs if rungs is not None else ladder_rungs(shape, workload, hw)
    candidates, by_name, chosen, preference = [], {r.name: r for r in rungs}, None, []
    rounds = [workload]
    if tiling and workload.pp == 1:  # under a pipeline the planner adds no tiling (a workload's own still holds)
        rounds += [dataclasses.replace(workload, tiled_loss=True),
                   dataclasses.replace(workload, tiled_loss=True, tiled_mlp=True)]
    for i, wl in enumerate(rounds):
        if i and wl in rounds[:i]:
            continue
        judged_now = [judged(shape, rung, hw, wl, ac) for rung in rungs for ac in (False, True)]
        candidates += judged_now
        preference = sorted((c for c in judged_now if checkpointing is None or c.activation_checkpointing ==
                             checkpointing), key=lambda c: preference_key(by_name[c.name], c.activation_checkpointing))
        chosen = next((c for c in preference if c.fits), None)
        if chosen is not None:
            break
    eligible = [c for c in candidates if checkpointing is None or c.activation_checkpointing == checkpointing]
    if chosen is None:
        return Plan(shape, hw, workload, candidates, None, _nothing_fits(eligible, by_name, hw),
                    notes=_bubble_note(workload))
    limit = hw.cpu_mem / hw.gpus_per_node if hw.cpu_only else hw.gpu_mem
    if chosen.activation_checkpointing and not checkpointing:
        why = "no rung fits without activation checkpointing; the least sharding and offload that fits with it"
    elif chosen.activation_checkpointing:
        why = "the least sharding and offload that fits with activation checkpointing (asked for)"
    elif chosen is preference[0]:
        why = "the lightest rung fits, without activation checkpointing"
    else:
        why = "the least sharding and offload that fits without activation checkpointing"
    if len(rungs) == 1:
        why = why.replace("the least sharding and offload that fits", "fits").replace(
            "the lightest rung fits", "fits")
    if chosen.tiling > workload.tiling:
        why = f"no rung fits without tiling {_tiled(chosen, workload)}; " + why
    reason = (f"{_label(chosen)}: {why} "
              f"({_gib(chosen.device_bytes)} a rank, {100 * chosen.device_bytes / limit:.0f}% of "
              f"{'its share of the RAM' if hw.cpu_only else 'the device'}; {SAFETY_MARGIN:.0%} kept free)")
    return Plan(shape, hw, workload, candidates, chosen, reason,
                notes=_notes(shape, by_name[chosen.name], hw, workload))


def _label(c: Candidate) -> str:
    """"zero3 with activation checkpointing and tiled loss and MLP"."""
    extras = (["activation checkpointing"] if c.activation_checkpointing else []) + (
        [f"tiled {_tiled(c)}"] if c.tiling else [])
    return c.name + (" with " + " and ".join(extras) if extras else "")


def _tiled(c: Candidate, beyond: Workload | None = None) -> str:
    """"loss", "MLP" or "loss and MLP": what the candidate tiles (beyond what the workload tiles anyway)."""
    parts = [k for k, on, given in (("loss", c.tiled_loss, beyond and beyond.tiled_loss),
                                    ("MLP", c.tiled_mlp, beyond and beyond.tiled_mlp)) if on and not given]
    return " and ".join(parts)


def _notes(shape: ModelShape, rung: Rung, hw: Hardware, workload: Workload | None = None) -> list[str]:
    """What the steady-state model leaves out but a user should know."""
    notes = []
    pp = workload.pp if workload else 1
    built = max(st.params for st in pipeline_stages(shape, pp)) if pp > 1 else shape.params  # a rank builds its stage
    startup = hw.gpus_per_node * (4 * built + HOST_PROCESS_BYTES + RUNTIME_BYTES[rung.stage])
    if rung.stage < 3 and not hw.cpu_only and startup > hw.cpu_mem * (1 - SAFETY_MARGIN):
        notes.append(f"note: below ZeRO-3 the trainer builds the whole fp32 model on each rank's CPU before "
                     f"DeepSpeed moves it: {_gib(startup)} per node at start-up, more than "
                     f"{_gib(hw.cpu_mem * (1 - SAFETY_MARGIN))} usable")
    return notes + (_bubble_note(workload) if workload else [])


def _bubble_note(workload: Workload) -> list[str]:
    """A warning when a pipeline gets fewer than BUBBLE_MICRO_BATCHES·pp micro-batches a step."""
    pp, m = workload.pp, workload.micro_batches
    if pp == 1 or m >= BUBBLE_MICRO_BATCHES * pp:
        return []
    return [f"warning: {m} micro-batch{'es' if m > 1 else ''} a step through {pp} pipeline stages leave"
            f"{'s' if m == 1 else ''} each stage idle {workload.pipeline_bubble:.0%} of the step (bubble "
            f"(pp-1)/(m+pp-1)); {BUBBLE_MICRO_BATCHES * pp} or more keep it under "
            f"{(pp - 1) / (BUBBLE_MICRO_BATCHES * pp + pp - 1):.0%} (train.grad_accum; `plan --grad-accum`)"]


def _nothing_fits(candidates: list, by_name: dict, hw: Hardware) -> str:
    """The candidate that needs the least extra memory (per node), and how much of which memory."""
    def extra(c):
        s = c.shortfall
        return s.get("device", 0) * hw.gpus_per_node + s.get("cpu", 0) + s.get("nvme", 0)

    usable = [c for c in candidates if not (by_name[c.name].uses_nvme and hw.nvme <= 0)]
    best = min(usable or candidates, key=extra)
    parts = []
    if "device" in best.shortfall:
        parts.append(f"{_gib(best.shortfall['device'])} more memory per GPU")
    if "cpu" in best.shortfall:
        parts.append(f"{_gib(best.shortfall['cpu'])} more {'RAM' if hw.cpu_only else 'CPU memory'} per node")
    if "nvme" in best.shortfall:
        parts.append(f"{_gib(best.shortfall['nvme'])} more NVMe per node")
    return f"{_label(best)} comes closest: it needs " + " and ".join(parts)


def plan_model(model, hardware: Hardware, seq_len: int | None = None, micro_batch: int = 1,
               precision: str = "bf16", checkpointing: bool | None = None, where: dict | None = None,
               tp: int = 1, sp: int | None = None, tiled_mlp: bool = False, tiled_loss: bool = False,
               trainable: int | None = None, pp: int | None = 1, micro_batches: int | None = None) -> Plan:
    """The plan for a preset / config.json / config on `hardware`. Raises UsageError on bad input.

    tp, sp: fixed AutoTP / Ulysses degrees; sp=None searches: sp 1 first, then the smallest sp that fits
    (`sequence_parallel_degrees`). tiled_mlp / tiled_loss: tiling the run does anyway (the planner may add it).
    pp: a fixed pipeline degree; pp=None (with sp=None and tp 1) searches too: only when nothing fits at pp 1, sp
    search included, the smallest pp that fits (`pipeline_parallel_degrees`). micro_batches: the pipeline's micro-
    batches a step (gradient accumulation); None: default_micro_batches(pp) for each degree."""
    where = {"model": "--model", "seq_len": "--seq-len", "micro_batch": "--micro-batch", "precision": "--precision",
             "tp": "--tp", "sp": "--sp", "pp": "--pp", "micro_batches": "--grad-accum", **(where or {})}
    shape = model_shape(model, where["model"])
    if precision not in PRECISIONS:
        raise UsageError(f"precision '{precision}' is unknown", where["precision"],
                         "use one of " + ", ".join(PRECISIONS))
    seq_len = seq_len if seq_len is not None else min(DEFAULT_SEQ_LEN, shape.max_positions or DEFAULT_SEQ_LEN)
    if seq_len < 1 or (shape.max_positions and seq_len > shape.max_positions):
        raise UsageError(f"seq_len {seq_len} is outside the model's 1..{shape.max_positions} positions",
                         where["seq_len"], _more_positions(shape, seq_len))
    if micro_batch < 1:
        raise UsageError(f"micro batch {micro_batch} is invalid", where["micro_batch"], "use a whole number >= 1")
    workload = Workload(seq_len, micro_batch, precision, tp=tp, sp=sp or 1, tiled_mlp=tiled_mlp,
                        tiled_loss=tiled_loss, trainable=trainable, pp=1 if pp is None else pp,
                        micro_batches=default_micro_batches(pp or 1) if micro_batches is None else micro_batches)
    check_layout(shape, hardware, workload, where)
    fixed = f"as given ({where['tp']}, {where['sp']}{', ' + where['pp'] if workload.pp > 1 else ''})"
    if sp is not None or tp > 1 or workload.pp > 1:  # no search beside AutoTP or a pipeline: neither runs Ulysses
        plan = make_plan(shape, hardware, workload, checkpointing)
        beside = "AutoTP" if tp > 1 else "a pipeline"
        plan.parallel_reason = fixed + (f"; no sequence-parallel search beside {beside}" if sp is None else "")
        return plan
    searched, plan = [], None
    for degree in sequence_parallel_degrees(shape, hardware, workload):
        plan = make_plan(shape, hardware, dataclasses.replace(workload, sp=degree), checkpointing)
        if plan.chosen is not None:
            break
        searched.append((degree, plan.reason))
    tried = ", ".join(str(d) for d, _ in searched)
    if plan.chosen is not None and searched:
        plan.searched = searched
        plan.parallel_reason = (f"the smallest sp that fits (sp {tried} {'does' if len(searched) == 1 else 'do'} "
                                f"not: {searched[0][1]})")
        plan.reason += f"; sequence parallel {plan.sequence_parallel}: {plan.parallel_reason}"
    elif plan.chosen is None and len(searched) > 1:  # the largest degree came closest: say what it still needs
        plan.searched = searched[:-1]
        plan.parallel_reason = f"sp search: sp {tried} tried, none fits"
        plan.reason = f"not even with sequence parallel {plan.sequence_parallel} (sp {tried} tried): {plan.reason}"
    else:
        plan.parallel_reason = "fits without sequence parallelism" if plan.chosen else \
            "no larger sp divides the world size, seq_len and the heads"
    if plan.chosen is None and pp is None and not tiled_mlp and not tiled_loss and trainable is None:
        plan = _pipeline_search(shape, hardware, workload, checkpointing, micro_batches, plan)
    return plan


def _pipeline_search(shape: ModelShape, hw: Hardware, workload: Workload, checkpointing: bool | None,
                     micro_batches: int | None, flat: Plan) -> Plan:
    """The smallest pp that fits when nothing fits without a pipeline (`flat`, its sp search done): sp and pp do not
    combine, so each degree plans at sp 1, on ZeRO 0/1 without added tiling (nor LoRA: the runtime runs neither
    beside a pipeline). None fits: `flat`, the degrees tried recorded beside it."""
    searched, plan = [(1, flat.reason)], None
    for degree in pipeline_parallel_degrees(shape, hw, micro_batches):
        m = micro_batches if micro_batches is not None else default_micro_batches(degree)
        plan = make_plan(shape, hw, dataclasses.replace(workload, sp=1, pp=degree, micro_batches=m), checkpointing)
        if plan.chosen is not None:
            break
        searched.append((degree, plan.reason))
    if plan is None or plan.chosen is None:
        flat.pipeline_search = searched[1:]
        return flat
    plan.pipeline_search = searched
    plan.parallel_reason = f"the smallest pp that fits (pp {', '.join(str(d) for d, _ in searched)} " \
                           f"{'does' if len(searched) == 1 else 'do'} not: {searched[0][1]})"
    plan.reason += f"; pipeline parallel {plan.pipeline_parallel}: {plan.parallel_reason}"
    return plan


def _more_positions(shape: ModelShape, seq_len: int) -> str:
    """The fix for a seq_len beyond a model's positions: the config that would allow it."""
    if shape.name in PRESETS:
        return (f"use a seq_len <= {shape.max_positions}, or give a config.json with max_position_embeddings >= "
                f"{seq_len} (the {shape.name} preset's shape with more positions: model_config('{shape.name}', "
                f"max_position_embeddings={seq_len}).save_pretrained(DIR) from zero_trainer.model)")
    return (f"use a seq_len <= {shape.max_positions}, or raise max_position_embeddings to >= {seq_len} in "
            f"{shape.name or 'the config.json'}")


def sequence_parallel_degrees(shape: ModelShape, hw: Hardware, workload: Workload) -> list[int]:
    """The degrees an sp search tries, smallest first: divisors of world / tp that divide seq_len and the attention
    heads left on a TP rank, and whose kv heads Ulysses can shard or replicate (one divides the other)."""
    room = hw.world_size // workload.tp
    return [d for d in range(1, room + 1) if room % d == 0 and not _sp_problem(shape, workload, d)]


def _sp_problem(shape: ModelShape, workload: Workload, sp: int) -> str:
    heads, kv = shape.heads // workload.tp, max(1, shape.kv_heads // workload.tp)
    if workload.seq_len % sp:
        return f"does not divide seq_len {workload.seq_len}"
    if heads % sp:
        return f"does not divide the {heads} attention heads{' a TP rank holds' if workload.tp > 1 else ''}"
    if kv % sp and sp % kv:
        return (f"and the {kv} key/value heads: one must divide the other (Ulysses shards or replicates them, "
                f"ulysses_sp.py)")
    return ""


def check_layout(shape: ModelShape, hw: Hardware, workload: Workload, where: dict) -> None:
    """One UsageError for a TP/SP/PP layout DeepSpeed cannot run: degrees that do not divide the world, tp not
    dividing the heads (AutoTP splits whole heads), sp not dividing seq_len or the heads (Ulysses), a pipeline beside
    either, on another model, or with more stages than layers (check_pipeline)."""
    tp, sp, pp = workload.tp, workload.sp, workload.pp
    where = {"pp": "parallel.pp", "micro_batches": "train.grad_accum", **where}
    for degree, key in ((tp, "tp"), (sp, "sp"), (pp, "pp"), (workload.micro_batches, "micro_batches")):
        if degree < 1:
            raise UsageError(f"{key.replace('_', ' ')} {degree} is invalid", where[key], "use a whole number >= 1")
    if pp > 1:
        check_pipeline(shape, hw, workload, where)
    if hw.world_size % (tp * sp):
        key = "sp" if sp > 1 else "tp"
        raise UsageError(f"{'tp ' + str(tp) + ' × sp ' + str(sp) if tp > 1 and sp > 1 else key + ' ' + str(tp * sp)}"
                         f" does not divide the world size {hw.world_size} ({hw.nodes} node(s) × {hw.gpus_per_node} "
                         f"rank(s))", where[key], f"use a degree that divides {hw.world_size}")
    for count, name in ((shape.heads, "attention heads"), (shape.kv_heads, "key/value heads")):
        if count % tp:
            raise UsageError(f"tp {tp} does not divide the model's {count} {name} (AutoTP gives each rank whole "
                             "heads)", where["tp"], "use a tp that divides both the attention and key/value heads")
    if sp > 1 and (problem := _sp_problem(shape, workload, sp)):
        raise UsageError(f"sp {sp} {problem}", where["sp"], f"use an sp among "
                         f"{', '.join(map(str, sequence_parallel_degrees(shape, hw, workload))) or '1'}")


def check_pipeline(shape: ModelShape, hw: Hardware, workload: Workload, where: dict) -> None:
    """A pipeline DeepSpeed and the runtime cannot run: beside tp or sp, on a model other than zero_trainer's own
    dense one, a degree that does not divide the world, more stages than decoder layers."""
    pp, field_name = workload.pp, where["pp"]
    if workload.tp > 1 or workload.sp > 1:
        other = f"tp {workload.tp}" if workload.tp > 1 else f"sp {workload.sp}"
        raise UsageError(f"pp {pp} does not combine with {other} (the pipeline engine runs neither AutoTP nor "
                         "Ulysses)", field_name, "use pp 1, or tp 1 and sp 1 beside it")
    if not shape.pipelines:
        what = "a mixture of experts" if shape.experts else f"model_type {shape.model_type or 'unknown'}"
        raise UsageError(f"pp {pp} needs zero_trainer's own dense model (model_type zero_lm); {shape.name} is {what}",
                         field_name, "use pp 1 for this model")
    if hw.world_size % pp:
        raise UsageError(f"pp {pp} does not divide the world size {hw.world_size} ({hw.nodes} node(s) × "
                         f"{hw.gpus_per_node} rank(s))", field_name, f"use a degree that divides {hw.world_size}")
    if pp > shape.layers:
        raise UsageError(f"pp {pp} is more than the model's {shape.layers} decoder layers (a stage holds whole "
                         "layers)", field_name, f"use a pp of at most {shape.layers}")
    if workload.micro_batches < pp:
        raise UsageError(f"{workload.micro_batches} micro-batch(es) a step is below pp {pp}: the pipeline needs one "
                         "a stage in flight", where["micro_batches"],
                         f"use at least {pp} (>= {BUBBLE_MICRO_BATCHES * pp} keeps the bubble small)")
    if workload.tiling or workload.trainable is not None:
        what = "LoRA" if workload.trainable is not None else "tiling"
        raise UsageError(f"pp {pp} with {what}: the pipeline's stages run their own layers and loss, without it",
                         field_name, f"use pp 1 with {what}")


# ---------------------------------------------------------------------------------------------------------------
# DeepSpeed's scale traps: numbers a user wrote that DeepSpeed accepts, then fails on (or swaps RAM for) mid-run


def check_knobs(shape: ModelShape, rung: Rung, hw: Hardware, workload: Workload, source: str) -> None:
    """One UsageError per trap, before anything launches: a parameter swap buffer smaller than a partition it
    must hold, too few swap buffers for the prefetch/reuse window or for one optimizer sub-group, and more
    page-locked memory than the node has."""
    z, w, N = rung.zero, workload.weight_bytes, zero_ranks(hw, workload)
    shape = tp_rank_shape(shape, workload.tp)
    where = f"zero_optimization in {source}"
    part = math.ceil(shape.params / N)
    if rung.stage == 3 and rung.offload_param == "nvme":
        swapped = swapped_partitions(shape, z, rung.ds, N, w)
        size = zero_knob(z, "offload_param.buffer_size")
        if swapped and size < max(swapped):
            raise UsageError(f"offload_param.buffer_size {size} is smaller than the largest parameter partition it "
                             f"must swap ({max(swapped)} elements)", where,
                             f'set it to at least {max(swapped)}, or "auto" to let the planner size it')
        count, needed = zero_knob(z, "offload_param.buffer_count"), param_buffers_needed(shape, z, rung.ds, N, w)
        if zero_knob(z, "offload_param.max_in_cpu") < part and count < needed:
            raise UsageError(f"offload_param.buffer_count {count} is too small: the prefetch bucket and the reuse "
                             f"window (stage3_max_reuse_distance {zero_knob(z, 'stage3_max_reuse_distance')}) "
                             f"hold {needed} swapped parameters at once; DeepSpeed would stop mid-step with \"Not "
                             f"enough buffers\"", where,
                             f'set buffer_count >= {needed}, lower stage3_max_reuse_distance, or use "auto" for both')
    if rung.stage == 3 and rung.offload_optimizer == "nvme":
        count, needed = zero_knob(z, "offload_optimizer.buffer_count"), optimizer_buffers_needed(rung.ds)
        if count < needed:
            raise UsageError(f"offload_optimizer.buffer_count {count} is too small: one sub-group swaps its master "
                             f"weights, {optimizer_states(rung.ds)} optimizer state(s) and its gradients at once",
                             where, f'set buffer_count >= {needed}, or "auto"')
    dev, cpu, _ = model_states(shape, rung, N, workload.precision, workload.trainable)
    locked = cpu["buffers"] if rung.uses_nvme else 0  # aio swap buffers are always page-locked
    pins = [(z.get(f"offload_{k}") or {}).get("pin_memory") is True for k in ("optimizer", "param")]
    if any(pins) and not hw.cpu_only:
        locked += sum(cpu.values()) - (cpu["buffers"] if rung.uses_nvme else 0)
    if locked * hw.gpus_per_node > hw.cpu_mem:
        raise UsageError(f"{source} page-locks {_gib(locked * hw.gpus_per_node)} per node (swap buffers"
                         f"{' and pinned offload' if any(pins) and not hw.cpu_only else ''}), more than the "
                         f"{_gib(hw.cpu_mem)} of RAM", where,
                         'lower buffer_count / buffer_size / sub_group_size, set pin_memory false, or use "auto"')


# ---------------------------------------------------------------------------------------------------------------
# deepspeed.config: auto


def recipe_hardware(recipe: Recipe, world_size: int, nvme_probe: bool = False) -> Hardware:
    """The hardware a recipe plans for: the `hardware:` budget where set, else this node's GPUs (or CPU) and RAM,
    and free disk at the NVMe path when one is given (nvme_probe: at the default path too)."""
    budget = recipe.hardware
    count, device = local_gpus()
    per_node = local_world_size() or (min(world_size, count) if count else world_size)
    nvme = 0
    if budget.nvme is not None or recipe.deepspeed.nvme_path or nvme_probe:
        # whole GiB: every rank must reach the same answer, and free space moves as ranks start writing
        nvme = free_bytes(recipe.nvme_path) // GiB * GiB
        if budget.nvme is not None:
            nvme = min(nvme, int(budget.nvme * GiB))
    gpu_mem = (int(budget.gpu_mem * GiB) if budget.gpu_mem is not None else device) if count else None
    cpu_mem = int(budget.cpu_mem * GiB) if budget.cpu_mem is not None else physical_memory_bytes()
    return Hardware(nodes=max(1, math.ceil(world_size / per_node)), gpus_per_node=per_node, gpu_mem=gpu_mem,
                    cpu_mem=cpu_mem, nvme=nvme)


def plan_recipe(recipe: Recipe, model_cfg=None, world_size: int = 1, ds: tuple[str, dict] | None = None,
                can_checkpoint: bool = True, trainable: int | None = None) -> Plan:
    """The plan a run follows: `.chosen` (its rung, sized), `.activation_checkpointing`, `.sized`.

    ds=None (deepspeed.config: auto): every rung of the ladder, the cheapest that fits. ds=(name, raw JSON): that
    one config, its "auto" knobs sized and the result judged. A recipe with train.activation_checkpointing: true
    checkpoints anyway, so only those candidates are eligible; with false, auto may still need it (the trainer
    turns it on). The same holds for parallel.tiled_loss / tiled_mlp (`.tiled_loss`, `.tiled_mlp`). parallel.tp,
    parallel.sp and parallel.pp are fixed degrees, except that auto with sp 1 (and tp 1) may choose a larger sp when
    nothing fits without (`.sequence_parallel`), and auto with pp 1 as well a pipeline when nothing fits even so
    (`.pipeline_parallel`; train.grad_accum is its micro-batches a step). Raises UsageError when nothing fits the
    hardware (or the recipe's `hardware:` budget).
    """
    train, data = recipe.train, recipe.data
    field_name, source = recipe.model_field, recipe.model_source
    if model_cfg is not None:  # already built by the caller: name it after the recipe's preset or path
        source = shape_from_config(model_cfg, name=str(source)) if hasattr(model_cfg, "to_dict") else model_cfg
    where = {"model": field_name, "seq_len": "data.seq_len", "micro_batch": "train.micro_batch",
             "precision": "train.precision", "tp": "parallel.tp", "sp": "parallel.sp", "pp": "parallel.pp",
             "micro_batches": "train.grad_accum"}
    par = recipe.parallel
    tiled = {"tiled_mlp": par.tiled_mlp, "tiled_loss": par.tiled_loss}
    hw = recipe_hardware(recipe, world_size, nvme_probe=ds is not None and uses_nvme(ds[1]))
    checkpointing = True if train.activation_checkpointing else None if can_checkpoint else False

    def planned(hw: Hardware) -> Plan:
        if ds is None:
            return plan_model(source, hw, data.seq_len, train.micro_batch, train.precision,
                              checkpointing=checkpointing, where=where, tp=par.tp,
                              sp=None if par.sp == 1 else par.sp, trainable=trainable,
                              pp=None if par.pp == 1 else par.pp, micro_batches=train.grad_accum, **tiled)
        shape = model_shape(source, field_name)
        workload = Workload(data.seq_len, train.micro_batch, train.precision, tp=par.tp, sp=par.sp,
                            trainable=trainable, pp=par.pp, micro_batches=train.grad_accum, **tiled)
        check_layout(shape, hw, workload, where)
        rung = sized_rung(ds[0], ds[1], shape, workload, hw, recipe)
        if par.pp > 1 and (problem := pipeline_rung_problem(rung)):
            raise UsageError(f"{ds[0]} cannot run beside parallel.pp {par.pp}: {problem}", "deepspeed.config",
                             "use zero1 or zero0 (your JSON at stage 0/1), or deepspeed.config: auto")
        check_knobs(shape, rung, hw, workload, ds[0])
        return make_plan(shape, hw, workload, checkpointing=checkpointing, rungs=[rung])

    plan = planned(hw)
    if plan.chosen is not None:
        return plan
    budget = "the recipe's hardware budget" if any(
        v is not None for v in vars(recipe.hardware).values()) else plan.hardware.describe()
    what = f"no ZeRO rung fits {plan.model.name} on {budget}" if ds is None else \
        f"{ds[0]} does not fit {plan.model.name} on {budget}"
    # a named JSON (or tp) gets no sp search: say when a larger parallel.sp could split the sequence
    more_sp = [d for d in sequence_parallel_degrees(plan.model, plan.hardware, plan.workload)
               if d > plan.workload.sp and plan.workload.tp == 1]
    fix = (f"{plan.reason}; or lower data.seq_len / train.micro_batch"
           f"{f', or raise parallel.sp (Ulysses: {more_sp[0]} divides the world and seq_len)' if more_sp else ''}"
           " (`zero-trainer plan` shows all)")
    if ds is None and hw.nvme == 0:
        disk = recipe_hardware(recipe, world_size, nvme_probe=True)
        with_disk = planned(disk) if disk.nvme else None
        if with_disk is not None and with_disk.chosen is not None:
            fix = (f"{with_disk.chosen.name} would fit with NVMe offload: {_gib(with_disk.chosen.nvme_bytes)} of the "
                   f"{_gib(disk.nvme)} free at {recipe.nvme_path} — pass --nvme-path {recipe.nvme_path} (or set "
                   f"deepspeed.nvme_path); without NVMe {plan.reason}")
    raise UsageError(what, "deepspeed.config" if ds is None else f"deepspeed.config={ds[0]}", fix)
