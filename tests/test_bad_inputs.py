"""A catalog of bad inputs through the CLI (`zero-trainer train ...`).

Every one must end the same way: exit code 2, stderr exactly one line `error: <what> (<where>): <fix>` that
names the field or file, no traceback, and nothing under the test's directory created or changed — no output
dir, no nvme dir, and an existing output dir with checkpoints left byte for byte and mtime for mtime.

Nothing launches for a bad input, so the catalog runs the CLI's own `main()` in this process (importing torch and
DeepSpeed once, not once a case); a sample goes through a real `python -m zero_trainer` process too, where a
traceback or a stray line on stderr would show exactly as a user sees it.
"""

import contextlib
import functools
import io
import json
import os
import tempfile
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import run_cli

from zero_trainer.errors import UsageError
from zero_trainer.recipe import load_recipe
from zero_trainer.resolve import resolve

# --------------------------------------------------------------------------------------------------------
# inputs


def write(path: Path, content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content, indent=2))
    return path


def ds_json(t: Path, named_change) -> Path:
    """A shipped ds_configs/ JSON with one change applied, written under t."""
    name, change = named_change
    config = json.loads((Path(__file__).resolve().parent.parent / "ds_configs" / f"{name}.json").read_text())
    change(config)
    return write(t / "inputs" / "ds.json", config)


def recipe_file(t: Path, text: str) -> Path:
    return write(t / "inputs" / "recipe.yaml", text)


def readonly_dir(t: Path) -> Path:
    """A directory this user cannot write: a chmod'ed one, or for root (who ignores modes) a read-only mount."""
    if os.geteuid() != 0:
        d = t / "inputs" / "readonly"
        d.mkdir(parents=True)
        d.chmod(0o500)
        return d
    if not os.access("/proc/sys", os.W_OK):
        return Path("/proc/sys")
    pytest.skip("running as root with no read-only file system to point at")


def big_tokenizer(t: Path, size: int) -> Path:
    """A saved fast tokenizer with `size` tokens (more than the debug preset's 2048-token embedding)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    d = t / "inputs" / "tokenizer"
    d.mkdir(parents=True)
    vocab = {"<eos>": 0, "<unk>": 1, **{f"w{i}": i + 2 for i in range(size - 2)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(d / "tokenizer.json"))
    write(d / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<eos>",
                                        "unk_token": "<unk>"})
    return d


def nvme_too_small(t: Path) -> list:
    import shutil

    if shutil.disk_usage(t).free > 1.2e12:  # the 70b preset needs ~1.2 TB of swap at 18 bytes a parameter
        pytest.skip("this disk has room for a 70B NVMe swap")
    return ["--ds-config", "zero3_nvme", "--nvme-path", t / "nvme", "model.preset=70b"]


def hosts(t: Path, text: str = "node0 slots=1\nnode1 slots=1\n") -> Path:
    return write(t / "inputs" / "hosts", text)


BY_HAND = ["--no-ssh", "--master-addr", "127.0.0.1", "--master-port", "29500"]  # a hostfile's node started by hand


TEXT = "The quick brown fox jumps over the lazy dog.\n\nPack my box with five dozen liquor jugs.\n"
D = ["--recipe", "debug"]


def data(t: Path, name: str, content) -> str:
    return f"data.path={write(t / 'inputs' / name, content)}"


def with_ds(name, change=None):
    """Args for a ds JSON: a shipped one (by name) with `change` applied, written to the test dir."""
    return lambda t: [*D, "--ds-config", ds_json(t, (name, change))]


def zero(**keys):
    return lambda c: c["zero_optimization"].update(keys)


def rename_key(block, old, new):
    def change(c):
        node = c[block] if block else c
        node[new] = node.pop(old)
    return change


def nvme_knobs(**keys):
    """zero3_nvme with offload_param knobs set (and parameters swapped: max_in_cpu 0) on a model whose tensors
    are large enough to be swapped (minimind-26m: the embedding is 3.3M elements)."""
    def change(c):
        c["zero_optimization"]["offload_param"].update({"max_in_cpu": 0, **keys.pop("param", {})})
        c["zero_optimization"].update(keys)
    return lambda t: [*with_ds("zero3_nvme", change)(t), "--nvme-path", t / "nvme", "model.preset=minimind-26m"]


def locked_beyond_ram(t: Path) -> list:
    from zero_trainer.hardware import physical_memory_bytes

    count = physical_memory_bytes() // (2 * 4 * 10**8) + 1  # bf16 buffers of 4e8 elements: more than the RAM
    return nvme_knobs(param={"buffer_count": int(count), "buffer_size": 4 * 10**8}, stage3_max_reuse_distance=0)(t)


def tmpfs_dir(t: Path) -> Path:
    from zero_trainer.hardware import filesystem_type

    if filesystem_type("/dev/shm") != "tmpfs":
        pytest.skip("no tmpfs at /dev/shm")
    return Path("/dev/shm") / f"zt_nvme_{t.name}"


def cannot_checkpoint(t: Path) -> list:
    """openai-gpt: a causal LM whose transformers class has supports_gradient_checkpointing = False."""
    config = write(t / "inputs" / "gpt1" / "config.json", {"model_type": "openai-gpt", "n_embd": 64, "n_layer": 2,
                                                            "n_head": 2, "vocab_size": 2048, "n_positions": 512})
    return [*D, "model.preset=null", f"model.config={config}", "train.activation_checkpointing=true"]


def pretrained(t: Path, drop=None, add=None, config=None, int8=None, sharded=False, drop_shard=False,
               truncate=False, tokenizer=True) -> Path:
    """A tiny Llama checkpoint (tests/hf_families.py) under t, with one thing wrong."""
    import torch
    from hf_families import write_checkpoint
    from safetensors.torch import load_file, save_file

    d = t / "inputs" / "pretrained"
    if sharded:
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(write_checkpoint(t / "inputs" / "whole", "llama")).save_pretrained(
            d, max_shard_size="100KB")
    else:
        write_checkpoint(d, "llama")
    if not tokenizer:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (d / name).unlink()
    if drop_shard:
        next(d.glob("model-00001-of-*.safetensors")).unlink()
    weights = d / "model.safetensors"
    if drop or add or int8:
        tensors = load_file(weights)
        tensors.pop(drop, None)
        if add:
            tensors[add] = torch.zeros(4)
        if int8:
            tensors[int8] = tensors[int8].to(torch.int8)
        save_file(tensors, weights, metadata={"format": "pt"})
    if truncate:
        with open(weights, "r+b") as f:
            f.truncate(weights.stat().st_size - 1000)
    if config:
        write(d / "config.json", {**json.loads((d / "config.json").read_text()), **config})
    return d


CHAT_ROW = json.dumps({"messages": [{"role": "user", "content": "What is 1 + 2?"},
                                    {"role": "assistant", "content": "1 + 2 = 3."}]})
# renders the last turn unlike the earlier ones (as reasoning templates drop earlier thoughts)
REWRITING_TEMPLATE = ("{%- for m in messages %}{%- if loop.last %}{{ m['role'] + ': ' + m['content'] + '.\\n' }}"
                      "{%- else %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{%- endif %}{%- endfor %}"
                      "{%- if add_generation_prompt %}{{ 'assistant: ' }}{%- endif %}")


def chat(t: Path, bad, name: str = "c.jsonl", raw: str | None = None, template="chatml", seq_len: int = 256):
    """Args for a chat run over a good row then `bad` (messages, or a whole row), with the shared test tokenizer."""
    second = "" if bad is None else json.dumps({"messages": bad} if isinstance(bad, list) else bad) + "\n"
    path = write(t / "inputs" / name, raw if raw is not None else CHAT_ROW + "\n" + second)
    return [*D, "data.format=chat", f"data.path={path}", f"data.tokenizer={shared_tokenizer()}",
            f"data.seq_len={seq_len}", *([f"data.chat_template={template}"] if template else [])]


@functools.lru_cache(maxsize=1)
def shared_tokenizer() -> Path:
    """The test tokenizer (tests/hf_families.py), trained once per process outside every case's directory: an input
    the cases only read."""
    from hf_families import tokenizer

    root = Path(tempfile.mkdtemp(prefix="bad-inputs-tokenizer-"))
    tokenizer(root)
    return root / "shared-bpe-tokenizer"


def run_of(t: Path, lora: dict | None) -> Path:
    """An output dir holding a complete checkpoint of a debug run, with or without LoRA."""
    from zero_trainer.model import model_config

    return checkpointed_run(t, model_config("debug"), {"model": {"preset": "debug", "config": None,
                                                                 "pretrained": None}, "lora": lora})


def checkpointed_run(t: Path, cfg, recipe: dict) -> Path:
    """t/out with a complete step-2 checkpoint (its state file only) of a run of `cfg`'s shape and `recipe`."""
    from zero_trainer.checkpoint import COMPLETE, STATE_FILE, model_shape

    out = t / "out"
    state = {"step": 2, "world_size": 1, "zero_stage": 2, "model_shape": model_shape(cfg), "recipe": recipe}
    write(out / "checkpoints" / "step_00000002" / STATE_FILE, state)
    write(out / "checkpoints" / "step_00000002" / COMPLETE, "step_00000002\n")
    return out


def pickled_only(t: Path) -> Path:
    d = pretrained(t)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    return d


def run_from_config(t: Path) -> Path:
    """An output dir holding a complete checkpoint of a run that started from a random init of the same shape."""
    from zero_trainer.model import model_config

    return checkpointed_run(t, model_config(pretrained(t)),
                            {"model": {"preset": None, "config": "elsewhere/config.json", "pretrained": None}})


# id -> (args builder: tmp dir -> CLI args after `train`, substrings of the error line, pre-existing output dir).
# --output-dir OUT is added unless the builder gives its own.
CATALOG = {
    # the command line
    "unknown flag": (lambda t: [*D, "--epochs", "3"], ["unrecognized arguments: --epochs", "command line"], False),
    "missing --recipe": (lambda t: [], ["required: --recipe", "command line"], False),
    "--num-procs not a number": (lambda t: [*D, "--num-procs", "two"], ["--num-procs", "invalid int"], False),
    "--num-procs 0": (lambda t: [*D, "--num-procs", "0"], ["--num-procs 0 is invalid"], False),
    "override not KEY=VALUE": (lambda t: [*D, "train.max_steps"], ["KEY=VALUE", "command line"], False),
    # multi-node: --hostfile and DeepSpeed's runner flags
    "hostfile missing": (lambda t: [*D, "--hostfile", t / "nope"], ["hostfile", "nope not found", "--hostfile"],
                         False),
    "hostfile a directory": (lambda t: [*D, "--hostfile", t], ["cannot be read", "--hostfile"], False),
    "hostfile line without slots": (lambda t: [*D, "--hostfile", hosts(t, "node0 slots=1\nnode1 slots=two\n")],
                                    ["hosts:2 'node1 slots=two' is not 'hostname slots=N'", "--hostfile"], False),
    "hostfile host twice": (lambda t: [*D, "--hostfile", hosts(t, "node0 slots=1\nnode0 slots=1\n")],
                            ["hosts:2 names host node0 twice"], False),
    "hostfile slots 0": (lambda t: [*D, "--hostfile", hosts(t, "node0 slots=0\n")], ["node0 slots=0", "slots >= 1"],
                         False),
    "hostfile only comments": (lambda t: [*D, "--hostfile", hosts(t, "# none yet\n\n")], ["names no host"], False),
    "hostfile with unequal slots": (lambda t: [*D, "--hostfile", hosts(t, "a slots=2\nb slots=1\n")],
                                    ["different slots (a slots=2, b slots=1)", "same slots=N"], False),
    "--num-procs with --hostfile": (lambda t: [*D, "--num-procs", "2", "--hostfile", hosts(t)],
                                    ["--num-procs and --hostfile", "slots=N"], False),
    "--node-rank outside the hostfile": (lambda t: [*D, *BY_HAND, "--hostfile", hosts(t), "--node-rank", "2"],
                                         ["--node-rank 2 is not a host", "(2 hosts)", "use 0 to 1"], False),
    "--no-ssh without --node-rank": (lambda t: [*D, "--hostfile", hosts(t), "--no-ssh", "--master-port", "29500"],
                                     ["--no-ssh needs --node-rank, --master-addr", "(--node-rank)"], False),
    "--no-ssh without --master-port": (lambda t: [*D, *BY_HAND[:-2], "--hostfile", hosts(t), "--node-rank", "0"],
                                       ["--no-ssh needs --master-port", "same --master-addr"], False),
    "--node-rank without --no-ssh": (lambda t: [*D, "--hostfile", hosts(t), "--node-rank", "0"],
                                     ["--node-rank only applies with --no-ssh"], False),
    "--launcher with --no-ssh": (lambda t: [*D, *BY_HAND, "--hostfile", hosts(t), "--node-rank", "0", "--launcher",
                                            "pdsh"], ["--launcher pdsh is unused with --no-ssh"], False),
    "unknown launcher": (lambda t: [*D, "--hostfile", hosts(t), "--launcher", "pdhs"],
                         ["unknown launcher 'pdhs'", "did you mean 'pdsh'?"], False),
    "--master-addr without --hostfile": (lambda t: [*D, "--master-addr", "10.0.0.1"],
                                         ["--master-addr needs --hostfile"], False),
    # the recipe
    "recipe file missing": (lambda t: ["--recipe", "recipes/nope.yaml"], ["recipe file", "--recipe"], False),
    "recipe YAML syntax": (lambda t: ["--recipe", recipe_file(t, "model:\n  preset: [debug\n")],
                           ["not valid YAML", "recipe.yaml:3:"], False),
    "recipe not a mapping": (lambda t: ["--recipe", recipe_file(t, "- model\n- train\n")],
                             ["mapping of sections", "recipe.yaml"], False),
    "unknown recipe section": (lambda t: ["--recipe", recipe_file(t, "model:\n  preset: debug\ntrainer:\n  lr: 1\n")],
                               ["unknown recipe section 'trainer'", "did you mean 'train'"], False),
    "unknown recipe field": (lambda t: [*D, "train.max_stepz=3"], ["unknown recipe field", "train.max_steps"], False),
    "value out of range": (lambda t: [*D, "train.max_steps=-1"], ["train.max_steps", "whole number"], False),
    "float for a whole number": (lambda t: [*D, "train.micro_batch=2.5"], ["train.micro_batch = 2.5"], False),
    "text for a bool": (lambda t: [*D, "train.activation_checkpointing=maybe"],
                        ["train.activation_checkpointing", "true or false"], False),
    "unknown precision": (lambda t: [*D, "train.precision=fp8"], ["train.precision", "bf16, fp16, fp32"], False),
    "betas of the wrong length": (lambda t: [*D, "train.betas=[0.9]"], ["train.betas"], False),
    "unknown reporter": (lambda t: [*D, "train.report_to=[tensorboard,mlflow]"],
                         ["train.report_to", "tensorboard, wandb"], False),
    "preset and config both set": (lambda t: ["--recipe", recipe_file(t, "model:\n  preset: debug\n"
                                                                          "  config: c.json\n")],
                                   ["it names model.preset and model.config", "model"], False),
    "config and pretrained both overridden": (lambda t: [*D, "model.config=c.json", "model.pretrained=p"],
                                              ["it names model.config and model.pretrained"], False),
    # model.pretrained: the checkpoint's headers against its config, before anything starts
    "pretrained dir missing": (lambda t: [*D, f"model.pretrained={t / 'nope'}"],
                               ["is not a directory", "model.pretrained"], False),
    "pretrained with pickled weights only": (lambda t: [*D, f"model.pretrained={pickled_only(t)}"],
                                             ["only pickled weights (pytorch_model.bin)", "safetensors"], False),
    "pretrained tensor missing": (lambda t: [*D, f"model.pretrained={pretrained(t, drop='model.norm.weight')}"],
                                  ["model.norm.weight ([64]) is missing from"], False),
    "pretrained tensor unexpected": (lambda t: [*D, f"model.pretrained={pretrained(t, add='model.layers.7.x.weight')}"],
                                     ["checkpoint tensor model.layers.7.x.weight in model.safetensors matches no"],
                                     False),
    "pretrained tensor mis-shaped": (lambda t: [*D, "model.pretrained=" + str(pretrained(
                                         t, config={"intermediate_size": 96}))],
                                     ["model.layers.0.mlp.gate_proj.weight in model.safetensors has shape [128, 64]",
                                      "[96, 64]"], False),
    "pretrained integer weights": (lambda t: [*D, f"model.pretrained={pretrained(t, int8='model.norm.weight')}"],
                                   ["model.norm.weight in model.safetensors is I8", "quantized"], False),
    "pretrained shard missing": (lambda t: [*D, f"model.pretrained={pretrained(t, sharded=True, drop_shard=True)}"],
                                 ["model.safetensors.index.json names model-00001-of-", "copy every shard"], False),
    "pretrained truncated file": (lambda t: [*D, f"model.pretrained={pretrained(t, truncate=True)}"],
                                  ["which does not match its shape", "truncated or corrupt"], False),
    "pretrained without a tokenizer": (lambda t: [*D, f"model.pretrained={pretrained(t, tokenizer=False)}"],
                                       ["has no tokenizer", "data.tokenizer"], False),
    "pretrained tokenizer larger than its embedding": (
        lambda t: [*D, f"model.pretrained={pretrained(t)}", f"data.tokenizer={big_tokenizer(t, 3000)}"],
        ["tokenizer vocab 3000 > model vocab_size 512", "data.tokenizer="], False),
    "resume from another source": (lambda t: [*D, f"model.pretrained={pretrained(t)}", "--resume",
                                              "--output-dir", run_from_config(t)],
                                   ["its run started from a random init of model.config", "--resume"], True),
    # the DeepSpeed JSON as a file
    "unknown ds_config name": (lambda t: [*D, "--ds-config", "zero4"], ["unknown ds_config", "deepspeed.config"],
                               False),
    "ds_config file missing": (lambda t: [*D, "--ds-config", t / "nope.json"], ["not found", "deepspeed.config"],
                               False),
    "ds_config JSON syntax": (lambda t: [*D, "--ds-config", write(t / "inputs" / "ds.json",
                                                                  '{\n  "zero_optimization": {"stage": 2,}\n}\n')],
                              ["not valid JSON", "ds.json:2:"], False),
    "ds_config duplicate key": (lambda t: [*D, "--ds-config", write(t / "inputs" / "ds.json",
                                                                    '{"zero_optimization": {"stage": 2},\n'
                                                                    ' "zero_optimization": {"stage": 3}}\n')],
                                ["'zero_optimization' twice", "ds.json"], False),
    # the DeepSpeed JSON through DeepSpeed's own parser
    "misspelt zero key": (with_ds("zero3", rename_key("zero_optimization", "stage3_prefetch_bucket_size",
                                                      "stage3_prefetch_bucket_sise")),
                          ["zero_optimization.stage3_prefetch_bucket_sise",
                           "did you mean 'zero_optimization.stage3_prefetch_bucket_size'", "ds.json"], True),
    "misspelt top-level key": (with_ds("zero2", lambda c: (c.pop("gradient_clipping"), c.update(gradient_clippin=1))),
                               ["'gradient_clippin'", "DeepSpeed would ignore it", "did you mean 'gradient_clipping'"],
                               False),
    "bad value for DeepSpeed": (with_ds("zero2", zero(stage="three")), ["zero_optimization.stage", "'three'"], False),
    "key DeepSpeed removed": (with_ds("zero2", lambda c: c.update(amp={"enabled": True})),
                              ["no longer supports 'amp'", "ds.json"], False),
    "NVMe optimizer offload at stage 2": (with_ds("zero2", zero(offload_optimizer={"device": "nvme",
                                                                                   "nvme_path": "/tmp"})),
                                          ["NVMe optimizer offload is ignored at ZeRO stage 2", "ds.json"], False),
    "offload_param at stage 2": (with_ds("zero2", zero(offload_param={"device": "cpu"})),
                                 ["offload_param is ignored at ZeRO stage 2", "ds.json"], False),
    "partial offload ratio at stage 2": (with_ds("zero2", zero(offload_optimizer={"device": "cpu", "ratio": 0.5})),
                                         ["offload_optimizer.ratio 0.5", "stage 3"], False),
    "fp16 and bf16 both on": (with_ds("zero2", lambda c: (c["fp16"].update(enabled=True),
                                                          c["bf16"].update(enabled=True))),
                              ["fp16 and bf16 are both enabled", "ds.json"], False),
    "batch sizes contradict each other": (
        with_ds("zero2", lambda c: c.update(train_batch_size=32, train_micro_batch_size_per_gpu=8,
                                            gradient_accumulation_steps=1)),
        ["train_batch_size 32 != train_micro_batch_size_per_gpu 8", "ds.json"], False),
    "batch size contradicts the recipe": (with_ds("zero2", lambda c: c.update(train_micro_batch_size_per_gpu=4)),
                                          ["train_micro_batch_size_per_gpu=4 vs train.micro_batch=8", "ds.json"],
                                          False),
    # directories the run would write
    "output_dir is a file": (lambda t: [*D, "--output-dir", write(t / "inputs" / "out.txt", "not a dir")],
                             ["output_dir", "is not a directory"], False),
    "output_dir not writable": (lambda t: [*D, "--output-dir", readonly_dir(t) / "run"],
                                ["output_dir", "not writable"], False),
    "nvme_path not writable": (lambda t: [*D, "--ds-config", "zero3_nvme", "--nvme-path", readonly_dir(t) / "nvme"],
                               ["deepspeed.nvme_path", "not writable"], True),
    # the model
    "unknown preset": (lambda t: [*D, "model.preset=gpt9"], ["unknown model preset", "model.preset"], False),
    "model config missing": (lambda t: [*D, "model.preset=null", f"model.config={t / 'config.json'}"],
                             ["model.config"], False),
    "encoder config as model.config": (lambda t: [*D, "model.preset=null", "model.config=" + str(write(
        t / "inputs" / "bert" / "config.json", {"model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2,
                                                "num_attention_heads": 2, "intermediate_size": 128}))],
                                       ["model_type 'bert' is an encoder", "model.config"], False),
    "encoder-decoder config as model.config": (lambda t: [*D, "model.preset=null", "model.config=" + str(write(
        t / "inputs" / "bart" / "config.json", {"model_type": "bart", "d_model": 64, "encoder_layers": 1,
                                                "decoder_layers": 1, "vocab_size": 512}))],
                                               ["model_type 'bart' is an encoder-decoder", "model.config"], False),
    "seq_len beyond the model's positions": (lambda t: [*D, "data.seq_len=1024"],
                                             ["max_position_embeddings 512", "data.seq_len"], False),
    "nvme_path too small for the model": (lambda t: [*D, *nvme_too_small(t)], ["deepspeed.nvme_path", "GiB free"],
                                          False),
    # DeepSpeed's scale traps: accepted by DeepSpeed, fatal (or RAM-eating) mid-run
    "param swap buffer smaller than a parameter": (nvme_knobs(param={"buffer_size": 100_000}),
                                                   ["offload_param.buffer_size 100000 is smaller", "ds.json"], False),
    "param swap buffers too few for the reuse window": (
        nvme_knobs(param={"buffer_count": 3}, stage3_max_reuse_distance=10**9),
        ["offload_param.buffer_count 3 is too small", "stage3_max_reuse_distance", "Not enough buffers"], False),
    "optimizer swap buffers too few": (with_ds("zero3_nvme", lambda c: c["zero_optimization"]["offload_optimizer"]
                                               .update(buffer_count=2)),
                                       ["offload_optimizer.buffer_count 2 is too small", "ds.json"], False),
    "page-locked buffers beyond the RAM": (locked_beyond_ram, ["page-locks", "of RAM"], False),
    "nvme_path on tmpfs": (lambda t: [*D, "--ds-config", "zero3_nvme", "--nvme-path", tmpfs_dir(t)],
                           ["on tmpfs", "deepspeed.nvme_path"], False),
    "activation checkpointing on a model that cannot": (cannot_checkpoint,
                                                        ["cannot recompute activations",
                                                         "train.activation_checkpointing"], False),
    # the memory budget
    "budget not a size": (lambda t: [*D, "hardware.cpu_mem=lots"], ["hardware.cpu_mem", "GiB"], False),
    "nothing fits the budget": (lambda t: [*D, "--ds-config", "auto", "hardware.cpu_mem=0.1"],
                                ["no ZeRO rung fits debug on the recipe's hardware budget", "deepspeed.config"],
                                False),
    "named rung beyond the budget": (lambda t: [*D, "--ds-config", "zero2", "hardware.cpu_mem=0.1"],
                                     ["zero2 does not fit debug", "deepspeed.config=zero2"], False),
    "only NVMe would fit": (lambda t: [*D, "--ds-config", "auto", "model.preset=minimind-104m", "hardware.cpu_mem=2",
                                       "train.precision=bf16"],
                            ["no ZeRO rung fits", "would fit with NVMe offload", "--nvme-path"], False),
    # model parallelism (parallel.tp / parallel.sp)
    "tp x sp not dividing the world size": (lambda t: [*D, "--num-procs", "2", "parallel.tp=4"],
                                            ["parallel.tp 4 does not divide the world size 2",
                                             "parallel.tp"], False),
    "tp not dividing the key/value heads": (lambda t: [*D, "--num-procs", "4", "parallel.tp=4"],
                                            ["parallel.tp 4 does not divide the model's 2 key/value heads",
                                             "parallel.tp"], False),
    "tp together with sp": (lambda t: [*D, "--num-procs", "4", "parallel.tp=2", "parallel.sp=2"],
                            ["parallel.tp and parallel.sp together", "parallel.tp"], False),
    "sp not dividing seq_len": (lambda t: [*D, "--num-procs", "2", "parallel.sp=2", "data.seq_len=127"],
                                ["parallel.sp 2 does not divide data.seq_len 127", "parallel.sp"], False),
    "sp not dividing the heads": (lambda t: [*D, "--num-procs", "8", "parallel.sp=8"],
                                  ["parallel.sp 8 does not divide the model's 4 attention heads", "parallel.sp"],
                                  False),
    "sp with eager attention": (lambda t: [*D, "--num-procs", "2", "parallel.sp=2", "model.preset=null",
                                           "model.config=" + str(write(t / "inputs" / "eager" / "config.json", {
                                               "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                                               "num_hidden_layers": 2, "num_attention_heads": 4,
                                               "num_key_value_heads": 2, "vocab_size": 2048,
                                               "max_position_embeddings": 512, "attn_implementation": "eager"}))],
                                ["parallel.sp needs attention Ulysses can wrap", "eager", "model.config"], False),
    "sp on a mixture-of-experts model": (lambda t: [*D, "--num-procs", "2", "parallel.sp=2", "model.preset=debug-moe"],
                                         ["parallel.sp on a mixture-of-experts model", "parallel.ep"], False),
    "tiled MLP on a mixture-of-experts model": (lambda t: [*D, "parallel.tiled_mlp=true", "model.preset=debug-moe"],
                                                ["parallel.tiled_mlp tiles a dense MLP", "parallel.tiled_mlp"], False),
    # the data
    "data path missing": (lambda t: [*D, f"data.path={t / 'corpus.jsonl'}"],
                          ["data path does not exist", "corpus.jsonl"], False),
    "empty corpus after dropping blanks": (lambda t: [*D, data(t, "blank.txt", "  \n\n\t\n")],
                                           ["empty corpus", "blank.txt"], False),
    "jsonl row without text": (lambda t: [*D, data(t, "c.jsonl", '{"text": "hi"}\n{"body": "no text key"}\n')],
                               ['without a "text"', "c.jsonl:2"], True),
    "bytes that are not UTF-8": (lambda t: [*D, data(t, "latin1.txt", b"fine\ncaf\xe9 au lait\n")],
                                 ["not UTF-8", "latin1.txt:2"], False),
    "tokenizer larger than the embedding": (lambda t: [*D, data(t, "c.txt", TEXT),
                                                       f"data.tokenizer={big_tokenizer(t, 3000)}"],
                                            ["tokenizer vocab 3000 > model vocab_size 2048", "data.tokenizer"], False),
    "corpus too small for seq_len": (lambda t: [*D, data(t, "c.txt", TEXT), "--resume"],
                                     ["corpus too small", "data.seq_len"], True),
    # chat data (data.format chat): each bad row names its file and line (or item)
    "chat row with an unknown role": (lambda t: chat(t, [{"role": "user", "content": "hi"},
                                                         {"role": "wizard", "content": "x"}]),
                                      ['has role "wizard"', "c.jsonl:2"], False),
    "chat row with an empty assistant turn": (lambda t: chat(t, [{"role": "user", "content": "hi"},
                                                                 {"role": "assistant", "content": "  "}]),
                                              ["assistant turn 1 is empty", "c.jsonl:2"], False),
    "chat content that is not text": (lambda t: chat(t, [{"role": "user", "content": 5},
                                                         {"role": "assistant", "content": "x"}]),
                                      ["is int, not a string", "c.jsonl:2"], False),
    "chat row with nothing to learn": (lambda t: chat(t, [{"role": "user", "content": "hi"}]),
                                       ["no assistant turn", "c.jsonl:2"], False),
    "chat row in no known format": (lambda t: chat(t, {"prompt": "hi", "completion": "there"}),
                                    ['expected "messages"', "c.jsonl:2"], False),
    "chat .json that is not an array": (lambda t: chat(t, None, name="c.json", raw='{"messages": []}'),
                                        ["one array of conversations", "c.json:1"], False),
    "chat template file missing": (lambda t: chat(t, None, template=str(t / "nope.jinja")),
                                   ["chat template file not found", "data.chat_template"], False),
    "chat template breaking the prefix property": (lambda t: chat(t, None, template=write(
        t / "inputs" / "rewrites.jinja", REWRITING_TEMPLATE)), ["prefix property", "c.jsonl:1"], False),
    "chat tokenizer without a chat_template": (lambda t: chat(t, None, template=None),
                                               ["has no chat_template", "data.chat_template"], False),
    "chat without a tokenizer": (lambda t: [*D, "data.format=chat", data(t, "c.jsonl", CHAT_ROW + "\n")],
                                 ["needs the model's tokenizer", "data.tokenizer"], False),
    "chat conversations longer than seq_len": (lambda t: chat(t, None, seq_len=8),
                                               ["0 conversation(s) fit in data.seq_len 8", "1 longer"], False),
    # LoRA
    "lora rank negative": (lambda t: [*D, "lora.r=-4"], ["lora.r", "whole number >= 0"], False),
    "lora target matching nothing": (lambda t: [*D, "lora.r=4", "lora.target_modules=[qkv]"],
                                     ["['qkv'] match no linear layer", "lora.target_modules", "q_proj"], False),
    "lora targets empty": (lambda t: [*D, "lora.r=4", "lora.target_modules=[]"], ["lora.target_modules"], False),
    "lora with tensor parallelism": (lambda t: [*D, "--num-procs", "2", "parallel.tp=2", "lora.r=4"],
                                     ["lora.r 4 with parallel.tp 2", "parallel.tp"], False),
    "lora resume of a full fine-tune": (lambda t: [*D, "lora.r=4", "--resume", "--output-dir", run_of(t, lora=None)],
                                        ["its run trained every weight", "LoRA r=4", "lora"], True),
    "full fine-tune resume of a lora run": (lambda t: [*D, "--resume", "--output-dir", run_of(t, lora={
        "r": 8, "target_modules": "all-linear"})], ["its run trained LoRA r=8", "every weight (no LoRA)"], True),
}


# --------------------------------------------------------------------------------------------------------
# the contract


def snapshot(root: Path) -> dict:
    """Every file and directory under root with its size and mtime: any write shows up as a difference."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames]:
            path = Path(dirpath) / name
            st = path.stat()
            found[str(path.relative_to(root))] = (path.is_dir(), st.st_size, st.st_mtime_ns)
    return found


def existing_run(out: Path) -> None:
    """An output dir from an earlier run: a file, and a complete checkpoint the bad input must not touch."""
    write(out / "metrics.csv", "step,loss\n1,7.6\n")
    write(out / "checkpoints" / "global_step10" / "COMPLETE", "")
    write(out / "checkpoints" / "global_step10" / "mp_rank_00_model_states.pt", b"\0" * 64)
    write(out / "checkpoints" / "latest", "global_step10")


def run_in_process(args: list[str]):
    """`zero-trainer train ARGS` through cli.main in this process: (exit code, stdout, stderr)."""
    from zero_trainer.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(["train", *args])
        except SystemExit as exit_:  # argparse's own errors
            code = exit_.code
        except Exception:  # what a user would see as a traceback
            traceback.print_exc(file=err)
            code = 1
    return code, out.getvalue(), err.getvalue()


def prepare(case: str, t: Path):
    build, _, existing = CATALOG[case]
    args = [str(a) for a in build(t)]
    if "--output-dir" not in args:
        args += ["--output-dir", str(t / "out")]
    if existing:
        existing_run(t / "out")
    return args


def check(case: str, t: Path, before: dict, code: int, stdout: str, stderr: str):
    _, expected, existing = CATALOG[case]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, f"exit {code}\n{stderr[-3000:]}"
    assert len(lines) == 1, f"stderr is not one line:\n{stderr[-3000:]}"
    assert lines[0].startswith("error: "), lines[0]
    for text in expected:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"
    assert "Traceback" not in stderr + stdout
    assert existing or not (t / "out").exists(), "the output dir was created"
    assert snapshot(t) == before, "something under the test dir was created or changed"


@pytest.mark.parametrize("case", list(CATALOG))
def test_bad_input_is_one_line_exit_2_nothing_written(case, tmp_path):
    args = prepare(case, tmp_path)
    before = snapshot(tmp_path)
    check(case, tmp_path, before, *run_in_process(args))


# One case from each stage of the checks, through a real process: the line a user sees, and nothing else.
REAL_PROCESS = ["unknown flag", "jsonl row without text"]


def test_bad_input_through_a_real_process(tmp_path):
    with ThreadPoolExecutor(len(REAL_PROCESS)) as pool:
        started = {}
        for case in REAL_PROCESS:
            t = tmp_path / case.replace(" ", "_")
            t.mkdir()
            args = prepare(case, t)
            started[case] = (t, snapshot(t), pool.submit(run_cli, "train", *args, check=False, timeout=300))
        for case, (t, before, running) in started.items():
            proc = running.result()
            check(case, t, before, proc.returncode, proc.stdout, proc.stderr)


def test_catalog_is_large_and_distinct():
    assert len(CATALOG) >= 25
    messages = [tuple(expected) for _, expected, _ in CATALOG.values()]
    assert len(set(messages)) == len(messages)
    assert sum(existing for *_, existing in CATALOG.values()) >= 3  # existing output dirs with checkpoints


def test_reporter_not_installed_is_one_line_with_the_pip_command(monkeypatch, tmp_path):
    """train.report_to naming a package this Python lacks: the preflight says which and how to install it."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UsageError) as err:
        resolve(load_recipe("debug", ["train.report_to=[tensorboard,wandb]", f"output_dir={tmp_path / 'x'}"]), 1)
    line = err.value.line()
    assert "wandb" in line and "pip install" in line and "train.report_to" in line and "\n" not in line
    assert not (tmp_path / "x").exists()
