"""Every Hugging Face causal-LM family users bring trains, resumes and exports: transformers' own classes (Llama, Qwen2,
Mistral, Mixtral, Phi3, Gemma2; tests/hf_families.py) in real 2-rank DeepSpeed engines (conftest.family_runs, one
launch), the loss computed by the same call as for zero_trainer's model (model.next_token_loss).

  - from config.json (random init) at ZeRO-2 and ZeRO-3: the loss falls, and the two stages give the same losses
    (ZeRO is exact in fp32); the ZeRO-3 run stopped at step 2 and resumed, so the resume is exact too;
  - the export loads in vanilla transformers and reproduces the run's final eval loss on the same held-out blocks;
  - from the saved weights (model.pretrained, lr 0) at ZeRO-3: each rank read only its partitions, and the export is
    the source checkpoint bit for bit (Mixtral's per-expert layout and Gemma2's bf16 included), its logits those of
    from_pretrained(source).
"""

from pathlib import Path

import pytest
from conftest import FAMILY_STEPS, assert_losses_close
from hf_families import FAMILIES

pytestmark = pytest.mark.multiproc


def _export(summary: dict, out: Path) -> Path:
    from zero_trainer.export import export

    return export(Path(summary["recipe"]["output_dir"]) / "checkpoints", out)


def _eval_loss(model_dir: Path, summary: dict) -> float:
    """The trainer's evaluate() over the exported model: the same held-out rows per data-parallel rank (dp = world
    size here), the same batches (documents apart) and loss call, weighted by targets."""
    import torch
    from transformers import AutoModelForCausalLM

    from zero_trainer.data import eval_indices
    from zero_trainer.model import model_config, next_token_loss
    from zero_trainer.recipe import Recipe, set_field
    from zero_trainer.resolve import load_data

    recipe = Recipe()
    for section, fields in summary["recipe"].items():
        if isinstance(fields, dict):
            for key, value in fields.items():
                set_field(recipe, f"{section}.{key}", value, "summary")
    data = load_data(recipe, model_config(recipe.model_source).vocab_size)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    train, dp, total, count = recipe.train, summary["world_size"], 0.0, 0
    with torch.no_grad():
        for rank in range(dp):
            for b in range(train.eval_batches):
                idx = eval_indices(b, train.micro_batch, rank, dp, len(data.eval))
                ids, positions, targets = (torch.from_numpy(a) for a in data.batch("eval", idx))
                n = int((targets != -100).sum())
                total += n * next_token_loss(model, ids, targets, positions).loss.item()
                count += n
    return total / count


@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_at_zero2_and_zero3_resumes_and_exports(family, engine_runs, tmp_path):
    z2, z3 = engine_runs[f"{family}_zero2", "families"], engine_runs[f"{family}_zero3", "families"]
    assert z2["steps"] == FAMILY_STEPS and z3["resumed_from"] and z3["zero_stage"] == 3
    losses = z2["losses"]
    assert losses[-1] < losses[0], losses
    assert_losses_close(z3["losses"], losses, 1e-4)  # stage 3 and the stop/resume change nothing
    out = _export(z2, tmp_path / "export")
    assert abs(_eval_loss(out, z2) - z2["eval_loss"]) < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_family_pretrained_round_trip_is_bit_exact(family, engine_runs, tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    summary = engine_runs[f"{family}_pretrained_zero3", "families"]
    source = Path(summary["recipe"]["model"]["pretrained"])
    assert summary["pretrained"]["path"] == str(source.resolve()) and summary["zero_stage"] == 3
    out = _export(summary, tmp_path / "export")
    want, got = load_file(source / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(got) == sorted(want)  # transformers' saved layout (Mixtral: per-expert w1/w2/w3)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
        b = AutoModelForCausalLM.from_pretrained(source).eval()(ids).logits
    assert torch.equal(a, b)


def test_zero3_ranks_read_only_their_partitions(engine_runs):
    """Each rank read its own flat partition of every tensor, never a whole one it does not own: together the two
    ranks read the checkpoint's tensor bytes once, each about half (partitions are ceil(numel / 2) elements)."""
    from zero_trainer.pretrained import read_index

    for family in FAMILIES:
        summary = engine_runs[f"{family}_pretrained_zero3", "families"]
        index = read_index(summary["recipe"]["model"]["pretrained"])
        total = sum(t.numel * t.itemsize for t in index.values())
        per_rank = summary["load_bytes_per_rank"]
        assert sum(per_rank) == total, (family, per_rank, total)
        assert max(per_rank) - min(per_rank) <= 4 * len(index), (family, per_rank)
