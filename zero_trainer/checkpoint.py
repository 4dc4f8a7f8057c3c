"""Checkpoints that never lose a step.

Layout: OUTPUT_DIR/checkpoints/step_00000010/ holds DeepSpeed's own files (engine.save_checkpoint), our
trainer state (`zero_trainer_state.json`: step, data position, losses so far, recipe, model config, RNG
states in `rng_rank{R}.pt`) and, last of all, `COMPLETE`. DeepSpeed writes its `latest` file from rank 0
whatever the other ranks did, so we do not trust it: `COMPLETE` is written by rank 0 only after a barrier
that every rank reaches once its shards are on disk. A checkpoint without it is never resumed from.

Resuming at another world size or ZeRO stage goes through DeepSpeed's universal checkpoint
(deepspeed.checkpoint.ds_to_universal, then `"checkpoint": {"load_universal": true}`), converted
automatically by rank 0 into checkpoints/universal/<tag>.
"""

import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from .errors import UsageError
from .recipe import Recipe

STATE_FILE = "zero_trainer_state.json"
COMPLETE = "COMPLETE"
TAG_PREFIX = "step_"
# ds_to_universal refuses checkpoints whose client state lacks this (see shared/DEEPSPEED_NOTES.md).
UNIVERSAL_INFO = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}
# Model-config fields that must agree for weights to load: a different shape or vocab is a different model.
SHAPE_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "tie_word_embeddings")
MOE_SHAPE_FIELDS = ("num_local_experts", "num_experts_per_tok")  # recorded for MoE models only


def checkpoint_root(output_dir) -> Path:
    return Path(output_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def is_complete(ckpt: Path) -> bool:
    return (ckpt / COMPLETE).is_file() and (ckpt / STATE_FILE).is_file()


def step_dirs(root: Path) -> list[Path]:
    """Every step_* directory, complete or not, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(TAG_PREFIX))


def newest_complete(root: Path) -> Path | None:
    complete = [p for p in step_dirs(root) if is_complete(p)]
    return complete[-1] if complete else None


def find_checkpoint(path, flag: str) -> Path:
    """`path` is OUTPUT_DIR/checkpoints (the newest complete one inside) or one checkpoint directory."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"checkpoint directory {path} does not exist", flag,
                         "give OUTPUT_DIR/checkpoints or one step_* directory inside it")
    if is_complete(path):
        return path
    if (path / "checkpoints").is_dir():  # an output dir was given
        path = path / "checkpoints"
    found = newest_complete(path)
    if found is None:
        incomplete = [p.name for p in step_dirs(path)]
        detail = f" (incomplete: {', '.join(incomplete)})" if incomplete else ""
        raise UsageError(f"no complete checkpoint in {path}{detail}", flag,
                         "point at a directory holding a checkpoint with a COMPLETE marker")
    return found


def read_state(ckpt: Path) -> dict:
    return json.loads((ckpt / STATE_FILE).read_text())


def model_shape(model_cfg) -> dict:
    d = model_cfg.to_dict()
    return {k: d.get(k) for k in SHAPE_FIELDS + (MOE_SHAPE_FIELDS if d.get("num_local_experts") else ())}


def check_resume(recipe: Recipe, model_cfg, resume: bool, flag: str = "--resume") -> Path | None:
    """Before launching: the checkpoint to resume from, or an error. Also refuses to start a fresh run over
    existing checkpoints (that would mix two runs' steps and prune the old one's)."""
    root = checkpoint_root(recipe.output_dir)
    if not resume:
        if newest_complete(root) is not None:
            raise UsageError(f"output dir {recipe.output_dir} already holds checkpoints", "output_dir",
                             "pass --resume to continue that run, or choose another --output-dir")
        return None
    ckpt = find_checkpoint(root, flag)
    saved, now = read_state(ckpt)["model_shape"], model_shape(model_cfg)
    diff = [f"{k} {saved.get(k)} -> {now.get(k)}" for k in SHAPE_FIELDS + MOE_SHAPE_FIELDS
            if saved.get(k) != now.get(k)]
    if diff:
        raise UsageError(f"cannot resume {ckpt.name} into a different model ({', '.join(diff)})", flag,
                         "resume with the recipe the checkpoint was trained with, or start a new --output-dir")
    return ckpt


def _source(model: dict, pretrained: dict | None) -> tuple[str, str]:
    """(what identifies a run's starting weights, how to say it): a preset by name, a config.json's random init by
    kind (check_resume compares its shape), a pretrained checkpoint by its fingerprint (pretrained.fingerprint)."""
    if model.get("pretrained"):
        fp = (pretrained or {}).get("fingerprint")
        return f"pretrained:{fp}", f"model.pretrained {model['pretrained']} (checkpoint {fp})"
    if model.get("config"):
        return "config", f"a random init of model.config {model['config']}"
    return f"preset:{model.get('preset')}", f"a random init of model.preset {model.get('preset')}"


def check_same_source(ckpt: Path, recipe: Recipe, pretrained: dict | None, flag: str = "--resume") -> None:
    """A resume continues the run it names: refuse a checkpoint whose run started from other weights (another
    pretrained checkpoint, or a random init where this recipe loads one). The pretrained weights are never read
    again on resume: the checkpoint holds what training made of them."""
    state = read_state(ckpt)
    saved_id, saved = _source(state.get("recipe", {}).get("model", {}), state.get("pretrained"))
    now_id, now = _source({k: getattr(recipe.model, k) for k in ("preset", "config", "pretrained")}, pretrained)
    if saved_id != now_id:
        raise UsageError(f"cannot resume {ckpt.name}: its run started from {saved}, this recipe from {now}", flag,
                         "resume with the model the checkpoint was trained from, or start a new --output-dir")
    saved_lora = _lora(state.get("recipe", {}).get("lora"))
    now_lora = _lora(dataclasses.asdict(recipe.lora))
    if saved_lora != now_lora:
        raise UsageError(f"cannot resume {ckpt.name}: its run trained {saved_lora}, this recipe {now_lora} (the "
                         "checkpoint holds other parameters)", "lora",
                         "resume with the checkpoint's lora section, or start a new --output-dir")


def _lora(section: dict | None) -> str:
    """How a run's trainable parameters were made: every weight, or adapters of a given rank on given modules (alpha
    and dropout scale them, so a resume may change those)."""
    if not section or not section.get("r"):
        return "every weight (no LoRA)"
    return f"LoRA r={section['r']} on {section['target_modules']}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, output_dir, state: dict, keep_last: int, tokenizer=None) -> Path:
    """Every rank calls this. Returns the checkpoint directory once it is complete on every rank. `tokenizer` (the
    run's) is saved beside the weights for export; without it, state["tokenizer_dir"] is copied."""
    import deepspeed.comm as dist

    root, tag, rank = checkpoint_root(output_dir), tag_for(state["step"]), dist.get_rank()
    ckpt = root / tag
    if rank == 0 and (ckpt / COMPLETE).exists():
        (ckpt / COMPLETE).unlink()  # re-saving a step (after a crash mid-save): not complete until done again
    dist.barrier()
    # DeepSpeed's MoE checkpoint reserves the universal key (and its universal conversion does not regroup experts)
    client_state = {} if getattr(engine, "has_moe_layers", False) else dict(UNIVERSAL_INFO)
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    torch.save(rng_state(), ckpt / f"rng_rank{rank}.pt")
    delay = float(os.environ.get("ZERO_TRAINER_TEST_SAVE_DELAY_S", 0))  # tests widen the crash window
    if delay:
        import time

        time.sleep(delay)
    dist.barrier()  # every rank's shards are on disk
    if rank == 0:
        # export ships it; saved rather than copied: a pretrained model's directory holds its weights too
        if tokenizer is not None:
            tokenizer.save_pretrained(ckpt / "tokenizer")
        else:
            shutil.copytree(state["tokenizer_dir"], ckpt / "tokenizer", dirs_exist_ok=True)
        _atomic_write(ckpt / STATE_FILE, json.dumps(state, indent=1, default=str))
        _atomic_write(ckpt / COMPLETE, tag + "\n")
        _atomic_write(root / "latest", tag)  # for DeepSpeed's own tools (zero_to_fp32 reads it)
        prune(root, keep_last)
    dist.barrier()
    return ckpt


def prune(root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints; drop older ones and stale incomplete ones."""
    newest = newest_complete(root)
    keep = {p for p in step_dirs(root) if is_complete(p)}
    keep = set(sorted(keep)[-keep_last:])
    for path in step_dirs(root):
        if path not in keep and path.name < newest.name:
            shutil.rmtree(path, ignore_errors=True)
    universal = root / "universal"
    for path in step_dirs(universal):
        if not (root / path.name).exists():
            shutil.rmtree(path, ignore_errors=True)


def check_stage_change(ckpt: Path, stage: int, flag: str = "--resume") -> None:
    """DeepSpeed 0.19.8 converts between stages 1 and 2 (and world sizes at any stage), but its universal loader
    cannot cross ZeRO-3's checkpoint layout in either direction: state_dict_factory.check_ckpt_list finds no
    model-states file of the other layout and asserts. Say so before launching instead of after."""
    saved = read_state(ckpt)["zero_stage"]
    if saved != stage and 3 in (saved, stage):
        raise UsageError(f"DeepSpeed cannot resume a ZeRO-{saved} checkpoint at ZeRO-{stage} "
                         "(its universal loader does not cross the stage-3 layout)", flag,
                         f"resume at {'stage 3' if saved == 3 else 'stage 1 or 2'} (any world size), or "
                         "`zero-trainer export` the weights and start a new run from them")


def check_tensor_parallel_change(ckpt: Path, tp: int, world_size: int, flag: str = "--resume") -> None:
    """A tensor-parallel checkpoint holds each rank's shard of the projections (mp_rank_XX files), which only the
    same tp layout loads; DeepSpeed's universal conversion of AutoTP shards is not exercised here, so a resume that
    changes tp, or the world size of a tp run, is refused."""
    state = read_state(ckpt)
    saved = state["recipe"].get("parallel", {}).get("tp", 1)
    if saved != tp or (tp > 1 and state["world_size"] != world_size):
        raise UsageError(f"cannot resume {ckpt.name} (parallel.tp {saved}, {state['world_size']} ranks) at "
                         f"parallel.tp {tp} on {world_size} ranks: tensor-parallel shards reload only in the layout "
                         "that wrote them", flag,
                         f"resume with parallel.tp={saved} on {state['world_size']} ranks, or `zero-trainer export` "
                         "the weights and start a new run from them")


def saved_expert_parallel(state: dict) -> int:
    return int(state.get("recipe", {}).get("parallel", {}).get("ep", 1))


def check_expert_parallel_change(ckpt: Path, ep: int, world_size: int, flag: str = "--resume") -> None:
    """Expert-parallel checkpoints hold each rank's own experts (DeepSpeed's layer_L_expert_E files) and expert
    optimizer partitions; DeepSpeed's universal conversion does not regroup them. Resume at the same ep and world
    size, or refuse before launching."""
    state = read_state(ckpt)
    saved = saved_expert_parallel(state)
    if saved != ep:
        raise UsageError(f"cannot resume an expert-parallel checkpoint saved at parallel.ep={saved} with "
                         f"parallel.ep={ep}", flag, f"resume with parallel.ep={saved}, or `zero-trainer export` the "
                         "weights and start a new run from them")
    if ep > 1 and state["world_size"] != world_size:
        raise UsageError(f"cannot resume an expert-parallel (ep={ep}) checkpoint of {state['world_size']} ranks on "
                         f"{world_size}", flag, f"resume on {state['world_size']} ranks, or `zero-trainer export` "
                         "the weights and start a new run from them")


def saved_pipeline_parallel(state: dict) -> int:
    return (state.get("recipe") or {}).get("parallel", {}).get("pp", 1)


def needs_universal(state: dict, world_size: int, stage: int, pp: int = 1) -> bool:
    """Another world size, ZeRO stage or pipeline degree: DeepSpeed's universal checkpoint re-partitions (a pipeline's
    per-layer names are aliased to the model's, pipeline.alias_universal)."""
    return state["world_size"] != world_size or state["zero_stage"] != stage or saved_pipeline_parallel(state) != pp


def to_universal(ckpt: Path) -> Path:
    """Convert with DeepSpeed's ds_to_universal (rank 0 only); reuses an earlier conversion."""
    out = ckpt.parent / "universal" / ckpt.name
    if (out / COMPLETE).is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    run_ds_to_universal(ckpt, out)
    _atomic_write(out / COMPLETE, ckpt.name + "\n")
    _atomic_write(out.parent / "latest_universal", ckpt.name)
    return out


def run_ds_to_universal(ckpt: Path, out) -> None:
    """DeepSpeed's ds_to_universal of `ckpt` into `out`, in a subprocess; its last line as the error on failure."""
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt),
           "--output_folder", str(out), "--num_extract_workers", "1", "--num_merge_workers", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"ds_to_universal failed on {ckpt}: {tail[0]}")


def load(engine, ckpt: Path, universal_dir: Path | None) -> dict:
    """Every rank calls this after deepspeed.initialize. Returns the trainer state."""
    import deepspeed.comm as dist

    if universal_dir is not None:
        load_dir, tag = universal_dir.parent, universal_dir.name
    else:
        load_dir, tag = ckpt.parent, ckpt.name
    path, _ = engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt}")
    rng = ckpt / f"rng_rank{dist.get_rank()}.pt"
    if rng.is_file():  # absent when resuming on more ranks than saved
        set_rng_state(torch.load(rng, weights_only=False))
    return read_state(ckpt)
