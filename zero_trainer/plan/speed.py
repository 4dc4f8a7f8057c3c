"""The step-time model: seconds per optimizer step of a candidate (rung, activation checkpointing, micro-batch), from
FLOPs and bytes moved over the rates `zero-trainer probe` measured on the machine (zero_trainer/probe.py).

Per rank and step (m = micro-batches a step, t = tokens a micro-batch, Ψ parameters, N the ranks ZeRO partitions
over, w the bytes of a weight):
  - compute: 6 FLOPs per matmul parameter per token (2 forward, 4 backward; the head included, the embedding a
    lookup) plus attention's 6·s·h per layer per token (causal: half of QKᵀ and AV), × (1 + 1/3 of the layers') with
    activation checkpointing (each layer's forward again), over the probed matmul rate at the model's MLP GEMM shape
    (t × h @ h × f) in the run's dtype. Elementwise work (norms, rope, SwiGLU, softmax, the loss head's log-softmax)
    is memory-bound: ELEMENTWISE_PASSES times the activation and logit bytes over the probed memory bandwidth.
  - ZeRO communication (DeepSpeed 0.19.8): stage 0/1 all-reduce (or reduce-scatter + all-gather) the gradients once a
    step at the accumulation boundary; stage 2 reduce-scatters every micro-step and all-gathers the updated weights;
    stage 3 also all-gathers every layer's weights twice a micro-step (forward and backward). A ring moves
    2(N−1)/N of the bytes for an all-reduce and (N−1)/N for a gather or scatter, at the probed collective bandwidth,
    with no overlap on CPU (gloo) and COMM_OVERLAP hidden behind compute on a GPU.
  - optimizer: the Adam step over the rank's parameters (Ψ at stage 0, Ψ/N above) at the probed seconds per
    parameter: DeepSpeed's CPU Adam (the CPU accelerator's FusedAdam runs the same kernel, and offload runs it).
  - offload: on a GPU, gradients down and weights up once a step at the probed pageable/pinned copy rate; on a CPU the
    same bytes are copied within RAM.
  - NVMe: the swapped optimizer state (16Ψ/N) read and written once a step, and at stage 3 with parameters on NVMe,
    their partitions read twice a micro-step, at the probed disk rates.
  - tp / sp / pp: AutoTP all-reduces the layer output twice a layer forward and backward (4·L·t·h·w per micro-step);
    Ulysses all-to-alls q, k, v and the output (4 a layer forward, 4 backward); a pipeline runs compute ÷ pp per
    stage over m + pp − 1 slots (the bubble) and sends each micro-batch's activation forward and its gradient back.
  - fixed: STEP_OVERHEAD_S + MICRO_OVERHEAD_S per micro-step (Python, the engine's bookkeeping, hooks), measured.

Nothing here decides what fits: the memory model does. `objective: speed` ranks the fitting candidates by tokens/s.
"""

import math
from dataclasses import dataclass

from ..hardware import Hardware
from .knobs import Rung
from .shapes import ModelShape, Workload

# Each term's coefficient: seconds = Σ coefficient × feature (step_features). optimizer, offload and gather are
# the probe's own rates (1: physical, not fitted); the rest were fitted by least squares on relative error over
# this 2-core CPU's calibration runs (bench/results/plan_calibration.json: debug, minimind-26m, minimind-104m, every
# rung at 1 and 2 ranks, minimind-26m measured twice): compute 2.35 in bf16 (the probe's bf16 GEMMs run 2.35x faster
# than a training step's mix of shapes, transposes and small tensors) and compute_fp32 1.06 in fp32 (fitted on the
# fp32 rows alone, the rest held); elementwise 22.8
# passes over the saved bytes; allreduce 0.36 (DeepSpeed's shared-memory all-reduce beats the gloo one the probe
# timed); ops 0 (the probed small-message latency times DeepSpeed's collective count over-counts: stage 3's
# per-module fetches are `zero3`, 0.69 ms each); stage2 62 ms a micro-step over several ranks and stage2_bytes 7.85
# passes over its gradient bytes at any world size (fitted on the stage-2 rows alone); nvme 0.54 (the
# probe's O_DIRECT reads are slower than DeepSpeed's overlapped aio); micro and step 7.9 ms each.
COEFFICIENTS = {"compute": 2.35, "compute_fp32": 1.06, "elementwise": 22.8, "allreduce": 0.36, "gather": 1.0,
                "ops": 0.0, "zero3": 6.85e-4, "stage2": 0.062, "stage2_bytes": 7.85, "optimizer": 1.0, "offload": 1.0,
                "nvme": 0.54, "micro": 0.0079, "step": 0.0079}
COMM_OVERLAP = 0.5  # the share of ZeRO's communication hidden behind compute on a GPU (none on CPU: gloo)


@dataclass(frozen=True)
class StepTime:
    seconds: float
    terms: dict  # seconds by term: compute, elementwise, comm, optimizer, offload, nvme, parallel, bubble, fixed
    tokens: int  # tokens a step trains, all data-parallel ranks together

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    def time_for(self, tokens: float) -> float:
        return tokens / self.tokens_per_s

    def to_json(self) -> dict:
        return {"step_s": round(self.seconds, 4), "tokens_per_s": round(self.tokens_per_s, 1),
                "terms": {k: round(v, 4) for k, v in self.terms.items()}}


def matmul_params(shape: ModelShape) -> int:
    """Parameters that multiply every token: each layer's q, k, v, o and the MLP's three projections (a MoE's: the
    experts a token is routed to), and the head (the embedding is a lookup)."""
    h, kv = shape.hidden, shape.kv_heads * (shape.hidden // shape.heads)
    mlp = 3 * h * shape.ffn * (shape.experts_per_token if shape.experts else 1)
    return shape.layers * (2 * h * h + 2 * h * kv + mlp) + shape.vocab * h


def flops_per_token(shape: ModelShape, seq_len: int, checkpointing: bool) -> float:
    """Forward + backward FLOPs a token costs (with checkpointing, the layers' forward once more)."""
    head = 2 * shape.vocab * shape.hidden
    layers = 2 * matmul_params(shape) - head + 2 * seq_len * shape.hidden * shape.layers
    return 3 * (layers + head) + (layers if checkpointing else 0)


def _ring(bytes_: float, ranks: int, rate: float, all_reduce: bool) -> float:
    if ranks <= 1 or not rate:
        return 0.0
    return (2 if all_reduce else 1) * (ranks - 1) / ranks * bytes_ / rate


def param_modules(shape: ModelShape) -> int:
    """Modules holding parameters (what ZeRO-3 fetches and releases one by one): per layer 2 norms, q, k, v, o and the
    three MLP projections (a MoE layer counted the same: its router and fused experts are fewer modules, close
    enough); the embedding, the final norm, an untied head."""
    return shape.layers * 9 + 2 + (0 if shape.tied_embeddings else 1)


def cpu_share(hw: Hardware, probe) -> float:
    """The part of the probed rates one rank gets: on a CPU the ranks of a node split its cores (trainer.set_cpu_threads
    gives each cores / ranks threads; the probe ran with all of them), on a GPU each rank has its own."""
    if not hw.cpu_only:
        return 1.0
    threads = probe.torch_threads or 1
    return max(1, threads // max(hw.gpus_per_node, 1)) / threads


def step_features(shape: ModelShape, rung: Rung, hw: Hardware, workload: Workload, checkpointing: bool,
                  probe) -> dict:
    """Each term's seconds before its fitted coefficient (COEFFICIENTS), from FLOPs, bytes and the probed rates."""
    s, b, m = workload.local_seq_len, workload.micro_batch, max(workload.micro_batches, 1)
    tp, sp, pp = workload.tp, workload.sp, workload.pp
    w = workload.weight_bytes
    dtype = workload.precision if any(r.dtype == workload.precision for r in probe.matmul_flops_per_s) else "fp32"
    t = s * b  # tokens a rank runs per micro-step
    h, f, V, L = shape.hidden, shape.ffn, shape.vocab, shape.layers
    share = cpu_share(hw, probe)
    rate = probe.matmul_rate(dtype, t, h, max(f // tp, 1)) * share
    flops = flops_per_token(shape, workload.seq_len, checkpointing) * t / (tp * pp)
    x = {"compute": m * flops / rate}
    saved = t * (8 * h + 6 * w * h + 4 * w * f / tp) * L / pp + t * 12 * V / pp  # activations and logits
    x["elementwise"] = m * saved / (probe.host_memory_bytes_per_s * share)
    N = hw.world_size // (tp * pp)  # zero_ranks: ZeRO partitions over a stage's data-parallel ranks (× sp)
    psi = shape.params / (tp * pp)
    grad_bytes = psi * (4 if workload.precision == "fp32" else 2)
    ar, ag = probe.allreduce_bytes_per_s, probe.allgather_bytes_per_s or probe.allreduce_bytes_per_s
    latency = probe.allreduce_latency_s or 0.0
    modules = param_modules(shape) / pp
    # DeepSpeed on CPU all-reduces through its shared-memory op (deepspeed_shm_comm), gathers and scatters through
    # gloo: two features, each over its probed rate (the fit finds what the shm path costs beside gloo's)
    if rung.stage <= 1:
        allreduce, gather, ops = _ring(grad_bytes, N, ar, True), (rung.stage == 1) * _ring(w * psi, N, ag, False), 1
    elif rung.stage == 2:
        allreduce = 0.0
        gather = m * _ring(grad_bytes, N, ag, False) + _ring(w * psi, N, ag, False)
        ops = m * max(1, grad_bytes // max(rung.zero.get("reduce_bucket_size") or 5e8, 1)) + 1
    else:
        allreduce = 0.0
        gather = m * (2 * _ring(w * psi, N, ag, False) + _ring(grad_bytes, N, ag, False))
        ops = m * 3 * modules  # each module gathered forward and backward, its gradient reduced
    overlap = 1 if hw.cpu_only else 1 - COMM_OVERLAP
    x["allreduce"], x["gather"] = overlap * allreduce, overlap * gather
    x["ops"] = overlap * ops * latency if N > 1 else 0.0
    # stage 2 over several ranks: each micro-step's gradients copied into reduce buckets and reduced as they come
    # (overlap_comm), a cost per micro-step beside the bytes
    x["stage2"] = m * (rung.stage == 2 and N > 1)
    # and at any world size, its gradients copied into contiguous buffers and averaged, per micro-step and byte
    x["stage2_bytes"] = m * grad_bytes * (rung.stage == 2) / (probe.host_memory_bytes_per_s * share)
    x["zero3"] = m * 2 * modules * (rung.stage == 3)  # fetch + release bookkeeping a module, forward and backward
    updated = psi if rung.stage == 0 else psi / max(N, 1)
    x["optimizer"] = updated * (probe.cpu_adam_s_per_param or probe.adamw_s_per_param) / share
    moved = 0.0
    if rung.offload_optimizer != "none" or rung.offload_param != "none":
        moved = 2 * w * updated + 4 * updated  # gradients down and weights up, the fp32 gradient partition
    copy = (probe.d2h_pageable_bytes_per_s or probe.host_memory_bytes_per_s) if not hw.cpu_only else \
        probe.host_memory_bytes_per_s * share / 2  # a host copy reads and writes
    x["offload"] = moved / copy
    nvme = 0.0
    if rung.uses_nvme:
        read, write = probe.disk_read_bytes_per_s or 1e9, probe.disk_write_bytes_per_s or 1e9
        if rung.offload_optimizer == "nvme":
            nvme += 16 * updated / read + 16 * updated / write
        if rung.offload_param == "nvme":
            nvme += m * 2 * w * psi / max(N, 1) / read
    x["nvme"] = nvme
    parallel = 0.0
    if tp > 1:
        parallel += m * _ring(4 * L * t * h * w, tp, ar, all_reduce=True)
    if sp > 1:
        parallel += m * 8 * L * t * h * w * (sp - 1) / sp / (ag or 1)
    if pp > 1:
        parallel += 2 * m * t * h * w / (ag or 1)  # each micro-batch's activation forward, its gradient back
    x["parallel"] = parallel
    x["micro"] = m
    x["step"] = 1
    return x


def step_time(shape: ModelShape, rung: Rung, hw: Hardware, workload: Workload, checkpointing: bool,
              probe) -> StepTime:
    """Seconds per optimizer step of one rank (all ranks take as long: they synchronise every step)."""
    x = step_features(shape, rung, hw, workload, checkpointing, probe)
    c = COEFFICIENTS
    # the probe's fp32 GEMMs are what training gets; its bf16 ones (AMX, tight loops) run well beyond training's mix
    compute = c["compute_fp32"] if workload.precision == "fp32" else c["compute"]
    terms = {"compute": compute * x["compute"], "elementwise": c["elementwise"] * x["elementwise"],
             "comm": c["allreduce"] * x["allreduce"] + c["gather"] * x["gather"] + c["ops"] * x["ops"],
             "zero3": c["zero3"] * x["zero3"] + c["stage2"] * x["stage2"] + c["stage2_bytes"] * x["stage2_bytes"],
             "optimizer": c["optimizer"] * x["optimizer"], "offload": c["offload"] * x["offload"],
             "nvme": c["nvme"] * x["nvme"], "parallel": c["gather"] * x["parallel"]}
    m, pp = max(workload.micro_batches, 1), workload.pp
    terms["bubble"] = (terms["compute"] + terms["elementwise"]) * (pp - 1) / m if pp > 1 else 0.0
    terms["fixed"] = c["micro"] * x["micro"] + c["step"] * x["step"]
    dp = hw.world_size // (workload.tp * workload.sp * pp)
    return StepTime(sum(terms.values()), terms, tokens=workload.seq_len * workload.micro_batch * m * dp)


def human_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"
