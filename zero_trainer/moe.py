"""Expert parallelism: the model's MoE blocks as DeepSpeed MoE layers whose experts are split over `ep` ranks.

model.SparseMoeBlock is the MoE everywhere else (ep=1 at any ZeRO stage; a leaf module at ZeRO-3). With ep > 1
(ZeRO-1/2: DeepSpeed refuses its native MoE under ZeRO-3) each block becomes a `deepspeed.moe.layer.MoE`, so the
engine finds it, creates the expert groups, keeps expert gradients out of the data-parallel all-reduce, builds the
optimizer's expert parameter groups (split_params_into_different_moe_groups_for_optimizer) and saves each expert
in its own file. DeepSpeed's stock gate would compute another function (capacity-based dropping, random token
selection, a sampled second expert, unnormalised top-1 weights); MixtralGate keeps DeepSpeed's dispatch and
all-to-all but routes as SparseMoeBlock and Mixtral do: softmax in fp32, top-k, renormalised, no token dropped
(capacity = the busiest expert's load across the expert group).

Parameter names are DeepSpeed's (`mlp.deepspeed_moe.gate.wg.weight`,
`mlp.deepspeed_moe.experts.deepspeed_experts.<local>.{gate,up,down}_proj.weight`); `mixtral_state_dict` maps a
checkpoint back to the model's (Mixtral's) names for export. This module imports deepspeed: import it only where
DeepSpeed is loaded anyway.
"""

import re
from pathlib import Path

import torch
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import TopKGate, topkgating
from deepspeed.utils import groups

from .model import MLP, SparseMoeBlock

EXPERT_FILE = re.compile(r"layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt")
NATIVE_EXPERT = re.compile(r"(.*)\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(gate|up|down)_proj\.weight")
NATIVE_GATE = ".deepspeed_moe.gate.wg.weight"


def expert_parallel(model: torch.nn.Module, ep: int) -> torch.nn.Module:
    """Swap every SparseMoeBlock of `model` (built and initialised in full on every rank) for a DeepSpeed MoE layer
    holding this rank's share of its experts and the same weights. Call after deepspeed.init_distributed."""
    name = f"ep_size_{ep}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep)  # what MoE.set_deepspeed_parallelism would do in initialize
    ep_rank = groups._get_expert_parallel_rank(name)
    for layer in model.model.layers:
        if isinstance(layer.mlp, SparseMoeBlock):
            layer.mlp = ExpertParallelMoE(model.config, layer.mlp, ep, ep_rank)
    return model


def optimizer_groups(model: torch.nn.Module) -> list[dict]:
    """The parameter groups DeepSpeed's optimizer needs with expert parallelism: experts apart, per expert group."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    params = [p for p in model.parameters() if p.requires_grad]
    return split_params_into_different_moe_groups_for_optimizer({"params": params, "name": "dense-params"})


class MixtralGate(TopKGate):
    def forward(self, input, used_token=None, sparse_routes=False, use_tutel=False):
        logits = torch.nn.functional.linear(input.float(), self.wg.weight.float())
        # topkgating, DeepSpeed's general top-k path: softmax, top-k, renormalise; drop_tokens=False sizes the
        # buffers to the busiest expert (all-reduced over the expert group), so no token is dropped
        return topkgating(logits, self.k, 1.0, 0, drop_tokens=False, ep_group=self.ep_group,
                          sparse_routes=sparse_routes)


class ExpertParallelMoE(MoE):
    """deepspeed.moe's MoE routed by MixtralGate; like SparseMoeBlock, returns the output and sets `aux_loss`."""

    def __init__(self, cfg, block: SparseMoeBlock, ep: int, ep_rank: int):
        super().__init__(cfg.hidden_size, MLP(cfg), num_experts=cfg.num_local_experts, ep_size=ep,
                         k=cfg.num_experts_per_tok, drop_tokens=False, use_rts=False, min_capacity=0,
                         top2_2nd_expert_sampling=False)
        gate = MixtralGate(cfg.hidden_size, cfg.num_local_experts, cfg.num_experts_per_tok, drop_tokens=False,
                           use_rts=False, min_capacity=0)
        self.deepspeed_moe.gate = gate
        self.aux_loss = None
        with torch.no_grad():
            gate.wg.weight.copy_(block.gate.weight)
            inter = cfg.intermediate_size
            for local, expert in enumerate(self.deepspeed_moe.experts.deepspeed_experts):
                e = ep_rank * self.num_local_experts + local  # the all-to-all sends expert e to ep rank e // local
                expert.gate_proj.weight.copy_(block.experts.gate_up_proj[e, :inter])
                expert.up_proj.weight.copy_(block.experts.gate_up_proj[e, inter:])
                expert.down_proj.weight.copy_(block.experts.down_proj[e])

    def forward(self, x):
        out, self.aux_loss, _ = super().forward(x)
        return out


def is_expert_parallel_checkpoint(ckpt: Path) -> bool:
    return any(EXPERT_FILE.fullmatch(p.name) for p in ckpt.iterdir())


def mixtral_state_dict(ckpt: Path) -> dict:
    """An expert-parallel checkpoint's weights under the model's (Mixtral's) names, fp32: the non-expert module
    state DeepSpeed saved (mp_rank_00_model_states.pt) and one file per expert (global ids), fused per layer."""
    module = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    state = {k.replace(NATIVE_GATE, ".gate.weight"): v.float() for k, v in module.items()}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for path in sorted(ckpt.iterdir()):
        if not EXPERT_FILE.fullmatch(path.name):
            continue
        for key, value in torch.load(path, map_location="cpu", weights_only=False).items():
            prefix, e, proj = NATIVE_EXPERT.fullmatch(key).groups()
            experts.setdefault(prefix, {}).setdefault(int(e), {})[proj] = value.float()
    for prefix, by_id in experts.items():
        ids = sorted(by_id)
        assert ids == list(range(len(ids))), f"{ckpt}: experts {ids} of {prefix}"
        state[f"{prefix}.experts.gate_up_proj"] = torch.stack(
            [torch.cat([by_id[e]["gate"], by_id[e]["up"]]) for e in ids])
        state[f"{prefix}.experts.down_proj"] = torch.stack([by_id[e]["down"] for e in ids])
    return state
