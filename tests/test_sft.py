"""Supervised fine-tuning: chat data, assistant-only loss, packing that keeps documents apart, one loss per target,
and LoRA through peft.

In-process: a packed row's documents do not see each other (our model and transformers' Llama), the packed loss is
the conversations' summed loss, gradients reach only assistant targets, chat rows carry what chat.encode marked.
The runs (conftest.sft_runs, in the 1- and 2-rank launches) train the same conversations at ZeRO-0 and ZeRO-3, on 1
and 2 ranks, with and without accumulation: one loss per target makes them all the same run. LoRA runs at ZeRO-0,
ZeRO-2 and ZeRO-3 + CPU offload (stopped and resumed) agree with each other, leave every base weight as the source
has it, and export an adapter PeftModel loads and a merged model with its logits.
"""

from pathlib import Path

import pytest
import torch
from chat_data import write_chat
from conftest import SFT_STEPS, assert_losses_close

from zero_trainer.data import DataError, chat_rows, next_token_targets, prepare_data
from zero_trainer.errors import UsageError
from zero_trainer.model import build_model, model_config, next_token_loss


def _models():
    from hf_families import SHAPE
    from transformers import LlamaConfig

    torch.manual_seed(0)
    ours = build_model(model_config("debug", vocab_size=512)).eval()
    torch.manual_seed(0)
    llama = build_model(LlamaConfig(**SHAPE)).eval()
    return {"ours": ours, "llama": llama}


@pytest.mark.parametrize("name", ["ours", "llama"])
def test_packed_documents_do_not_see_each_other(name):
    """Document B packed after A: its logits are those of B alone, and do not move when A changes (fp32, 1e-5)."""
    model = _models()[name]
    g = torch.Generator().manual_seed(1)
    a, a2, b = (torch.randint(1, 512, (1, n), generator=g) for n in (7, 7, 9))
    positions = torch.cat([torch.arange(7), torch.arange(9)])[None]
    with torch.no_grad():
        packed = model(input_ids=torch.cat([a, b], 1), position_ids=positions, use_cache=False).logits[:, 7:]
        changed = model(input_ids=torch.cat([a2, b], 1), position_ids=positions, use_cache=False).logits[:, 7:]
        alone = model(input_ids=b, position_ids=torch.arange(9)[None], use_cache=False).logits
    assert (packed - alone).abs().max() <= 1e-5 and (changed - alone).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["ours", "llama"])
def test_packed_loss_is_the_sum_over_conversations(name):
    """The loss of a packed row over its N learned targets = the conversations' summed losses over N."""
    model = _models()[name]
    g = torch.Generator().manual_seed(2)
    convs = [(torch.randint(1, 512, (n,), generator=g).tolist(), [i % 3 != 0 for i in range(n)]) for n in (11, 6, 9)]
    rows = chat_rows(convs, 32, 0, packing=True)
    assert len(rows["ids"]) == 1  # all three in one row
    ids, positions = torch.from_numpy(rows["ids"]), torch.from_numpy(rows["positions"])
    targets = torch.from_numpy(next_token_targets(rows["labels"], rows["positions"]))
    n = int((targets != -100).sum())
    with torch.no_grad():
        packed = next_token_loss(model, ids, targets, positions, torch.tensor(float(n))).loss
        total = 0.0
        for conv_ids, learn in convs:
            one = chat_rows([(conv_ids, learn)], len(conv_ids), 0, packing=True)
            t = torch.from_numpy(next_token_targets(one["labels"], one["positions"]))
            total += next_token_loss(model, torch.from_numpy(one["ids"]), t, torch.from_numpy(one["positions"]),
                                     torch.tensor(1.0)).loss
    assert abs(packed.item() - total.item() / n) <= 1e-5


def _chat_data(tmp_path, **cfg):
    from hf_families import tokenizer

    tok = tokenizer(tmp_path)
    path = write_chat(tmp_path / "chat.jsonl", 40)
    return prepare_data({"path": str(path), "tokenizer": str(tmp_path / "shared-bpe-tokenizer"), "format": "chat",
                         "chat_template": "chatml", **cfg}, 512, 160, 0, str(tmp_path / "cache")), tok


def test_gradients_reach_only_assistant_targets(tmp_path):
    data, tok = _chat_data(tmp_path)
    model = _models()["ours"].train()
    ids, positions, targets = (torch.from_numpy(x) for x in data.batch("train", [0, 1]))
    model.lm_head.register_forward_hook(lambda m, i, out: out.retain_grad() or setattr(m, "out", out))
    next_token_loss(model, ids, targets, positions).loss.backward()
    grad = model.lm_head.out.grad.abs().sum(-1)
    assert (grad[targets == -100] == 0).all() and (grad[targets != -100] > 0).all()
    learned = tok.decode(targets[targets != -100].tolist())
    assert "What is" not in learned and "= " in learned and "user" not in learned  # answers, never questions
    assert (targets != -100).sum() < (ids != 0).sum() / 2


def test_chat_rows_pack_whole_conversations_and_count_what_is_left_out(tmp_path):
    data, _ = _chat_data(tmp_path)
    unpacked, _ = _chat_data(tmp_path, packing=False)
    assert data.examples + data.dropped == 40 and data.examples == unpacked.examples and data.dropped > 0
    assert len(data.train) + len(data.eval) < len(unpacked.train) + len(unpacked.eval)  # several a row
    assert len(unpacked.train) + len(unpacked.eval) == unpacked.examples  # one a row
    ids, positions, targets = data.batch("train", range(len(data.train)))
    starts = (positions == 0).sum(1)
    assert starts.max() > 1  # packed rows hold several conversations
    with pytest.raises(DataError, match="fit in data.seq_len 8"):
        prepare_data({"path": str(write_chat(tmp_path / "c2.jsonl", 4)), "tokenizer": str(
            tmp_path / "shared-bpe-tokenizer"), "format": "chat", "chat_template": "chatml"}, 512, 8, 0,
            str(tmp_path / "cache"))


@pytest.mark.multiproc
def test_one_loss_per_target_whatever_the_split(engine_runs):
    """The same conversations, 4 rows a step: 1 rank micro 4, 1 rank micro 2 x accumulation 2, 2 ranks micro 2 at
    ZeRO-0 and at ZeRO-3: the same per-step losses (fp32), and they fall on the assistant tokens."""
    ref = engine_runs["sft_micro4", 1]
    losses = ref["losses"]
    assert len(losses) == SFT_STEPS and losses[-1] < losses[0] - 0.5, losses
    for key in (("sft_accum2", 1), ("sft_zero0", 2), ("sft_zero3", 2)):
        assert_losses_close(engine_runs[key]["losses"], losses, 1e-5)


# --------------------------------------------------------------------------------------------------------------
# LoRA


def _gathered(summary: dict) -> dict:
    """The final checkpoint's weights, whole (zero_to_fp32 for stages 1-3: frozen and trainable)."""
    from zero_trainer.checkpoint import newest_complete
    from zero_trainer.export import gather_state_dict

    ckpt = newest_complete(Path(summary["recipe"]["output_dir"]) / "checkpoints")
    return gather_state_dict(ckpt, summary["zero_stage"])


def _base_unchanged(summary: dict) -> None:
    """Every weight of the source comes out of the run's checkpoint bit for bit; the adapters are the rest."""
    from safetensors.torch import load_file

    source = load_file(Path(summary["pretrained"]["path"]) / "model.safetensors")
    weights = _gathered(summary)
    base = {k.removeprefix("base_model.model.").replace(".base_layer.", "."): v for k, v in weights.items()
            if ".lora_" not in k}
    changed = [k for k in source if not torch.equal(base[k].to(source[k].dtype), source[k])]
    assert not changed and set(base) - set(source) <= {"lm_head.weight"}, changed[:3]  # (tied: saved once)
    adapters = [k for k in weights if ".lora_B." in k]
    assert adapters and all(weights[k].abs().sum() > 0 for k in adapters)  # B starts at zero: it trained
    assert summary["trainable_params"] == sum(v.numel() for k, v in weights.items() if ".lora_" in k)


@pytest.mark.multiproc
def test_lora_agrees_across_rungs_and_keeps_the_base_weights(engine_runs):
    """LoRA r 4 on our tied model: 1 rank ZeRO-0 (micro 4), 2 ranks ZeRO-2, and ZeRO-3 + CPU offload stopped at step
    3 and resumed: the same losses (fp32), falling; each leaves the source's weights bit for bit. transformers' Llama:
    ZeRO-0 at 1 rank and ZeRO-3 at 2 agree too."""
    ref = engine_runs["lora_zero0", 1]
    assert len(ref["losses"]) == SFT_STEPS and ref["losses"][-1] < ref["losses"][0], ref["losses"]
    assert ref["trainable_params"] < ref["params"] / 10
    for key in (("lora_zero2", 2), ("lora_offload", 2)):
        assert_losses_close(engine_runs[key]["losses"], ref["losses"], 1e-5)
    assert engine_runs["lora_offload", 2]["resumed_from"]
    llama = engine_runs["lora_llama_zero0", 1]
    assert_losses_close(engine_runs["lora_llama_zero3", 2]["losses"], llama["losses"], 1e-5)
    for key in (("lora_zero0", 1), ("lora_zero2", 2), ("lora_offload", 2), ("lora_llama_zero3", 2)):
        _base_unchanged(engine_runs[key])
        plan = engine_runs[key]["plan"]
        assert plan["trainable_params"] == engine_runs[key]["trainable_params"]


@pytest.mark.multiproc
@pytest.mark.parametrize("key", [("lora_offload", 2), ("lora_llama_zero3", 2), ("lora_random", 1)],
                         ids=["ours-offload", "llama-zero3", "random-init"])
def test_lora_exports_an_adapter_and_a_merged_model(key, engine_runs, tmp_path):
    """`zero-trainer export` of a LoRA run: an adapter PeftModel.from_pretrained loads on the source model (a random
    init's base is written beside it, in `base/`); `--merge`: a plain model whose logits are the PeftModel's."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import zero_trainer.model  # noqa: F401  (registers model_type zero_lm with transformers' Auto classes)
    from zero_trainer.export import export

    summary = engine_runs[key]
    ckpts = Path(summary["recipe"]["output_dir"]) / "checkpoints"
    from zero_trainer.cli import main

    export(ckpts, tmp_path / "adapter")
    assert main(["export", str(ckpts), str(tmp_path / "merged"), "--merge"]) == 0  # the CLI, in this process
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert adapter and all(".lora_" in k for k in adapter)
    source = summary["pretrained"]["path"] if summary["pretrained"] else tmp_path / "adapter" / "base"
    assert summary["pretrained"] or not any(".lora_" in k for k in load_file(Path(source) / "model.safetensors"))
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(source), tmp_path / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    plain = AutoModelForCausalLM.from_pretrained(source).eval()
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, got, before = peft_model(input_ids=ids).logits, merged(input_ids=ids).logits, plain(input_ids=ids).logits
    assert (got - want).abs().max() <= 1e-5 and (want - before).abs().max() > 1e-3
    with pytest.raises(UsageError, match="--overwrite"):  # not empty: refused, kept
        export(ckpts, tmp_path / "merged", merge=True)
    assert (tmp_path / "merged" / "config.json").is_file()
    with pytest.raises(UsageError, match="not a LoRA run"):
        export(Path(engine_runs["sft_zero3", 2]["recipe"]["output_dir"]) / "checkpoints", tmp_path / "x", merge=True)


def test_plan_counts_frozen_weights_without_gradients_or_optimizer_states(capsys):
    """`plan --lora-r 16` on a 7B in 64 GiB: the adapters' gradients and optimizer states only, the weights whole;
    LoRA fits where every weight training does not, and the table says both."""
    from zero_trainer.cli import main
    from zero_trainer.hardware import Hardware
    from zero_trainer.plan import plan_model

    assert main(["plan", "--model", "7b", "--cpu-mem", "64", "--lora-r", "16"]) == 0
    out = capsys.readouterr().out
    assert "LoRA: 39,976,960 of 6,738,415,616 parameters train" in out
    assert "without LoRA (every weight training): nothing fits" in out
    hw = Hardware(nodes=1, gpus_per_node=1, gpu_mem=None, cpu_mem=64 * 2**30)
    lora, full = (plan_model("7b", hw, 2048, 1, "bf16", trainable=t) for t in (39_976_960, None))
    a, b = lora.candidates[0], full.candidates[0]  # zero0, no activation checkpointing
    assert a.device["params"] == b.device["params"] and a.device["optimizer"] == 12 * 39_976_960
    assert lora.chosen is not None and full.chosen is None


def test_committed_sft_run_shows_the_loss_falling_on_assistant_tokens():
    """bench/results/sft.json (`python -m bench.sft`): recipes/sft-minimind.yaml on a minimind-26m export, full and
    LoRA: the loss on assistant tokens falls, and so does the held-out eval loss from the export's."""
    import json

    from bench.common import REPO

    result = json.loads((REPO / "bench" / "results" / "sft.json").read_text())
    for name in ("sft", "lora"):
        r = result[name]
        assert r["final_loss"] < r["first_loss"] - 0.5 and r["eval_loss"] < r["eval_loss_before"], (name, r)
        assert r["data"]["format"] == "chat" and r["data"]["examples"] > 1000
        assert any(line.startswith("data: ") and "conversations" in line for line in r["start_lines"])
    assert result["lora"]["trainable_params"] < result["sft"]["trainable_params"] / 10
