"""The memory model, per rank (Ψ parameters, N = the ranks ZeRO partitions over: nodes × gpus_per_node, ÷ tp with
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
With activation checkpointing each layer keeps only its input (w·s·b·h) and one layer is recomputed at a time,
after the loss head's peak: the larger of the two counts, the recomputed layer with the gradients its backward
creates beside its saved tensors (RECOMPUTE_GRADIENTS, 0.37 of them: fitted on a GPU at 32k-128k tokens).
On a CPU, glibc serves tensors below its mmap threshold (at most 32 MiB) from the heap and keeps their pages when they
are freed: HEAP_RETAINED (1.75) times a layer's saved tensors below that size stay resident, once more with
checkpointing (`heap_retained_bytes`; fitted on seq-1024 runs of micro-batch 1-16, where it was 8-35% of the peak).

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
"""

import dataclasses
import math
from dataclasses import dataclass, field

from ..hardware import GiB, Hardware
from .knobs import Rung, _aligned, _int, largest_sub_group, partitions, zero_knob
from .shapes import ModelShape, Workload, active_params, expert_params, tp_rank_shape, zero_ranks

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
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc: larger allocations are mmapped, and go back to the OS when freed
# With checkpointing, the gradients a recomputed layer's backward creates beside its saved tensors, in units of them:
# fitted on one H200 (bench/results/long_context_gpu.json: 1b at 32k-128k tokens with the loss tiled, 0.35-0.39)
RECOMPUTE_GRADIENTS = 0.37
HEAP_RETAINED = 1.75  # a layer's heap-served activations kept resident on CPU, in units of them (heap_retained_bytes)


def loss_tiles(tokens: int, vocab: int, tile_bytes: int | None = None) -> int:
    """Tiles the tiled loss cuts a rank's tokens (micro batch × its sequence slice) into (at most one a token)."""
    return min(tokens, max(1, math.ceil(4 * tokens * vocab / (tile_bytes or LOSS_TILE_LOGIT_BYTES))))


def mlp_tiles(seq_tokens: int, hidden: int) -> int:
    """Tiles TiledMLP cuts a rank's sequence slice into: ALST's rule, ceil(tokens / hidden)."""
    return max(1, math.ceil(seq_tokens / hidden))


# ---------------------------------------------------------------------------------------------------------------
# the memory model


def activation_bytes(shape: ModelShape, workload: Workload, checkpointing: bool) -> int:
    """Peak bytes of activations for one micro batch on one rank (see the module docstring)."""
    return sum(activation_terms(shape, workload, checkpointing).values())


def activation_terms(shape: ModelShape, workload: Workload, checkpointing: bool, loss_head: bool = True) -> dict:
    """activation_bytes by term: `layers` (what every layer keeps for its backward: its input with checkpointing),
    `live` (the layer being recomputed or run backward, beyond what it keeps), `all_to_all` (Ulysses' buffers),
    `loss` (the loss head with the final norm and rope). With checkpointing the loss head's peak is over before the
    first layer is recomputed, so `live` counts only what a recomputed layer holds beyond it: the larger of the two
    (loss_head=False: a pipeline stage without the head)."""
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
    if checkpointing:  # a recomputed layer's backward: its saved tensors and the gradients it computes from them
        terms["live"] = int(terms["live"] * (1 + RECOMPUTE_GRADIENTS))
        if loss_head:
            terms["live"] = max(0, terms["live"] - terms["loss"])
    return terms


def layer_tensor_bytes(shape: ModelShape, workload: Workload) -> list[int]:
    """Each tensor one decoder layer saves for its backward, in bytes (the count activation_terms sums): the norms'
    fp32 inputs and w-byte outputs, q, the attention output, k and v, the logsumexp, the four ffn-wide tensors (one
    tile's with TiledMLP)."""
    s, b, w, tp = workload.local_seq_len, workload.micro_batch, workload.weight_bytes, workload.tp
    h, f, H = shape.hidden, shape.ffn, shape.heads
    tokens, kv_width = s * b, shape.kv_heads * (h // H)
    mlp_tokens = b * math.ceil(s / mlp_tiles(s, h)) if workload.tiled_mlp else tokens
    per_token = [4 * h] * 2 + [w * h] * 4 + [w * h // tp] * 2 + [w * kv_width // tp] * 2 + [4 * H // tp]
    return [tokens * n for n in per_token] + [mlp_tokens * math.ceil(w * f / tp)] * 4


def heap_retained_bytes(shape: ModelShape, workload: Workload, checkpointing: bool) -> int:
    """CPU only: what glibc's heap keeps of the tensors a layer allocates and frees in every forward and backward.
    Below MMAP_THRESHOLD_MAX they come from the heap, whose freed pages stay resident (the peak RSS counts them);
    larger ones are mmapped and given back. HEAP_RETAINED times a layer's saved tensors below the threshold, once
    more with checkpointing (its recompute), fitted on minimind-26m (fp32, seq 1024, micro-batch 1-16 with
    checkpointing, 2 and 4 without: bench/results/plan_calibration.json's seq-1024 rows)."""
    small = sum(n for n in layer_tensor_bytes(shape, workload) if n < MMAP_THRESHOLD_MAX)
    return int((HEAP_RETAINED + int(checkpointing)) * small)


@dataclass
class Candidate:
    name: str
    activation_checkpointing: bool
    # bytes per rank: params, grads, optimizer, activations, buffers (with the runtime overhead); and `history`, what
    # this machine's runs add (plan --history: plan/history.py), only in a plan given corrections
    device: dict
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
    speed: object = None  # plan.speed.StepTime of a fitting candidate, when a probe of the machine is at hand

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
                **({"stages": self.stages} if self.stages else {}),
                **({"speed": self.speed.to_json()} if self.speed is not None else {})}


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


def pipeline_init_retained_bytes(shape: ModelShape, stage: ModelShape, rung: Rung, precision: str) -> int:
    """init_retained_bytes for a pipeline stage's rank: it builds the whole model (so every stage starts from the same
    weights) and frees the layers other stages run, so the heap keeps the whole model's small tensors (fp32 ZeRO-0
    trains its own stage's in place)."""
    whole = init_retained_bytes(shape, dataclasses.replace(rung, stage=max(rung.stage, 1)), precision)
    kept = 0
    if rung.stage == 0 and precision == "fp32":
        kept = 4 * sum(n for n in (stage.param_sizes or (stage.params,)) if 4 * n <= MMAP_THRESHOLD_MAX)
    return max(0, whole - kept)


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
    from ..pretrained import READ_CHUNK_BYTES

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
        device["activations"] += heap_retained_bytes(shape, workload, checkpointing)
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
            device["activations"] += heap_retained_bytes(shape, workload, checkpointing)
            for key, value in cpu.items():
                device[key] = device.get(key, 0) + value
            device["buffers"] += host + pipeline_init_retained_bytes(shape, st.shape, rung, workload.precision)
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


# --- mixture of experts --------------------------------------------------------------------------------------


def moe_activation_bytes(shape: ModelShape, workload: Workload, checkpointing: bool) -> int:
    """What a MoE layer holds beyond activation_bytes' dense MLP (one expert's width per token): the k-1 further
    experts per token, and the dispatch and combine buffers ([experts, capacity, hidden], before and after each
    all-to-all: 4 per layer) at a balanced capacity of tokens*k/experts. Capacity follows the busiest expert (no token
    is dropped), so a collapsed router can make it k*experts/k = up to experts times this."""
    if not shape.experts:
        return 0
    s, b, w, k = workload.seq_len, workload.micro_batch, workload.weight_bytes, shape.experts_per_token
    per_layer = s * b * ((k - 1) * 4 * w * shape.ffn + 4 * k * w * shape.hidden)
    return per_layer if checkpointing else shape.layers * per_layer


def expert_parallel_split(shape: ModelShape, ep: int, world_size: int, workload: Workload) -> dict:
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


def experts_line(shape: ModelShape, ep: int, world_size: int, workload: Workload) -> str:
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


# ---------------------------------------------------------------------------------------------------------------
# pipeline parallelism: the decoder layers cut into stages, micro-batches flowing through them (1F1B)


MEMORY_OPT_ALLREDUCE_SIZE = 500_000_000  # elements the pipe engine's gradient all-reduce flattens at once
INDEX_BYTES = 8  # int64 token ids, position ids and labels that travel with a micro-batch


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
    one = activation_terms(dataclasses.replace(shape, layers=1), workload, checkpointing, loss_head=stage.last)
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
