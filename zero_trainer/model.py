"""A Llama-architecture causal LM (RMSNorm, RoPE, GQA, SwiGLU) on transformers' PreTrainedModel.

Parameter names match `transformers.LlamaForCausalLM` (`MixtralForCausalLM` with experts), so a state_dict moves
between the two unchanged and save_pretrained / from_pretrained / generate come from transformers.
Nothing here knows about DeepSpeed.
"""

import copy
import dataclasses
import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationMixin,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.masking_utils import find_packed_sequence_indices
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_MASKED_LM_MAPPING_NAMES
from transformers.models.llama.modeling_llama import eager_attention_forward

from .presets import PRESETS


class ZeroLMConfig(PretrainedConfig):
    # transformers 5 configs are dataclasses: annotated class attributes are the fields (names as in LlamaConfig).
    # Defaults are the `debug` shape, so a bare ZeroLMConfig() is cheap to build.
    model_type = "zero_lm"
    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 352
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None  # None means plain multi-head attention
    max_position_embeddings: int = 512
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    use_cache: bool = False  # no KV cache: generate() re-runs the whole prefix each step
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # Mixture of experts (names as in MixtralConfig): 0 experts is the dense Llama MLP.
    num_local_experts: int = 0
    num_experts_per_tok: int = 1
    router_aux_loss_coef: float = 0.0  # times the load-balancing loss summed over layers, added to the loss

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        super().__post_init__(**kwargs)
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"hidden_size {self.hidden_size}, num_attention_heads {self.num_attention_heads} and "
                             f"num_key_value_heads {self.num_key_value_heads} must divide evenly")
        if self.num_local_experts and not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            raise ValueError(f"num_experts_per_tok {self.num_experts_per_tok} must be between 1 and "
                             f"num_local_experts {self.num_local_experts}")

    @property
    def is_moe(self) -> bool:
        return self.num_local_experts > 0

    def to_hf_config(self) -> PretrainedConfig:
        """The vanilla transformers config computing the same function: Llama, or Mixtral for a MoE."""
        return self.to_mixtral_config() if self.is_moe else self.to_llama_config()

    def to_mixtral_config(self):
        from transformers import MixtralConfig

        llama = self.to_llama_config().to_dict()
        same = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
                "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id", "head_dim", "rope_parameters",
                "hidden_act")
        return MixtralConfig(**{k: llama[k] for k in same}, num_local_experts=self.num_local_experts,
                             num_experts_per_tok=self.num_experts_per_tok,
                             router_aux_loss_coef=self.router_aux_loss_coef, router_jitter_noise=0.0,
                             sliding_window=None, output_router_logits=False)

    def to_llama_config(self) -> LlamaConfig:
        same = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
                "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id")
        # transformers 5 keeps rope_theta inside rope_parameters rather than as a top-level field
        return LlamaConfig(**{k: getattr(self, k) for k in same},
                           rope_parameters={"rope_type": "default", "rope_theta": float(self.rope_theta)},
                           head_dim=self.hidden_size // self.num_attention_heads, hidden_act="silu",
                           attention_bias=False, mlp_bias=False)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 (bf16 squares overflow/underflow), scale in the input dtype, as Llama does
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope_cos_sin(positions, cfg: ZeroLMConfig, dtype):
    # computed per forward instead of cached: nothing to persist, and it is correct after meta -> real materialisation
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, head_dim), broadcast over heads
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    # rotate the two halves (not interleaved pairs): the layout HF Llama checkpoints were permuted into
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    is_causal = True  # read by transformers' attention functions

    def __init__(self, cfg: ZeroLMConfig):
        super().__init__()
        self.config = cfg
        n_head, n_kv_head = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.hidden_size // n_head
        self.num_key_value_groups = n_head // n_kv_head  # GQA: query heads per key/value head
        self.q_proj = nn.Linear(cfg.hidden_size, n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_head * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, position_ids):
        B, T, _ = x.shape
        # head counts come from the tensors: a tensor-parallel rank's projections hold only its share of the heads
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # through transformers' registry (sdpa by default), so a sequence-parallel wrapper such as DeepSpeed's
        # Ulysses can take its place; it returns (B, T, heads, head_dim)
        impl = self.config._attn_implementation
        attend = eager_attention_forward if impl == "eager" else ALL_ATTENTION_FUNCTIONS[impl]
        y, _ = attend(self, q, k, v, mask, scaling=self.head_dim ** -0.5, dropout=0.0, position_ids=position_ids)
        return self.o_proj(y.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ZeroLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# --- mixture of experts ------------------------------------------------------------------------------------
# Mixtral's routing and parameter layout (transformers 5: fused expert tensors), so a MoE checkpoint loads into
# MixtralForCausalLM unchanged. minimind's MoE routes the same way for k > 1 (softmax, top-k, renormalised); at
# k = 1 it keeps the unnormalised probability, Mixtral (and this) a weight of 1.


class TopKRouter(nn.Module):
    def __init__(self, cfg: ZeroLMConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.weight = nn.Parameter(torch.empty(cfg.num_local_experts, cfg.hidden_size))

    def forward(self, x):
        # logits in fp32, as DeepSpeed's gate computes them, so bf16 runs route alike at every expert-parallel size
        probs = F.linear(x.float(), self.weight.float()).softmax(dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        return probs, weights / weights.sum(dim=-1, keepdim=True), experts


class Experts(nn.Module):
    def __init__(self, cfg: ZeroLMConfig):
        super().__init__()
        n, h, i = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(n, 2 * i, h))  # gate rows, then up rows
        self.down_proj = nn.Parameter(torch.empty(n, h, i))

    def forward(self, x, weights, experts):
        out = torch.zeros_like(x)
        # every expert runs, an empty one on zero rows: each rank then gives every weight a gradient
        for e in range(self.gate_up_proj.shape[0]):
            token, slot = torch.where(experts == e)
            gate, up = F.linear(x[token], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down_proj[e]) * weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def load_balancing_loss(probs, experts, num_experts: int):
    """Switch/minimind: num_experts * sum_e (share of routed slots to e) * (mean router probability of e)."""
    share = F.one_hot(experts, num_experts).float().mean(dim=(0, 1))
    return num_experts * (share * probs.mean(dim=0)).sum()


class SparseMoeBlock(nn.Module):
    """The MoE in place of the MLP. Sets `aux_loss` (this layer's load-balancing loss) on every forward.

    A plain module: no collective inside, the same on every ZeRO stage (stage 3 treats it as a leaf module,
    gathering its weights at once). Expert parallelism swaps it for an equivalent DeepSpeed layer (moe.py)."""

    def __init__(self, cfg: ZeroLMConfig):
        super().__init__()
        self.gate = TopKRouter(cfg)
        self.experts = Experts(cfg)
        self.aux_loss = None

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        probs, weights, experts = self.gate(flat)
        self.aux_loss = load_balancing_loss(probs, experts, probs.shape[-1])
        return self.experts(flat, weights, experts).view_as(x)


def attention_bias(position_ids, attention_mask, dtype):
    """The additive attention mask for positions [B, T] (restarting where a packed document starts) and an optional
    padding mask, or None when plain causal attention is right (SDPA's is_causal fast path).

    causal AND (same document) AND (real key); a pad query with no real key would softmax to NaN, so it sees itself.
    Additive, in the activations' dtype: attention saves this one tensor for backward in every layer, where a boolean
    mask would be converted (and saved) again in each."""
    T, device = position_ids.shape[-1], position_ids.device
    documents = find_packed_sequence_indices(position_ids)  # positions restarting: several documents a row
    padded = attention_mask is not None and not bool(attention_mask.all())
    if documents is None and not padded:
        return None
    mask = torch.ones(T, T, dtype=torch.bool, device=device).tril()[None, None]
    if documents is not None:
        mask = mask & (documents[:, None, :, None] == documents[:, None, None, :])
    if padded:
        mask = (mask & attention_mask.bool()[:, None, None, :]) | torch.eye(T, dtype=torch.bool, device=device)
    return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)


class DecoderLayer(GradientCheckpointingLayer):
    # GradientCheckpointingLayer wraps forward in torch.utils.checkpoint once activation checkpointing is enabled
    def __init__(self, cfg: ZeroLMConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SparseMoeBlock(cfg) if cfg.is_moe else MLP(cfg)

    def forward(self, x, cos, sin, mask, position_ids):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, position_ids)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderStack(nn.Module):  # exists for the `model.` prefix in Llama's parameter names
    def __init__(self, cfg: ZeroLMConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class ZeroLMForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = ZeroLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True  # the default attention; "eager" and the registry's others work too
    _supports_flash_attn = True
    _no_split_modules = ["DecoderLayer"]
    # transformers 5 format: {tied parameter: its source}; applied only when config.tie_word_embeddings
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: ZeroLMConfig):
        super().__init__(config)
        self.model = DecoderStack(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()  # init weights (skipped on meta) and tie lm_head to embed_tokens

    def _init_weights(self, module):
        # transformers' init_* skip tensors already loaded by from_pretrained
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, (TopKRouter, Experts)):
            for param in module.parameters(recurse=False):
                init.normal_(param, mean=0.0, std=self.config.initializer_range)

    def forward(self, input_ids, attention_mask=None, position_ids=None, labels=None, shift_labels=None,
                num_items_in_batch=None, **kwargs):
        B, T = input_ids.shape
        x = self.model.embed_tokens(input_ids)
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        cos, sin = rope_cos_sin(position_ids, self.config, x.dtype)
        mask = attention_bias(position_ids, attention_mask, x.dtype)  # built once a forward, shared by every layer
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, position_ids)
        x = self.model.norm(x)
        loss = logits = None
        if labels is None and shift_labels is None:
            logits = self.lm_head(x)
        else:
            if shift_labels is None:  # HF convention: labels are the inputs; position t predicts t + 1
                shift_labels = F.pad(labels[:, 1:], (0, 1), value=-100)
            loss, logits = self.loss_head(x, shift_labels, num_items_in_batch)
        if not self.config.is_moe:
            return CausalLMOutputWithPast(loss=loss, logits=logits)
        aux_loss = sum(layer.mlp.aux_loss for layer in self.model.layers)  # minimind: summed over layers
        if loss is not None:
            loss = loss + self.config.router_aux_loss_coef * aux_loss
        return MoeCausalLMOutputWithPast(loss=loss, logits=logits, aux_loss=aux_loss)

    def loss_head(self, hidden, targets, num_items=None):
        """Summed next-token cross entropy over num_items (default: the targets that are not -100), as HF's
        ForCausalLMLoss with num_items_in_batch; fp32 so the log-softmax is stable under bf16. Returns (loss,
        logits). A sequence-parallel rank passes the whole sequence's count, so the slices' losses add up."""
        logits = self.lm_head(hidden)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
        return loss / (num_items if num_items is not None else (targets != -100).sum()), logits


# exist_ok: a second import (e.g. under another module name) re-registers instead of raising; the latest wins
AutoConfig.register(ZeroLMConfig.model_type, ZeroLMConfig, exist_ok=True)
AutoModelForCausalLM.register(ZeroLMConfig, ZeroLMForCausalLM, exist_ok=True)


def model_config(preset_or_config, **overrides) -> PretrainedConfig:
    """A preset name, a config, a dict of ZeroLMConfig kwargs, or a local config.json (file or folder)."""
    src = preset_or_config
    if isinstance(src, str) and src in PRESETS:
        src = PRESETS[src]
    if isinstance(src, dict):
        kwargs = {**src, **overrides}
        # ZeroLMConfig would keep a misspelt key as a stray attribute; recipes are data, so fail loudly instead
        if unknown := set(kwargs) - {f.name for f in dataclasses.fields(ZeroLMConfig)}:
            raise ValueError(f"unknown ZeroLMConfig field(s): {', '.join(sorted(unknown))}")
        return ZeroLMConfig(**kwargs)
    if isinstance(src, (str, os.PathLike)):
        if not os.path.exists(src):
            raise ValueError(f"unknown model preset '{src}'; choose one of: {', '.join(PRESETS)} "
                             "(or give a dict, a config, or a local config.json)")
        src = AutoConfig.from_pretrained(src, trust_remote_code=False, local_files_only=True)
    elif not isinstance(src, PretrainedConfig):
        raise TypeError(f"expected a preset name, dict, config or path, got {type(src).__name__}")
    check_causal_decoder(src)
    cfg = copy.deepcopy(src)
    for key, value in overrides.items():
        if not hasattr(cfg, key):
            raise ValueError(f"{type(cfg).__name__} has no field '{key}'")
        setattr(cfg, key, value)
    return cfg


def next_token_loss(model, input_ids, targets, position_ids=None, num_items=None):
    """The training loss of any causal LM here, ours or transformers': fp32 cross entropy of each position's next
    token, summed over the targets that are not -100 and divided by num_items (default: their count) —
    transformers' ForCausalLMLoss with shift_labels. `targets` are already shifted (a sequence-parallel rank's
    slice keeps its boundary token's target). `labels` goes too: transformers' classes compute a loss only when
    given labels, and shift_labels then takes their place. Returns the model's output."""
    return model(input_ids=input_ids, position_ids=position_ids, labels=targets, shift_labels=targets,
                 num_items_in_batch=num_items, use_cache=False)  # no cache: transformers reads packing from positions


def check_causal_decoder(cfg: PretrainedConfig) -> None:
    """Refuse a config AutoModelForCausalLM would build as something other than a causal decoder.

    Encoders (BERT, RoBERTa, ...) are in MODEL_FOR_CAUSAL_LM_MAPPING too, but their "causal LM" attends to future
    tokens unless the config says is_decoder; encoder-decoders train only their decoder half there.
    """
    kind = cfg.model_type
    if type(cfg) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(f"model_type '{kind}' is not a causal LM in transformers' MODEL_FOR_CAUSAL_LM_MAPPING")
    if getattr(cfg, "is_encoder_decoder", False):
        raise ValueError(f"model_type '{kind}' is an encoder-decoder config, not a causal decoder LM")
    if kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(cfg, "is_decoder", False):
        raise ValueError(f"model_type '{kind}' is an encoder (bidirectional attention: its LM head would see future "
                         "tokens) unless its config sets \"is_decoder\": true")


def supports_checkpointing(cfg: PretrainedConfig) -> bool:
    """Whether the model class this config builds can recompute activations (gradient_checkpointing_enable)."""
    if isinstance(cfg, ZeroLMConfig):
        return ZeroLMForCausalLM.supports_gradient_checkpointing
    cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(cfg)] if type(cfg) in MODEL_FOR_CAUSAL_LM_MAPPING else None
    return bool(getattr(cls, "supports_gradient_checkpointing", False))


def build_model(preset_or_config, **overrides) -> nn.Module:
    """Random-init model; under `with torch.device("meta"):` it allocates nothing."""
    cfg = model_config(preset_or_config, **overrides)
    # fp32, whatever dtype a pretrained config.json records: DeepSpeed casts to the run's precision (bf16 weights
    # under an fp32 run would train in bf16 silently); under zero.Init its dtype applies.
    if isinstance(cfg, ZeroLMConfig):
        # _from_config, like AutoModel.from_config, honours a live HfDeepSpeedConfig: at ZeRO-3 it builds
        # under deepspeed.zero.Init and initialises the gathered weights.
        return ZeroLMForCausalLM._from_config(cfg, dtype=torch.float32)
    return AutoModelForCausalLM.from_config(cfg, trust_remote_code=False, dtype=torch.float32)


def param_sizes(preset_or_config, **overrides) -> list[int]:
    """Elements of every unique parameter (tied embeddings once), from a meta-device build: allocates nothing."""
    with torch.device("meta"):
        model = build_model(preset_or_config, **overrides)
    return [p.numel() for p in model.parameters()]


def count_params(preset_or_config, **overrides) -> int:
    return sum(param_sizes(preset_or_config, **overrides))


def count_active_params(preset_or_config, **overrides) -> int:
    """Parameters one token uses, from a meta-device build: all of a dense model's; of a MoE's fused expert tensors
    ([experts, ...]), only the share of the num_experts_per_tok experts its router picks."""
    cfg = model_config(preset_or_config, **overrides)
    with torch.device("meta"):
        model = build_model(cfg)
    used = getattr(cfg, "num_experts_per_tok", 1)
    return sum(p.numel() * used // p.shape[0] if name.endswith(("experts.gate_up_proj", "experts.down_proj"))
               else p.numel() for name, p in model.named_parameters())
