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

import dataclasses
import math
from dataclasses import dataclass

from .knobs import Rung
from .shapes import ModelShape, Workload

# Fitted on this repo's runs (bench/plan_calibration.py, speed columns); see the module docstring.
ELEMENTWISE_PASSES = 6  # bytes of activations and logits read or written per byte saved, forward + backward
STEP_OVERHEAD_S = 0.02  # per optimizer step: the engine's step, the loop, the metrics all-reduce
MICRO_OVERHEAD_S = 0.01  # per micro-step: Python and DeepSpeed hooks around forward and backward
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


def step_time(shape: ModelShape, rung: Rung, world_size: int, cpu_only: bool, workload: Workload,
              checkpointing: bool, probe) -> StepTime:
    """Seconds per optimizer step of one rank (all ranks take as long: they synchronise every step)."""
    s, b, m = workload.local_seq_len, workload.micro_batch, max(workload.micro_batches, 1)
    tp, sp, pp = workload.tp, workload.sp, workload.pp
    w = workload.weight_bytes
    dtype = workload.precision if workload.precision in ("fp32", "bf16", "fp16") else "bf16"
    t = s * b  # tokens a rank runs per micro-step
    h, f, V, L = shape.hidden, shape.ffn, shape.vocab, shape.layers
    rate = probe.matmul_rate(dtype if any(r.dtype == dtype for r in probe.matmul_flops_per_s) else "fp32",
                             t, h, max(f // tp, 1))
    flops = flops_per_token(shape, workload.seq_len, checkpointing) * t / (tp * pp)
    # a rank with Ulysses runs s/sp tokens through every layer, but attention over the whole sequence (heads / sp)
    terms = {"compute": m * flops / rate}
    saved = t * (8 * h + 6 * w * h + 4 * w * f / tp) * L / pp + t * 12 * V / pp  # activations and logits
    terms["elementwise"] = m * ELEMENTWISE_PASSES * saved / probe.host_memory_bytes_per_s
    N = world_size // (tp * pp)  # zero_ranks: ZeRO partitions over a stage's data-parallel ranks, × sp
    psi = shape.params / (tp * pp)
    grad_bytes = psi * (4 if workload.precision == "fp32" else 2)
    ar, ag = probe.allreduce_bytes_per_s, probe.allgather_bytes_per_s or probe.allreduce_bytes_per_s
    if rung.stage <= 1:
        comm = _ring(grad_bytes, N, ar, all_reduce=True)
    elif rung.stage == 2:
        comm = m * _ring(grad_bytes, N, ar, all_reduce=False) + _ring(w * psi, N, ag, all_reduce=False)
    else:
        comm = m * (2 * _ring(w * psi, N, ag, all_reduce=False) + _ring(grad_bytes, N, ar, all_reduce=False))
    terms["comm"] = comm * (1 if cpu_only else 1 - COMM_OVERLAP)
    updated = psi if rung.stage == 0 else psi / max(N, 1)
    terms["optimizer"] = updated * (probe.cpu_adam_s_per_param or probe.adamw_s_per_param)
    offload = 0.0
    if rung.offload_optimizer != "none" or rung.offload_param != "none":
        moved = 2 * w * updated  # gradients down, weights up
        copy = (probe.d2h_pageable_bytes_per_s or probe.host_memory_bytes_per_s) if not cpu_only else \
            probe.host_memory_bytes_per_s / 2  # a host copy reads and writes
        offload = moved / copy
    terms["offload"] = offload
    nvme = 0.0
    if rung.uses_nvme:
        read, write = probe.disk_read_bytes_per_s or 1e9, probe.disk_write_bytes_per_s or 1e9
        if rung.offload_optimizer == "nvme":
            nvme += 16 * updated / read + 16 * updated / write
        if rung.offload_param == "nvme":
            nvme += m * 2 * w * psi / max(N, 1) / read
    terms["nvme"] = nvme
    parallel = 0.0
    if tp > 1:
        parallel += m * _ring(4 * L * t * h * w, tp, ar, all_reduce=True)
    if sp > 1:
        parallel += m * 8 * L * t * h * w * (sp - 1) / sp / (ag or 1)
    if pp > 1:
        parallel += 2 * m * t * h * w / (ag or 1)  # each micro-batch's activation forward, its gradient back
    terms["parallel"] = parallel
    busy = terms["compute"] + terms["elementwise"]
    terms["bubble"] = busy * (pp - 1) / m if pp > 1 else 0.0
    terms["fixed"] = STEP_OVERHEAD_S + m * MICRO_OVERHEAD_S + (probe.step_overhead_s or 0)
    dp = world_size // (tp * sp * pp)
    return StepTime(sum(terms.values()), terms, tokens=workload.seq_len * b * m * dp)


def with_micro_batch(workload: Workload, micro_batch: int) -> Workload:
    return dataclasses.replace(workload, micro_batch=micro_batch)


def human_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"
