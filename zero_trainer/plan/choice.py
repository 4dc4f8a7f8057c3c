"""The choice: which candidate a run follows, and the searches and checks around it.

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

Also here: the layout and knob checks (check_layout, check_pipeline, check_knobs), the Plan a run follows, and
plan_recipe, what deepspeed.config: auto asks.
"""

import dataclasses
import math
from dataclasses import dataclass, field

from ..ds_config import uses_nvme
from ..errors import UsageError
from ..hardware import GiB, Hardware, free_bytes, local_gpus, local_world_size, physical_memory_bytes
from ..presets import PRESETS
from ..recipe import PRECISIONS, Recipe
from .history import Corrections, corrected, corrected_speed
from .knobs import (
    LADDER,
    Rung,
    ladder_rungs,
    optimizer_buffers_needed,
    optimizer_states,
    param_buffers_needed,
    pipeline_rung_problem,
    sized_rung,
    swapped_partitions,
    zero_knob,
)
from .memory import (
    DEVICE_RUNTIME_BYTES,
    HOST_PROCESS_BYTES,
    RUNTIME_BYTES,
    Candidate,
    estimate,
    load_peak_bytes,
    model_states,
    pipeline_stages,
)
from .shapes import ModelShape, Workload, model_shape, shape_from_config, tp_rank_shape, zero_ranks
from .speed import step_time

OBJECTIVES = ("memory", "speed")

SAFETY_MARGIN = 0.10
DEFAULT_SEQ_LEN = 2048
BUBBLE_MICRO_BATCHES = 4  # micro-batches a step per stage that keep the bubble small: m >= 4·pp (Megatron's advice)


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
    objective: str = "memory"  # memory: the least sharding that fits; speed: the most tokens/s that fits
    probe: object = None  # the probe.Probe step times came from (None: no speed)
    speed_search: list = field(default_factory=list)  # objective speed: (micro_batch, best fitting candidate) tried
    # history.Corrections from this machine's runs (`plan --history`), applied to every candidate; None: the model's own
    corrections: Corrections | None = None

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
                "activation_checkpointing": self.activation_checkpointing, "cpu_only": self.hardware.cpu_only,
                "tensor_parallel": self.tensor_parallel, "sequence_parallel": self.sequence_parallel,
                "tiled_mlp": self.tiled_mlp, "tiled_loss": self.tiled_loss,
                "predicted_peak_bytes": self.predicted_peak_bytes, "sized": self.sized,
                "trainable_params": self.workload.trainable, **self._pipeline_keys(), **self._speed_keys()}

    def _speed_keys(self) -> dict:
        """The chosen candidate's predicted step time (and what it was predicted from), when a probe was at hand."""
        speed = self.chosen.speed if self.chosen is not None else None
        if speed is None:
            return {}
        return {"objective": self.objective, "predicted_step_s": round(speed.seconds, 4),
                "predicted_tokens_per_s": round(speed.tokens_per_s, 1),
                "predicted_step_terms": speed.to_json()["terms"],
                "probe": {"device": self.probe.device, "measured_at": self.probe.measured_at}}

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
            **self._speed_keys(),
            **({"speed_search": [{"micro_batch": mb, "fits": c is not None,
                                  **({"rung": c.name, "activation_checkpointing": c.activation_checkpointing,
                                      **c.speed.to_json()} if c is not None else {})}
                                 for mb, c in self.speed_search]} if self.speed_search else {}),
        }


def preference_key(rung: Rung, checkpointing: bool, tiling: int = 0, sp: int = 1) -> tuple:
    """Cheapest first: no offload, then CPU offload, then NVMe; within each, without activation checkpointing
    first; then the ladder order (less sharding first). Tiling and then a searched sequence-parallel degree come
    only when nothing fits without them, so they lead the key."""
    tier = 2 if rung.uses_nvme else 1 if "cpu" in (rung.offload_optimizer, rung.offload_param) else 0
    return sp, tiling, tier, checkpointing, LADDER.index(rung.name) if rung.name in LADDER else len(LADDER)


def judged(shape: ModelShape, rung: Rung, hw: Hardware, workload: Workload, checkpointing: bool,
           corrections: Corrections | None = None) -> Candidate:
    """One candidate, judged (with its memory corrected by this machine's history, when given: history.corrected);
    an NVMe rung that can keep its parameters in RAM does so only when that fits."""
    c = corrected(estimate(shape, rung, hw, workload, checkpointing), corrections, hw, workload)
    _judge(c, rung, hw)
    if not c.fits and rung.tighter is not None:
        c = corrected(estimate(shape, rung.tighter, hw, workload, checkpointing), corrections, hw, workload)
        _judge(c, rung.tighter, hw)
    return c


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


def make_plan(shape: ModelShape, hw: Hardware, workload: Workload, checkpointing: bool | None = None,
              rungs: list[Rung] | None = None, tiling: bool = True, corrections: Corrections | None = None) -> Plan:
    """Every candidate (rung × activation checkpointing) judged, and the first that fits in preference order.

    checkpointing=True: the run checkpoints activations anyway (a recipe that asks for it), so only those
    candidates are eligible; False: only those without (a model that cannot checkpoint); None: both, without
    first. `rungs`: the ladder (default) or the one JSON a run names. tiling: when nothing fits, the same
    candidates again with the loss tiled, then the MLP too (long context); the workload's own tiling always holds.
    corrections: history.Corrections applied to every candidate's memory before it is judged.
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
        judged_now = [judged(shape, rung, hw, wl, ac, corrections) for rung in rungs for ac in (False, True)]
        candidates += judged_now
        preference = sorted((c for c in judged_now if checkpointing is None or c.activation_checkpointing ==
                             checkpointing), key=lambda c: preference_key(by_name[c.name], c.activation_checkpointing))
        chosen = next((c for c in preference if c.fits), None)
        if chosen is not None:
            break
    eligible = [c for c in candidates if checkpointing is None or c.activation_checkpointing == checkpointing]
    if chosen is None:
        return Plan(shape, hw, workload, candidates, None, _nothing_fits(eligible, by_name, hw),
                    notes=_bubble_note(workload), corrections=corrections)
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
                notes=_notes(shape, by_name[chosen.name], hw, workload), corrections=corrections)


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
               trainable: int | None = None, pp: int | None = 1, micro_batches: int | None = None,
               probe=None, objective: str = "memory", corrections: Corrections | None = None) -> Plan:
    """The plan (plan_memory) with each fitting candidate's step time when `probe` (probe.Probe of a machine like
    `hardware`) is given. objective "speed": the candidate with the most tokens/s that fits, over the rungs,
    activation checkpointing and micro-batches 1, 2, 4, ... up to max(micro_batch, 16). corrections
    (history.Corrections, `plan --history`): every candidate's memory and step time scaled by this machine's runs."""
    args = dict(seq_len=seq_len, precision=precision, checkpointing=checkpointing, where=where, tp=tp, sp=sp,
                tiled_mlp=tiled_mlp, tiled_loss=tiled_loss, trainable=trainable, pp=pp, micro_batches=micro_batches,
                corrections=corrections)
    if objective not in OBJECTIVES:
        raise UsageError(f"objective '{objective}' is unknown", "--objective", "use memory or speed")
    if objective == "speed" and probe is None:
        raise UsageError("objective speed needs step times, and there is no probe of this kind of machine",
                         "--objective", "run `zero-trainer probe` on the machine (or pass --probe FILE)")
    plan = with_speeds(plan_memory(model, hardware, micro_batch=micro_batch, **args), probe)
    if objective == "memory":
        return plan
    tried, best = [], None
    for mb in sorted({micro_batch, *(2 ** i for i in range(5)), *(2 ** i for i in range(micro_batch.bit_length()))}):
        p = plan if mb == micro_batch else with_speeds(plan_memory(model, hardware, micro_batch=mb, **args), probe)
        fitting = [c for c in p.candidates if c.fits and c.speed is not None and
                   (checkpointing is None or c.activation_checkpointing == checkpointing)]
        fastest = max(fitting, key=lambda c: c.speed.tokens_per_s, default=None)
        tried.append((mb, fastest))
        if fastest is not None and (best is None or fastest.speed.tokens_per_s > best[1].speed.tokens_per_s):
            best = (p, fastest)
    if best is None:
        return plan
    p, fastest = best
    memory_choice = plan.chosen
    p.reason = (f"{_label(fastest)} at micro-batch {p.workload.micro_batch}: the most tokens/s that fits "
                f"({fastest.speed.tokens_per_s:,.0f} tokens/s, {fastest.speed.seconds:.3g} s a step"
                + (f"; the memory objective's {_label(memory_choice)} at micro-batch {micro_batch}: "
                   f"{memory_choice.speed.tokens_per_s:,.0f} tokens/s" if memory_choice is not None and
                   memory_choice.speed is not None else "") + ")")
    p.chosen, p.objective, p.speed_search = fastest, "speed", tried
    p.notes = _notes(p.model, fastest.rung, hardware, p.workload)
    return p


def with_speeds(plan: Plan, probe) -> Plan:
    """Each fitting candidate's step time (plan.speed) from `probe`, scaled by plan.corrections (history); the plan
    unchanged without a probe."""
    if probe is None:
        return plan
    plan.probe = probe
    for c in plan.candidates:
        if c.fits:
            wl = dataclasses.replace(plan.workload, tiled_mlp=c.tiled_mlp, tiled_loss=c.tiled_loss)
            c.speed = corrected_speed(step_time(plan.model, c.rung, plan.hardware, wl, c.activation_checkpointing,
                                                probe), plan.corrections)
    return plan


def probe_for(hw: Hardware, probe) -> object:
    """`probe` when it measured the kind of device `hw` plans for (a CPU-only plan and a CPU probe, a GPU plan and a
    GPU probe), else None: a CPU's rates say nothing about a GPU's step."""
    if probe is None:
        return None
    return probe if (probe.device == "cpu") == hw.cpu_only else None


def plan_memory(model, hardware: Hardware, seq_len: int | None = None, micro_batch: int = 1,
                precision: str = "bf16", checkpointing: bool | None = None, where: dict | None = None,
                tp: int = 1, sp: int | None = None, tiled_mlp: bool = False, tiled_loss: bool = False,
                trainable: int | None = None, pp: int | None = 1, micro_batches: int | None = None,
                corrections: Corrections | None = None) -> Plan:
    """The plan for a preset / config.json / config on `hardware`. Raises UsageError on bad input.

    tp, sp: fixed AutoTP / Ulysses degrees; sp=None searches: sp 1 first, then the smallest sp that fits
    (`sequence_parallel_degrees`). tiled_mlp / tiled_loss: tiling the run does anyway (the planner may add it).
    pp: a fixed pipeline degree; pp=None (with sp=None and tp 1) searches too: only when nothing fits at pp 1, sp
    search included, the smallest pp that fits (`pipeline_parallel_degrees`). micro_batches: the pipeline's micro-
    batches a step (gradient accumulation); None: default_micro_batches(pp) for each degree. corrections: as
    make_plan's."""
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
        plan = make_plan(shape, hardware, workload, checkpointing, corrections=corrections)
        beside = "AutoTP" if tp > 1 else "a pipeline"
        plan.parallel_reason = fixed + (f"; no sequence-parallel search beside {beside}" if sp is None else "")
        return plan
    searched, plan = [], None
    for degree in sequence_parallel_degrees(shape, hardware, workload):
        plan = make_plan(shape, hardware, dataclasses.replace(workload, sp=degree), checkpointing,
                         corrections=corrections)
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
        plan = _pipeline_search(shape, hardware, workload, checkpointing, micro_batches, plan, corrections)
    return plan


def _pipeline_search(shape: ModelShape, hw: Hardware, workload: Workload, checkpointing: bool | None,
                     micro_batches: int | None, flat: Plan, corrections: Corrections | None = None) -> Plan:
    """The smallest pp that fits when nothing fits without a pipeline (`flat`, its sp search done): sp and pp do not
    combine, so each degree plans at sp 1, on ZeRO 0/1 without added tiling (nor LoRA: the runtime runs neither
    beside a pipeline). None fits: `flat`, the degrees tried recorded beside it."""
    searched, plan = [(1, flat.reason)], None
    for degree in pipeline_parallel_degrees(shape, hw, micro_batches):
        m = micro_batches if micro_batches is not None else default_micro_batches(degree)
        plan = make_plan(shape, hw, dataclasses.replace(workload, sp=1, pp=degree, micro_batches=m), checkpointing,
                         corrections=corrections)
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
                can_checkpoint: bool = True, trainable: int | None = None, probe=None) -> Plan:
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
        return with_speeds(plan, probe_for(plan.hardware, probe))  # the step time the run will be checked against
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
