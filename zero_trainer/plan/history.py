"""The planner learns from this machine's runs: `zero-trainer plan --history DIR`.

Every run writes OUTPUT_DIR/summary.json with what its plan predicted (plan.predicted_peak_bytes, plan.predicted_step_s)
beside what it measured (peak_mem_bytes, on CPU less rss_before_model_bytes; step_s). `read_history` collects those
pairs from every summary.json under a directory; `corrections` turns them into two scales the plan applies:

  - memory_scale = the largest measured / predicted peak over the runs. Memory errors cost unequally: predicting too
    little ends a run out of memory, predicting too much only picks a heavier rung than needed. So the correction is
    the one that puts every run of the history at or above what it actually used ("never below"). A median would leave
    half of them under-predicted, a mean about as many. When every run used less than predicted the scale is below 1,
    and the run that came closest is then predicted exactly (SAFETY_MARGIN is still kept free on top).
  - speed_scale = the median measured / predicted step time. A step-time error costs the same either way (a wrong
    time-to-tokens, a wrong ranking only when rungs differ by less than it), so the correction is the typical ratio,
    which one slow outlier (a busy machine, a first compile) does not move.

A scale no run informs is 1.0. Both multiply the planner's own predictions, so they are as good as the history is
like the plan: the same machine (the CLI uses only the runs of the plan's kind of hardware, CPU or GPU) and a memory
and step-time model no newer than the runs' (a run records what its planner said then; re-run after changing it).

In the plan (choice.judged, with_speeds): each candidate's bytes above the process baseline (HOST_PROCESS_BYTES on a
CPU, DEVICE_RUNTIME_BYTES on a GPU: what a run's peak is measured against) become ceil(bytes x memory_scale), the
difference shown as its own `history` term of the device bytes (and, on a CPU-only machine, in the node's RAM) before
the fit test; each step time's seconds and terms are multiplied by speed_scale. With no corrections the plan is as
the model alone predicts it.
"""

import dataclasses
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from ..hardware import Hardware
from .memory import DEVICE_RUNTIME_BYTES, HOST_PROCESS_BYTES, Candidate
from .shapes import Workload, zero_ranks
from .speed import StepTime


@dataclass(frozen=True)
class Observation:
    """One run's prediction beside its measurement (None where the run did not record one)."""
    run: str  # the run's output directory
    rung: str | None
    activation_checkpointing: bool
    cpu_only: bool  # the plan's hardware: measured peaks are RSS above the process on CPU, device bytes on a GPU
    predicted_peak_bytes: int | None
    measured_peak_bytes: int | None
    predicted_step_s: float | None
    measured_step_s: float | None

    @property
    def memory_ratio(self) -> float | None:
        """measured / predicted peak bytes."""
        if self.predicted_peak_bytes and self.measured_peak_bytes:
            return self.measured_peak_bytes / self.predicted_peak_bytes
        return None

    @property
    def speed_ratio(self) -> float | None:
        """measured / predicted seconds a step."""
        if self.predicted_step_s and self.measured_step_s:
            return self.measured_step_s / self.predicted_step_s
        return None


class History(list):
    """read_history's answer: the Observations, and `skipped`, (path, why) of each summary.json left out."""

    def __init__(self, observations=(), skipped=()):
        super().__init__(observations)
        self.skipped = list(skipped)


def read_history(directory) -> History:
    """Every summary.json under `directory` (recursively, in path order) as an Observation; a file that is not JSON,
    has no plan, or pairs no prediction with a measurement is skipped and counted (`.skipped`)."""
    found, skipped = [], []
    for path in sorted(Path(directory).rglob("summary.json")):
        try:
            found.append(observation(json.loads(path.read_text()), str(path.parent)))
        except (OSError, ValueError) as err:  # json.JSONDecodeError is a ValueError
            skipped.append((str(path), str(err).splitlines()[0] if str(err) else type(err).__name__))
    return History(found, skipped)


def observation(summary: dict, run: str) -> Observation:
    """One summary.json's pair(s); ValueError when it is not a run's summary or pairs nothing."""
    plan = summary.get("plan") if isinstance(summary, dict) else None
    if not isinstance(plan, dict):
        raise ValueError("no plan in it (not a run's summary.json)")
    cpu_only = plan.get("cpu_only")
    if cpu_only is None and isinstance(plan.get("probe"), dict):  # summaries written before plan.cpu_only
        cpu_only = plan["probe"].get("device") == "cpu"
    if cpu_only is None:
        raise ValueError("it does not say whether the run was on CPU or GPU (no plan.cpu_only or plan.probe)")
    peak, before = _number(summary.get("peak_mem_bytes")), _number(summary.get("rss_before_model_bytes"))
    measured = peak if not cpu_only else _number(peak - before) if peak is not None and before is not None else None
    obs = Observation(run, plan.get("rung"), bool(plan.get("activation_checkpointing")), bool(cpu_only),
                      _number(plan.get("predicted_peak_bytes")), measured, _number(plan.get("predicted_step_s")),
                      _number(summary.get("step_s")))
    if obs.memory_ratio is None and obs.speed_ratio is None:
        raise ValueError("no predicted and measured peak, nor step time, to compare (an unfinished or failed run?)")
    return obs


def _number(value) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    return value if ok else None


@dataclass(frozen=True)
class Row:
    """One history run before and after the corrections."""
    run: str
    rung: str | None
    activation_checkpointing: bool
    predicted_peak_bytes: int | None
    measured_peak_bytes: int | None
    corrected_peak_bytes: int | None
    predicted_step_s: float | None
    measured_step_s: float | None
    corrected_step_s: float | None

    def error(self, kind: str, after: bool) -> float | None:
        """|predicted / measured - 1| of "memory" or "speed", before or after correction (None: not measured)."""
        measured = self.measured_peak_bytes if kind == "memory" else self.measured_step_s
        if kind == "memory":
            predicted = self.corrected_peak_bytes if after else self.predicted_peak_bytes
        else:
            predicted = self.corrected_step_s if after else self.predicted_step_s
        return abs(predicted / measured - 1) if predicted and measured else None


@dataclass(frozen=True)
class Corrections:
    memory_scale: float = 1.0  # max measured / predicted peak (see the module docstring)
    speed_scale: float = 1.0  # median measured / predicted step time
    memory_runs: int = 0  # runs that informed each
    speed_runs: int = 0
    rows: tuple = ()  # Row per run, before and after

    def peak_bytes(self, predicted: int) -> int:
        """A prediction of bytes above the process baseline, corrected (rounded up: never below)."""
        return predicted if self.memory_scale == 1.0 else math.ceil(predicted * self.memory_scale)

    def errors(self, kind: str) -> dict:
        """Median and worst |predicted / measured - 1| of "memory" or "speed" over the runs, before and after."""
        out = {}
        for when, after in (("before", False), ("after", True)):
            errs = [e for r in self.rows if (e := r.error(kind, after)) is not None]
            out[when] = {"median": statistics.median(errs), "worst": max(errs)} if errs else None
        return out

    def to_json(self) -> dict:
        return {"memory_scale": round(self.memory_scale, 6), "memory_runs": self.memory_runs,
                "speed_scale": round(self.speed_scale, 6), "speed_runs": self.speed_runs,
                "errors": {k: {w: {m: round(v, 6) for m, v in e.items()} if e else None
                               for w, e in self.errors(k).items()} for k in ("memory", "speed")},
                "runs": [dataclasses.asdict(r) for r in self.rows]}


def corrections(observations) -> Corrections:
    """memory_scale: the max of measured / predicted peak, so that every run's corrected prediction is at least what
    it used; speed_scale: the median of measured / predicted step time. 1.0 where no run informs one."""
    memory = [o.memory_ratio for o in observations if o.memory_ratio is not None]
    speed = [o.speed_ratio for o in observations if o.speed_ratio is not None]
    scales = Corrections(max(memory, default=1.0), statistics.median(speed) if speed else 1.0, len(memory), len(speed))
    rows = tuple(Row(o.run, o.rung, o.activation_checkpointing, o.predicted_peak_bytes, o.measured_peak_bytes,
                     scales.peak_bytes(o.predicted_peak_bytes) if o.memory_ratio is not None else None,
                     o.predicted_step_s, o.measured_step_s,
                     o.predicted_step_s * scales.speed_scale if o.speed_ratio is not None else None)
                 for o in observations)
    return dataclasses.replace(scales, rows=rows)


# ---------------------------------------------------------------------------------------------------------------
# applied to a plan


def corrected(c: Candidate, corr: Corrections | None, hw: Hardware, workload: Workload) -> Candidate:
    """`c` with memory_scale applied to its bytes above the process baseline: a `history` device term (each pipeline
    stage's too), and on a CPU-only machine the node's RAM, which is its ranks' device bytes. corr None: `c` itself."""
    if corr is None:
        return c
    base = HOST_PROCESS_BYTES if hw.cpu_only else DEVICE_RUNTIME_BYTES
    stages = []
    for st in c.stages:
        more = corr.peak_bytes(st["predicted_peak_bytes"]) - st["predicted_peak_bytes"]
        stages.append({**st, "device_bytes": st["device_bytes"] + more,
                       "predicted_peak_bytes": st["predicted_peak_bytes"] + more})
    extra = corr.peak_bytes(c.device_bytes - base) - (c.device_bytes - base)  # the heaviest stage's, in a pipeline
    cpu_bytes = c.cpu_bytes
    if hw.cpu_only and stages:  # the fullest node's ranks, of whichever stages (pipeline_estimate)
        N, gpus = zero_ranks(hw, workload), hw.gpus_per_node
        ranks = [stages[r // N]["device_bytes"] for r in range(hw.world_size)]
        cpu_bytes = max(sum(ranks[n * gpus:(n + 1) * gpus]) for n in range(hw.nodes))
    elif hw.cpu_only:
        cpu_bytes += hw.gpus_per_node * extra
    return dataclasses.replace(c, device={**c.device, "history": extra}, cpu_bytes=cpu_bytes, stages=stages)


def corrected_speed(speed: StepTime, corr: Corrections | None) -> StepTime:
    """A step time with its seconds and every term multiplied by speed_scale (corr None: `speed` itself)."""
    if corr is None or corr.speed_scale == 1.0:
        return speed
    s = corr.speed_scale
    return StepTime(speed.seconds * s, {k: v * s for k, v in speed.terms.items()}, speed.tokens)
