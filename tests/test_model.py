import importlib.util
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, ViTConfig

import zero_trainer.model as zm
from zero_trainer.model import PRESETS, ZeroLMConfig, ZeroLMForCausalLM, build_model, count_params, model_config

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, rope_theta=500000.0)


def _pair(**kw):
    """Our model and a vanilla LlamaForCausalLM holding the same weights, both in eval mode."""
    torch.manual_seed(0)
    ours = build_model({**TINY, **kw}).eval()
    ref = LlamaForCausalLM(ours.config.to_llama_config()).eval()
    ref.load_state_dict(ours.state_dict())  # strict: the parameter names are Llama's
    return ours, ref


@pytest.mark.parametrize("kw", [dict(num_key_value_heads=2, tie_word_embeddings=False),
                                dict(num_key_value_heads=4, tie_word_embeddings=True)], ids=["untied-gqa", "tied-mha"])
def test_logits_and_loss_match_llama(kw):
    ours, ref = _pair(**kw)
    ids = torch.randint(0, 256, (2, 24))
    labels = ids.clone()
    labels[0, :5] = -100  # e.g. a masked prompt
    a, b = ours(ids, labels=labels), ref(input_ids=ids, labels=labels)
    assert (a.logits - b.logits).abs().max() <= 1e-4
    assert torch.allclose(a.loss, b.loss, atol=1e-5)
    assert a.loss.dtype == torch.float32
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == kw["tie_word_embeddings"]


def test_padded_batch_matches_llama():
    ours, ref = _pair(num_key_value_heads=2)
    ids = torch.randint(0, 256, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    a, b = ours(ids, attention_mask=mask).logits, ref(input_ids=ids, attention_mask=mask).logits
    assert not a.isnan().any()
    assert (a[0, 4:] - b[0, 4:]).abs().max() <= 1e-4 and (a[1] - b[1]).abs().max() <= 1e-4


def test_no_rope_buffers_in_state_dict():
    ours, _ = _pair()
    assert not list(ours.buffers())
    assert set(ours.state_dict()) == set(LlamaForCausalLM(ours.config.to_llama_config()).state_dict())


@pytest.mark.parametrize("preset,check", [
    ("debug", lambda n: 0.9e6 < n < 1.1e6),
    ("minimind-26m", lambda n: round(n / 1e6, 2) == 25.83),
    ("minimind-104m", lambda n: abs(n / 104e6 - 1) < 0.02),
    ("1b", lambda n: 1.0e9 < n < 1.3e9),
    ("3b", lambda n: 2.8e9 < n < 3.2e9),
    ("7b", lambda n: round(n / 1e9, 2) == 6.74),
    ("13b", lambda n: round(n / 1e9, 1) == 13.0),
    ("70b", lambda n: round(n / 1e9, 2) == 68.98),
])
def test_preset_param_counts(preset, check):
    assert check(count_params(preset)), count_params(preset)


def test_presets_match_llama_param_counts():
    # the same shape built by transformers' Llama must have exactly as many parameters
    for name in ("minimind-26m", "7b"):
        with torch.device("meta"):
            ref = LlamaForCausalLM(model_config(name).to_llama_config())
        assert sum(p.numel() for p in ref.parameters()) == count_params(name)


def test_meta_build_allocates_nothing():
    with torch.device("meta"):
        model = build_model("7b")
    assert {p.device.type for p in model.parameters()} == {"meta"}
    # materialise and initialise later, as a sharded trainer would
    with torch.device("meta"):
        small = build_model("debug")
    small.to_empty(device="cpu")
    small.init_weights()
    out = small(torch.randint(0, 2048, (1, 8)), labels=torch.randint(0, 2048, (1, 8)))
    assert torch.isfinite(out.loss) and small.lm_head.weight is small.model.embed_tokens.weight
    assert torch.equal(small.model.norm.weight, torch.ones(128))


def test_count_70b_is_fast():
    t0 = time.perf_counter()
    count_params("70b")
    assert time.perf_counter() - t0 < 2.0


def _loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_activation_checkpointing_same_loss_and_grads():
    torch.manual_seed(0)
    model = build_model("debug").train()
    ids = torch.randint(0, 2048, (2, 32))
    loss0, grads0 = _loss_and_grads(model, ids)

    gate_calls = []
    model.model.layers[0].mlp.gate_proj.register_forward_hook(lambda *_: gate_calls.append(1))
    # transformers 5.24 name; `gradient_checkpointing_enable` is its deprecated alias
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    loss1, grads1 = _loss_and_grads(model, ids)
    # forward + recompute in backward: the block really was checkpointed. (Hook a leaf: non-reentrant checkpoint stops
    # recomputing once it has every saved tensor, so the MLP module itself never finishes a second forward.)
    assert len(gate_calls) == 2
    assert torch.equal(loss0, loss1)
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_enable_alias():
    model = build_model("debug")
    with pytest.warns(FutureWarning):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert all(layer.gradient_checkpointing for layer in model.model.layers)


def test_generate_without_cache_matches_llama():
    ours, ref = _pair(num_key_value_heads=2)
    prompt = torch.randint(0, 256, (1, 6))
    out = ours.generate(prompt, max_new_tokens=8, do_sample=False)
    assert out.shape == (1, 14)
    assert torch.equal(out, ref.generate(prompt, max_new_tokens=8, do_sample=False))


def test_save_and_auto_load_roundtrip(tmp_path):
    ours, _ = _pair()
    ours.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, ZeroLMForCausalLM) and loaded.config.rope_theta == 500000.0
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = torch.randint(0, 256, (1, 10))
    assert torch.equal(loaded(ids).logits, ours(ids).logits)


def test_unknown_preset_and_field():
    with pytest.raises(ValueError, match="unknown model preset '7B'; choose one of: debug, ") as err:
        model_config("7B")
    assert "\n" not in str(err.value) and all(name in str(err.value) for name in PRESETS)
    with pytest.raises(ValueError, match="hiden_size"):
        model_config("debug", hiden_size=256)


def test_overrides_and_config_inputs():
    cfg = model_config("debug", num_hidden_layers=2, rope_theta=1e6)
    assert isinstance(cfg, ZeroLMConfig) and cfg.num_hidden_layers == 2 and cfg.hidden_size == 128
    again = model_config(cfg, vocab_size=4096)
    assert again.vocab_size == 4096 and cfg.vocab_size == 2048  # the input is not mutated
    assert ZeroLMConfig(num_attention_heads=4).num_key_value_heads == 4


def test_local_llama_config_json(tmp_path):
    LlamaConfig(**{k: v for k, v in TINY.items() if k != "rope_theta"}).save_pretrained(tmp_path)
    for source in (tmp_path, tmp_path / "config.json", str(tmp_path)):
        model = build_model(source, num_hidden_layers=1)
        assert type(model) is LlamaForCausalLM and model.config.num_hidden_layers == 1


def test_non_causal_config_json_rejected(tmp_path):
    ViTConfig().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'vit' is not a causal LM") as err:
        model_config(tmp_path)
    assert "\n" not in str(err.value)


def test_second_import_registers_again():
    spec = importlib.util.spec_from_file_location("zero_trainer.zero_lm_copy", zm.__file__)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))  # must not raise "already used"


# --- mixture of experts -------------------------------------------------------------------------------------

MOE = dict(TINY, num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.01)


@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_logits_match_mixtral_and_loss_adds_aux(top_k):
    from transformers import MixtralForCausalLM

    torch.manual_seed(0)
    ours = build_model({**MOE, "num_experts_per_tok": top_k}).eval()
    ref = MixtralForCausalLM(ours.config.to_hf_config()).eval()
    ref.load_state_dict(ours.state_dict())  # strict: Mixtral's names and fused expert layout
    ids = torch.randint(0, 256, (2, 24))
    a, b = ours(ids, labels=ids), ref(input_ids=ids, labels=ids)
    assert (a.logits - b.logits).abs().max() <= 1e-4
    assert torch.allclose(a.loss, b.loss + 0.01 * a.aux_loss, atol=1e-6)
    assert a.aux_loss == sum(layer.mlp.aux_loss for layer in ours.model.layers)  # summed over layers


def test_load_balancing_loss_is_1_when_balanced_and_num_experts_when_collapsed():
    from zero_trainer.model import load_balancing_loss

    uniform = torch.full((8, 4), 0.25)
    balanced = torch.arange(8).remainder(4)[:, None]
    assert load_balancing_loss(uniform, balanced, 4).item() == pytest.approx(1.0)
    collapsed = torch.zeros(8, 4)
    collapsed[:, 0] = 1.0
    assert load_balancing_loss(collapsed, torch.zeros(8, 1, dtype=torch.long), 4).item() == pytest.approx(4.0)


def test_moe_router_gets_a_gradient_from_the_main_loss_only_with_top_k_above_1():
    for top_k, grad in ((1, False), (2, True)):
        torch.manual_seed(0)
        model = build_model({**MOE, "num_experts_per_tok": top_k, "router_aux_loss_coef": 0.0})
        ids = torch.randint(0, 256, (2, 16))
        model(ids, labels=ids).loss.backward()
        norm = model.model.layers[0].mlp.gate.weight.grad.norm().item()
        assert (norm > 1e-4) if grad else (norm < 1e-6), (top_k, norm)  # top-1: weight 1 (up to rounding)


def test_moe_preset_counts():
    from zero_trainer.model import count_active_params

    assert round(count_params("minimind-moe") / 1e6, 2) == 77.75
    assert round(count_active_params("minimind-moe") / 1e6, 2) == 25.85  # minimind-26m + 8 routers
    assert count_active_params("minimind-26m") == count_params("minimind-26m")
    assert round(count_params("debug-moe") / 1e6, 2) == 2.62
    assert round(count_active_params("debug-moe") / 1e6, 2) == 1.54
