"""`zero-trainer export CHECKPOINT_DIR OUT_DIR`: a DeepSpeed checkpoint of any stage -> a Hugging Face model.

Weights are gathered by DeepSpeed's own zero_to_fp32 (stages 1-3: the fp32 master partitions merged), or
read from the module state DeepSpeed saved (stage 0, where nothing is partitioned). The result loads in
vanilla transformers as LlamaForCausalLM (MixtralForCausalLM for a MoE), with no trust_remote_code.
An expert-parallel checkpoint is read from the module states DeepSpeed saved (moe.mixtral_state_dict); a
tensor-parallel one rank by rank, its shards concatenated (gather_tensor_parallel); a pipeline-parallel one from its
per-layer files or, at stage 1, its universal conversion (gather_pipeline).
"""

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import UsageError


def add_subcommand(sub) -> None:
    p = sub.add_parser("export", help="write a Hugging Face model dir from a checkpoint")
    p.add_argument("checkpoint_dir", help="OUTPUT_DIR/checkpoints (newest complete) or one step_* dir in it")
    p.add_argument("out_dir", help="the Hugging Face model directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists and is not empty")
    p.add_argument("--merge", action="store_true", help="a LoRA run: merge the adapters into the weights and write "
                   "a plain Hugging Face model (default: the adapter, for PeftModel.from_pretrained)")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    export(args.checkpoint_dir, args.out_dir, args.overwrite, merge=args.merge)
    return 0


def gather_state_dict(ckpt: Path, zero_stage: int) -> dict:
    import torch

    from .moe import is_expert_parallel_checkpoint, mixtral_state_dict

    if is_expert_parallel_checkpoint(ckpt):  # DeepSpeed's per-expert files; zero_to_fp32 does not regroup them
        return mixtral_state_dict(ckpt)
    if zero_stage == 0:
        module = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
        return {k: v.float() for k, v in module.items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)


def gather_pipeline(ckpt: Path, zero_stage: int, model_config: dict) -> dict:
    """A pipeline-parallel checkpoint's weights under the HF model's names: at stage 0 the layer files DeepSpeed saves
    per pipeline layer (layer_XX-model_states.pt, no partitions), at stage 1 the fp32 masters through DeepSpeed's
    universal conversion (zero_to_fp32 cannot read pipeline checkpoints), into a temporary folder."""
    import re

    import torch

    from .checkpoint import run_ds_to_universal
    from .pipeline import to_hf_name

    layers, tied = model_config["num_hidden_layers"], model_config.get("tie_word_embeddings", True)
    weights = {}
    if zero_stage == 0:
        for path in sorted(ckpt.glob("layer_*-model_states.pt")):
            index = int(re.match(r"layer_(\d+)", path.name).group(1))
            for name, tensor in torch.load(path, map_location="cpu", weights_only=True).items():
                hf = "model.embed_tokens.weight" if index == 0 else to_hf_name(f"{index}.{name}", layers, tied)
                weights[hf] = tensor.float()
        return weights
    with tempfile.TemporaryDirectory(prefix="zero_trainer_export_") as tmp:
        run_ds_to_universal(ckpt, tmp)
        for folder in sorted(Path(tmp, "zero").iterdir()):
            if (folder / "fp32.pt").is_file():
                hp = torch.load(folder / "fp32.pt", map_location="cpu", weights_only=False)
                weights[to_hf_name(folder.name, layers, tied)] = hp["param"]
    return weights


def gather_tensor_parallel(ckpt: Path, zero_stage: int, full_shapes: dict) -> dict:
    """A tensor-parallel checkpoint's weights, whole: each TP rank's files (mp_rank_0R, *_mp_rank_0R_*) gathered
    by gather_state_dict as if they were a model of their own, then every sharded matrix concatenated where the
    whole model's shape says (AutoTP splits rows of q/k/v/gate/up and columns of o/down); the rest is replicated."""
    import tempfile

    import torch

    tp = len(list(ckpt.glob("mp_rank_*_model_states.pt")))
    shards = []
    for r in range(tp):
        with tempfile.TemporaryDirectory() as tmp:
            view = Path(tmp) / ckpt.name
            view.mkdir()
            for f in ckpt.glob(f"*mp_rank_{r:02d}*"):
                (view / f.name.replace(f"mp_rank_{r:02d}", "mp_rank_00")).symlink_to(f.resolve())
            shards.append(gather_state_dict(view, zero_stage))
    whole = {}
    for name, first in shards[0].items():
        want = full_shapes.get(name, first.shape)
        if first.shape == want:
            whole[name] = first
            continue
        dim = next((d for d in range(first.dim()) if first.shape[d] * tp == want[d]), None)
        if dim is None:
            raise RuntimeError(f"{ckpt}: {name} has shape {tuple(first.shape)} on each of {tp} tensor-parallel "
                               f"ranks, which does not concatenate to {tuple(want)}")
        whole[name] = torch.cat([s[name] for s in shards], dim=dim)
    return whole


def hf_config(model_config: dict):
    """The vanilla transformers model (and config) for a saved zero_trainer model config."""
    from transformers import AutoConfig

    from .model import ZeroLMConfig

    if model_config.get("model_type") == ZeroLMConfig.model_type:
        return ZeroLMConfig.from_dict(model_config).to_hf_config()
    return AutoConfig.for_model(**model_config)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"export target {out} exists and is not a directory", "OUT_DIR",
                         "choose another OUT_DIR")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"export target {out} exists and is not empty", "OUT_DIR",
                         "choose an empty or new OUT_DIR, or pass --overwrite")


def export(checkpoint_dir, out_dir, overwrite: bool = False, merge: bool = False) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from .checkpoint import find_checkpoint, read_state

    ckpt = find_checkpoint(checkpoint_dir, "CHECKPOINT_DIR")
    out = Path(out_dir)
    check_target(out, overwrite)
    state = read_state(ckpt)
    lora = state["recipe"].get("lora") or {}
    lora = lora if lora.get("r", 0) > 0 else None
    if merge and lora is None:
        raise UsageError(f"--merge: checkpoint {ckpt} is not a LoRA run (its recipe's lora.r is 0)", "--merge",
                         "drop --merge: the export is the whole model already")
    source = state.get("pretrained") or {}
    config = hf_config(state["model_config"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    if lora is not None:  # the checkpoint holds peft's wrapped model: wrap the same way to read it
        from .lora import ADAPTER_NAME, add_adapters

        model = add_adapters(model, lora, seed=0, base_path=source.get("path"))
    if state["recipe"].get("parallel", {}).get("pp", 1) > 1:
        weights = gather_pipeline(ckpt, state["zero_stage"], state["model_config"])
    elif len(list(ckpt.glob("mp_rank_*_model_states.pt"))) > 1:
        weights = gather_tensor_parallel(ckpt, state["zero_stage"], {k: v.shape for k, v in model.state_dict().items()})
    else:
        weights = gather_state_dict(ckpt, state["zero_stage"])
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    missing = [k for k in missing if not (config.tie_word_embeddings and k.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {ckpt} does not match {type(model).__name__}: "
                           f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    adapter = lora is not None and not merge
    if lora is not None and merge:
        model = model.merge_and_unload()  # W + alpha/r · B·A, in fp32, then the source's dtype below
    # fp32 (the optimizer's master weights), or the dtype of the checkpoint a fine-tune started from: its export is
    # the size the source was, and an unchanged weight comes back bit for bit. (An adapter stays fp32.)
    if source.get("dtype") and not adapter:
        model.to(getattr(torch, source["dtype"]))
        model.config.dtype = getattr(torch, source["dtype"])
    base = model.get_base_model() if adapter else model

    # Write next to the target and swap in at the end: a failure never leaves a half-written OUT_DIR.
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        shipped_base = adapter and not source  # a random-init base exists nowhere else: ship it beside the adapter
        if shipped_base:
            model.peft_config[ADAPTER_NAME].base_model_name_or_path = str(out.resolve() / "base")
        model.save_pretrained(staging, safe_serialization=True)  # an adapter: adapter_model.safetensors + config
        if shipped_base:  # the base without peft's modules (unload: the frozen weights under their own names)
            model.unload().save_pretrained(staging / "base", safe_serialization=True)
        tokenizer = AutoTokenizer.from_pretrained(ckpt / "tokenizer", trust_remote_code=False)
        tokenizer.save_pretrained(staging)
        generation = Path(source.get("path") or "", "generation_config.json")
        if source and generation.is_file():  # the pretrained model's own (its sampling defaults, stop tokens)
            shutil.copy(generation, staging / generation.name)
        else:
            GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id).save_pretrained(staging)
        files = {p.name: sha256(p) for p in sorted(staging.iterdir()) if p.is_file()}
        record = {"source_checkpoint": str(ckpt.resolve()), "step": state["step"], "zero_stage": state["zero_stage"],
                  "world_size": state["world_size"], "ds_config_name": state["ds_config_name"],
                  "tensor_parallel": state["recipe"].get("parallel", {}).get("tp", 1),
                  "pipeline_parallel": state["recipe"].get("parallel", {}).get("pp", 1),
                  "architecture": type(base).__name__, "pretrained": source or None,
                  "lora": None if lora is None else {**lora, "merged": merge}, "files_sha256": files}
        (staging / "export.json").write_text(json.dumps(record, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    what = "a LoRA adapter of " if adapter else "merged LoRA, " if lora else ""
    print(f"exported {ckpt} (step {state['step']}) -> {out} as {what}{type(base).__name__}")
    return out
