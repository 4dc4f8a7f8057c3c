"""The thin trainer: recipe -> data -> ds config -> engine -> loop -> summary. One process per rank."""

import math
import os
import signal
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from . import checkpoint, metrics, parallelize
from .data import BatchSampler, eval_indices
from .ds_config import load_universal_checkpoint, zero_stage
from .hardware import local_world_size
from .model import build_model, next_token_loss
from .ops import clear_stale_locks, release_shm_buffer
from .plan import active_params, expert_parallel_split
from .recipe import Recipe
from .resolve import resolve


def data_line(d, recipe: Recipe) -> str:
    """What the run reads (data.PreparedData), printed at start: examples kept and left out, rows, packing, what is
    learned."""
    rows = f"{len(d.train):,} train + {len(d.eval):,} eval rows of {recipe.data.seq_len}"
    layout = "packed, each document attending only to itself" if recipe.data.packing else "one document a row, padded"
    if recipe.data.format == "chat":
        learned = "every token" if recipe.data.train_on_prompt else "assistant tokens only"
        return (f"data: {d.examples:,} conversations ({d.dropped:,} left out: longer than data.seq_len "
                f"{recipe.data.seq_len}), {d.num_tokens:,} tokens in {rows}, {layout}; loss on {learned}")
    return f"data: {d.examples:,} documents, {d.num_tokens:,} tokens in {rows}, {layout}"


def set_cpu_threads() -> None:
    """N ranks on C cores: give each rank C/N threads, else they oversubscribe and everything crawls."""
    import deepspeed

    if deepspeed.get_accelerator().device_name() != "cpu":
        return
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // (local_world_size() or 1)))


def build_initialized_model(model_cfg, ds_config: dict, seed: int, initialize: bool = True) -> torch.nn.Module:
    """The model with the same initial weights at every ZeRO stage and world size.

    At stage 3 it is built under deepspeed.zero.Init, so each rank allocates only its shard; weights are then
    initialised module by module, gathered, with rank 0 deciding (transformers' initialize_weights_zero3 does
    the same). Other stages run the identical sequence on full tensors, so losses match stage for stage.
    initialize=False: no weights are written (pretrained ones, or a checkpoint's, will fill them).
    """
    import deepspeed
    import deepspeed.comm as dist
    from transformers.initialization import no_init_weights

    stage3 = zero_stage(ds_config) == 3
    # Weights to be loaded (initialize=False) build with the heap trimmed as zero.Init frees each whole tensor: the
    # load's peak is then the partitions, not their garbage. (A random init keeps the behaviour the planner's
    # calibration rows were measured with: plan.init_retained_bytes.)
    trimmed = metrics.heap_trimmed_per_parameter() if stage3 and not initialize else nullcontext()
    with no_init_weights(), trimmed, (deepspeed.zero.Init(config_dict_or_path=ds_config) if stage3 else nullcontext()):
        model = build_model(model_cfg)
    model.tie_weights()  # no_init_weights skips tying too (transformers' _from_config re-ties the same way)
    if not initialize:
        return model
    torch.manual_seed(seed)
    decides = dist.get_rank() == 0 or not stage3
    with torch.no_grad():
        for module in model.modules():
            params = list(module.parameters(recurse=False))
            with deepspeed.zero.GatheredParameters(params, modifier_rank=0, enabled=stage3 and bool(params)):
                if decides:
                    model._init_weights(module)
    return model


class Run:
    """What the loop needs, built once: engine, data, sampler, the resolved settings, and where to start."""

    def __init__(self, recipe: Recipe, resume: bool = False):
        import deepspeed
        import deepspeed.comm as dist

        set_cpu_threads()
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:
            clear_stale_locks()  # DeepSpeed JIT-builds ops at start-up; a dead build's lock would hang it
        deepspeed.init_distributed()
        self.recipe, train = recipe, recipe.train
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        dist.barrier()  # every rank has mapped the others' shm all-reduce workspace: the names can go
        release_shm_buffer(self.rank)
        self.out = Path(recipe.output_dir)
        self.rss_before_model = metrics.current_rss_bytes()

        r = resolve(recipe, self.world_size, resume)  # the same resolution the launcher checked
        self.recipe = recipe = r.recipe  # with the parallel degrees and tiling the plan added
        self.resolved, self.model_cfg, self.data, self.params = r, r.model_cfg, r.data, r.params
        self.ds_name, self.ds_config, self.zero_stage = r.ds_name, r.ds_config, r.zero_stage
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            print(r.plan.line(), flush=True)
            print(data_line(r.data, recipe), flush=True)
        universal_dir = None
        if r.universal:
            if self.rank == 0:
                from .pipeline import alias_universal

                alias_universal(checkpoint.to_universal(r.resume_from), self.model_cfg)  # pipeline names or not
            dist.barrier()
            universal_dir = r.resume_from.parent / "universal" / r.resume_from.name
            self.ds_config = load_universal_checkpoint(self.ds_config)

        model = self.load_model(r)
        self.trainable = None
        if recipe.lora.enabled:  # after the weights are in, before DeepSpeed: it sees only the adapters as trainable
            from .lora import add_adapters, trainable_count

            model = add_adapters(model, recipe.lora, train.seed, base_path=(r.pretrained or {}).get("path"))
            self.trainable = trainable_count(model)
            if self.rank == 0:
                print(f"lora: r={recipe.lora.r}, alpha={recipe.lora.alpha:g} on {recipe.lora.target_modules}: "
                      f"{self.trainable:,} of {self.params:,} parameters train "
                      f"({100 * self.trainable / self.params:.2f}%)", flush=True)
        self.pipeline = recipe.parallel.pp > 1
        if self.pipeline:  # the stages adopt the built model's weights; each layer checkpoints itself
            from .pipeline import pipeline_model

            model = pipeline_model(model, recipe.parallel.pp, r.activation_checkpointing)
        elif r.activation_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        self.layout = parallelize.Layout.of(recipe, self.rank, self.world_size)
        self.mpu = parallelize.apply(model, recipe, train.micro_batch)  # SP groups and attention, tiling
        self.grad_scale = parallelize.gradient_scale(self.layout, r.zero_stage)
        parameters = [p for p in model.parameters() if p.requires_grad]
        model, parameters = self.add_experts(model, parameters)
        self.engine, *_ = deepspeed.initialize(model=model, config=self.ds_config, mpu=self.mpu,
                                               model_parameters=parameters)
        self.device = self.engine.device
        # ranks of one TP/SP group read the same batch: the sampler deals by data-parallel rank
        self.sampler = BatchSampler(len(self.data.train), train.micro_batch, self.layout.dp_rank, self.layout.dp,
                                    train.seed)
        self.tokens_per_step = train.micro_batch * train.grad_accum * self.layout.dp * recipe.data.seq_len
        # Progress: everything a resumed run needs to continue as if it never stopped.
        self.state = {"step": 0, "position": 0, "losses": [], "tokens": 0, "train_s": 0.0}
        self.resumed_from, self.eval_loss = r.resume_from, None
        if r.resume_from is not None:
            saved = checkpoint.load(self.engine, r.resume_from, universal_dir)
            self.state = {k: saved[k] for k in self.state}
        self.saved_step = self.state["step"] if r.resume_from is not None else None
        self.step_times = []  # this process's steps, for the measured step time beside the plan's

    def load_model(self, r) -> torch.nn.Module:
        """The model with its first weights: the seeded init, or model.pretrained's, each rank reading only its own
        partitions at ZeRO-3 (pretrained.load_pretrained). A resume writes neither: the checkpoint fills every weight,
        and the pretrained files are not read again. Records the load's time, bytes read and peak RSS."""
        self.pretrained, self.load_bytes, t = r.pretrained, 0, time.time()
        metrics.reset_peak_rss()  # this run's load, not what the process held before (tests run several a process)
        model = build_initialized_model(self.model_cfg, self.ds_config, self.recipe.train.seed,
                                        initialize=r.pretrained is None)
        if r.pretrained is not None and r.resume_from is None:
            from .pretrained import load_pretrained

            self.load_bytes = load_pretrained(model, r.pretrained["path"])["bytes_read"]
        self.load_s, self.load_peak = time.time() - t, metrics.peak_rss_bytes()  # before the engine allocates
        return model

    # --- mixture of experts: expert parallelism, and the load-balancing loss for metrics.csv ---------------------

    def add_experts(self, model, parameters):
        """Experts split over parallel.ep ranks (deepspeed.moe, with its optimizer groups); a MoE's aux loss recorded
        per training forward."""
        self.moe, self.aux_losses = bool(getattr(self.model_cfg, "is_moe", False)), []
        if self.moe:
            model.register_forward_hook(self._record_aux_loss)
        if self.recipe.parallel.ep > 1:
            from .moe import expert_parallel, optimizer_groups

            model = expert_parallel(model, self.recipe.parallel.ep)
            parameters = optimizer_groups(model)
        return model, parameters

    def _record_aux_loss(self, module, _inputs, output):
        if module.training and getattr(output, "aux_loss", None) is not None:
            self.aux_losses.append(output.aux_loss.detach().item())

    def take_aux_loss(self) -> float:
        """This rank's mean load-balancing loss over the forwards since the last call (0 for a dense model)."""
        mean = sum(self.aux_losses) / len(self.aux_losses) if self.aux_losses else 0.0
        self.aux_losses.clear()
        return mean

    def checkpoint_state(self) -> dict:
        return {**self.state, "world_size": self.world_size, "zero_stage": self.zero_stage,
                "ds_config_name": self.ds_name, "recipe": self.recipe.to_dict(),
                "model_shape": checkpoint.model_shape(self.model_cfg), "model_config": self.model_cfg.to_dict(),
                "tokenizer_dir": self.data.tokenizer_dir, "params": self.params, "pretrained": self.pretrained}

    def save(self) -> None:
        checkpoint.save(self.engine, self.out, self.checkpoint_state(), self.recipe.train.keep_last,
                        self.data.tokenizer)
        self.saved_step = self.state["step"]

    def next_batch(self) -> tuple:
        batch = self.batch("train", self.sampler.indices_at(self.state["position"]))
        self.state["position"] += self.sampler.samples_per_micro_step
        return batch

    def batch(self, split: str, indices) -> tuple:
        """(input ids, positions, targets) of rows `indices` of "train" or "eval" (data.PreparedData.batch)."""
        return tuple(torch.from_numpy(a).to(self.device) for a in self.data.batch(split, indices))

    def items_per_micro_batch(self, batches: list) -> torch.Tensor:
        """num_items_in_batch for this step's micro-batches: the targets of the whole step over every rank (a
        data-parallel batch is read by tp·sp ranks, so counted once), per micro-batch per rank
        (parallelize.items_per_micro_batch)."""
        local = sum(int((targets != -100).sum()) for _, _, targets in batches)
        total = self.reduce_over_ranks([float(local)])[0] / self.recipe.parallel.model_parallel
        items = parallelize.items_per_micro_batch(total, self.layout, self.recipe.train.grad_accum)
        return torch.tensor(max(items, 1e-9), dtype=torch.float32, device=self.device)

    def reduce_over_ranks(self, values: list[float], op: str = "sum") -> list[float]:
        import deepspeed.comm as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return t.tolist()

    def per_rank(self, value: float) -> list[float]:
        """Every rank's `value`, in rank order."""
        values = [0.0] * self.world_size
        values[self.rank] = value
        return [int(v) if float(v).is_integer() else v for v in self.reduce_over_ranks(values)]

    def mean_over_ranks(self, value: float) -> float:
        return self.reduce_over_ranks([value])[0] / self.world_size

    def max_over_ranks(self, value: int) -> int:
        return int(self.reduce_over_ranks([value], op="max")[0])


class StopRequest:
    """SIGTERM/SIGINT (a preemption, or the launcher shutting down) asks for a checkpoint, not a crash.

    The flag is shared through the per-step all-reduce, so a signal to any single rank stops all of them at
    the same step.
    """

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        self.requested = True


def train_step(run: Run) -> float:
    """One optimizer step of grad_accum micro-batches; returns this rank's mean micro-batch loss (with SP, sp × its
    slice's share: the mean over ranks, which the loop logs, is the whole sequence's loss)."""
    engine, losses = run.engine, []
    batches = [run.next_batch() for _ in range(run.recipe.train.grad_accum)]  # whole sequences, this dp rank's
    items = run.items_per_micro_batch(batches)
    if run.pipeline:  # DeepSpeed's 1F1B schedule runs every micro-batch; the loss is the data-parallel mean
        micro = iter([((ids, positions), (targets, items)) for ids, positions, targets in batches])
        return float(engine.train_batch(micro))
    for batch in batches:
        ids, positions, targets = parallelize.sequence_slice(batch, run.layout)
        loss = next_token_loss(engine, ids, targets, positions, items).loss
        engine.backward(loss * run.grad_scale if run.grad_scale != 1 else loss)
        engine.step()
        losses.append(loss.detach().float().item())
    return sum(losses) / len(losses)


@torch.no_grad()
def evaluate(run: Run) -> float:
    """Loss per target over held-out rows (each batch's mean weighted by its targets); each data-parallel group
    reads its own rows, every rank runs the same forwards (whole sequences: Ulysses steps aside in eval mode)."""
    if run.pipeline:
        return evaluate_pipeline(run)
    train, layout = run.recipe.train, run.layout
    weighted = count = 0.0
    run.engine.eval()
    for b in range(train.eval_batches):
        ids, positions, targets = run.batch("eval", eval_indices(b, train.micro_batch, layout.dp_rank, layout.dp,
                                                                 len(run.data.eval)))
        n = float((targets != -100).sum())
        weighted += n * next_token_loss(run.engine, ids, targets, positions).loss.float().item() if n else 0.0
        count += n
    run.engine.train()
    weighted, count = run.reduce_over_ranks([weighted, count])
    return weighted / max(count, 1.0)


def evaluate_pipeline(run: Run) -> float:
    """evaluate() through the pipeline (eval_batch, one micro-batch at a time; it averages over data-parallel
    ranks): each batch's loss divided by its targets over all dp ranks / dp, so that mean is the loss per target."""
    train, layout = run.recipe.train, run.layout
    weighted = count = 0.0
    for b in range(train.eval_batches):
        ids, positions, targets = run.batch("eval", eval_indices(b, train.micro_batch, layout.dp_rank, layout.dp,
                                                                 len(run.data.eval)))
        n = run.reduce_over_ranks([float((targets != -100).sum())])[0] / run.recipe.parallel.model_parallel
        if not n:
            continue
        items = torch.tensor(n / layout.dp, dtype=torch.float32, device=run.device)
        loss = run.engine.eval_batch(iter([((ids, positions), (targets, items))]), num_micro_batches=1)
        weighted, count = weighted + n * float(loss), count + n
    return weighted / max(count, 1.0)


@torch.no_grad()
def sample_text(run: Run, num_tokens: int) -> str:
    """Greedy continuation of a held-out prompt; all ranks run it (ZeRO-3 gathers weights in forward)."""
    prompt = run.batch("eval", [0])[0][:, :16]
    run.engine.eval()
    ids = prompt
    for _ in range(num_tokens):
        logits = run.engine(input_ids=ids[:, -run.recipe.data.seq_len:]).logits
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    run.engine.train()
    tok = run.data.tokenizer
    return tok.decode(prompt[0].tolist()) + " ⟶ " + tok.decode(ids[0, prompt.shape[1]:].tolist())


def train_until(run: Run, last_step: int, stop: StopRequest, log, bar) -> bool:
    """The loop: steps up to `last_step`. Returns True when a signal stopped it (after a checkpoint)."""
    train, state = run.recipe.train, run.state
    for step in range(state["step"] + 1, last_step + 1):
        lr = run.engine.get_lr()[0]
        t = time.time()
        loss_sum, stops, aux_sum = run.reduce_over_ranks([train_step(run), float(stop.requested), run.take_aux_loss()])
        loss, step_s = loss_sum / run.world_size, time.time() - t
        run.step_times.append(step_s)
        state.update(step=step, tokens=state["tokens"] + run.tokens_per_step, train_s=state["train_s"] + step_s)
        state["losses"].append(loss)
        if train.eval_every and step % train.eval_every == 0 and step < train.max_steps:
            run.eval_loss = evaluate(run)
            if log is not None:
                log.eval(step, run.eval_loss)
        if log is not None and (step % train.log_every == 0 or step == train.max_steps):
            row = {"step": step, "loss": loss, "lr": lr, "grad_norm": run.engine.get_global_grad_norm(),
                   "tokens_per_s": run.tokens_per_step / step_s, "step_s": step_s,
                   "mem_bytes": metrics.device_memory_bytes(), "eval_loss": run.eval_loss, "time": time.time(),
                   "aux_loss": aux_sum / run.world_size if run.moe else None}
            log.write(row)
            bar.set_postfix(metrics.bar_fields(row), refresh=False)
        bar.update(1)
        if stops or (train.save_every and step % train.save_every == 0):
            run.save()
        if stops:
            return True
    return False


def release_globals(run: Run) -> None:
    """What a run leaves in process-wide state, put back so a later run in the same process starts clean: Ulysses'
    attention function, and the model-parallel unit DeepSpeed keeps in deepspeed.utils.groups (a pipeline's grid
    there makes the next plain engine ask it for ranks)."""
    from deepspeed.utils import groups

    parallelize.restore_attention(run.mpu, run.engine.module)
    groups.mpu = None


def run_training(recipe: Recipe, resume: bool = False) -> dict | None:
    """Train to train.max_steps; returns the summary, or None when stopped by a signal (after a checkpoint)."""
    t0 = time.time()
    run = Run(recipe, resume)
    stop = StopRequest()
    train, state, is_main = recipe.train, run.state, run.rank == 0
    resume_step = state["step"] if resume else None
    log = metrics.MetricsLog(run.out / "metrics.csv", resume_step, metrics.Reporters(
        train.reporters, run.out, resume_step, recipe.to_dict())) if is_main else None
    bar = metrics.progress_bar(train.max_steps, enabled=is_main, initial=state["step"])
    stop_at = min(train.stop_at_step or train.max_steps, train.max_steps)
    if train_until(run, stop_at, stop, log, bar) or stop_at < train.max_steps:
        bar.close()
        if run.saved_step != state["step"]:
            run.save()
        release_globals(run)
        if is_main:
            log.close()
            print(f"stopped at step {state['step']} of {train.max_steps}: checkpoint saved in "
                  f"{run.out / 'checkpoints'}; continue with --resume", flush=True)
        return None
    bar.close()
    if train.save_every and run.saved_step != state["step"]:
        run.save()  # the final step is always resumable and exportable
    eval_loss = evaluate(run)
    if log is not None:
        log.eval(state["step"], eval_loss)
        log.close()
    # the pipeline engine runs fixed shapes: no generation of a growing prompt through it
    sample = sample_text(run, train.sample_tokens) if train.sample_tokens and not run.pipeline else ""
    peak = run.max_over_ranks(metrics.peak_memory_bytes())
    release_globals(run)
    losses = state["losses"]
    summary = {
        "params": run.params, "active_params": active_params(run.resolved.plan.model),
        "world_size": run.world_size, "ds_config_name": run.ds_name,
        "ds_config": run.ds_config, "precision": train.precision, "zero_stage": run.zero_stage,
        "activation_checkpointing": run.resolved.activation_checkpointing, "plan": run.resolved.plan.summary(),
        "tensor_parallel": run.layout.tp, "sequence_parallel": run.layout.sp,
        "pipeline_parallel": recipe.parallel.pp,
        "model": recipe.model_source, "steps": len(losses), "tokens": state["tokens"],
        "first_loss": losses[0], "final_loss": losses[-1], "eval_loss": eval_loss,
        "eval_perplexity": math.exp(min(eval_loss, 50.0)),
        "tokens_per_s": state["tokens"] / state["train_s"],
        # the median step after the first (warm-up, JIT builds, allocator growth), beside plan.predicted_step_s
        "step_s": statistics.median(run.step_times[1:] or run.step_times) if run.step_times else None,
        "peak_mem_bytes": peak, "rss_before_model_bytes": run.max_over_ranks(run.rss_before_model),
        "load_peak_bytes": run.max_over_ranks(run.load_peak), "load_s": run.load_s, "pretrained": run.pretrained,
        "load_bytes_per_rank": run.per_rank(run.load_bytes), "trainable_params": run.trainable or run.params,
        "data": {"format": recipe.data.format, "examples": run.data.examples, "dropped": run.data.dropped,
                 "train_rows": len(run.data.train), "eval_rows": len(run.data.eval)},
        "wall_s": time.time() - t0, "losses": losses, "sample": sample,
        "resumed_from": str(run.resumed_from) if run.resumed_from else None, "recipe": run.recipe.to_dict(),
    }
    if run.moe:  # the planner's per-rank expert numbers at this ep
        plan = run.resolved.plan
        summary["experts"] = expert_parallel_split(plan.model, recipe.parallel.ep, run.world_size, plan.workload)
    if is_main:
        metrics.write_summary(run.out / "summary.json", summary)
        print(f"sample: {sample}\n"
              f"done: {len(losses)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}, eval loss {eval_loss:.4f} "
              f"(ppl {summary['eval_perplexity']:.1f}), {summary['tokens_per_s']:.0f} tokens/s, "
              f"peak {peak / 2**20:.0f} MiB/rank -> {run.out}", flush=True)
    return summary
