"""The rungs of the ZeRO ladder: DeepSpeed JSON read through ds_config.py, its "auto" values filled and every
memory knob sized for the model on the hardware (size_knobs); which rungs run beside a pipeline."""

import dataclasses
import math
import os
from dataclasses import dataclass, field

from ..ds_config import (
    DS_CONFIG_DIR,
    fill_sized,
    load_ds_config,
    offload_device,
    resolve_auto_values,
    zero_stage,
)
from ..hardware import Hardware
from ..recipe import Recipe
from .shapes import ModelShape, Workload, tp_rank_shape, zero_ranks

# zero3_offload_optimizer (optimizer on CPU, parameters on the device) sits between zero3 and zero3_offload when
# its JSON exists; the ladder is read in this order from ds_configs/.
LADDER = ("zero0", "zero1", "zero2", "zero2_offload", "zero3", "zero3_offload_optimizer", "zero3_offload",
          "zero3_nvme")
PIPELINE_LADDER = ("zero0", "zero1")  # DeepSpeed refuses ZeRO-2/3 beside a PipelineModule


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


def pipeline_rung_problem(rung: Rung) -> str:
    """Why a JSON cannot run under a pipeline ("" if it can): DeepSpeed refuses ZeRO-2/3 beside a PipelineModule, and
    parameter or NVMe offload (zero_trainer/pipeline.py check_pipeline refuses the same; it also refuses fp32 ZeRO-0
    with gradient clipping, a DeepSpeed bug under PP, by train.grad_clip)."""
    if rung.stage > 1:
        return f"it is ZeRO stage {rung.stage}; DeepSpeed's pipeline engine runs ZeRO 0 and 1 only"
    if rung.uses_nvme or rung.offload_param != "none":
        return "it offloads parameters or to NVMe; only CPU optimizer offload runs with the pipeline engine"
    return ""


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
