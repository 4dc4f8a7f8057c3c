"""Model parallelism inside a ZeRO run: DeepSpeed AutoTP (tensor parallel) and Ulysses (sequence parallel).

world size = dp × tp × sp. DeepSpeed builds its tensor- and sequence-parallel groups from consecutive ranks
(groups._init_tp_mesh_device, parallel_state_sp.initialize_sequence_parallel), so rank r is in data-parallel
group r // (tp·sp): the ranks of one TP or SP group read the same batch, and an SP group splits its sequence.

  - TP: the `tensor_parallel` block (ds_config.with_model_parallel) makes deepspeed.initialize shard the
    attention and MLP projections; the model reads its local head count from the tensors.
  - SP: Ulysses replaces the model's attention function in transformers' registry (model.py calls attention
    through it) with one that all-to-alls sequence shards into head shards and back; each rank feeds its slice of
    the sequence with global position_ids, and the loss is averaged over the group by token count.
  - parallel.tiled_mlp: DeepSpeed's TiledMLP runs the MLP over sequence tiles (recomputed in backward), so no
    ffn-wide tensor of the whole sequence exists at once (ALST).
  - parallel.tiled_loss: the loss head runs over tiles of tokens, each checkpointed, with DeepSpeed's
    chunked_cross_entropy inside: one tile's logits exist at a time, never the whole sequence's.

The model file knows none of this: this module patches instances after they are built.
"""

import os
import types
from dataclasses import dataclass

from .errors import UsageError
from .plan import loss_tiles, mlp_tiles

# Ulysses needs attention it can wrap: eager materialises a 4-D mask over the whole sequence (ulysses_sp.py).
ULYSSES_REFUSES = ("eager", "paged|eager")


@dataclass(frozen=True)
class Layout:
    tp: int
    sp: int
    dp: int  # data-parallel degree: world size / (tp·sp)
    dp_rank: int  # which batch this rank reads
    sp_rank: int  # which slice of the sequence (0 without SP)

    @classmethod
    def of(cls, recipe, rank: int, world_size: int) -> "Layout":
        p = recipe.parallel
        dp = world_size // p.model_parallel
        if p.pp > 1:  # PipeDataParallelTopology: ranks [0, dp) are stage 0, so consecutive ranks differ in batch
            return cls(1, 1, dp, rank % dp, 0)
        return cls(p.tp, p.sp, dp, rank // p.model_parallel, rank % p.sp)


WHOLE = Layout(tp=1, sp=1, dp=1, dp_rank=0, sp_rank=0)  # whole sequences (eval: Ulysses steps aside)


def check_parallel(recipe, model_cfg, world_size: int) -> None:
    """Every combination this module cannot train, as one UsageError before anything launches."""
    p, seq_len = recipe.parallel, recipe.data.seq_len
    heads = getattr(model_cfg, "num_attention_heads", None)
    kv_heads = getattr(model_cfg, "num_key_value_heads", None) or heads
    if world_size % p.model_parallel:
        used = [k for k in ("tp", "sp", "pp") if getattr(p, k) > 1]
        degrees = " x ".join(f"parallel.{k} {getattr(p, k)}" for k in used)
        product = f" = {p.model_parallel}" if len(used) > 1 else ""
        raise UsageError(f"{degrees}{product} does not divide the world size {world_size}", f"parallel.{used[0]}",
                         f"launch a multiple of {p.model_parallel} ranks, or lower the degrees")
    if p.tp > 1 and p.sp > 1:
        raise UsageError("parallel.tp and parallel.sp together: AutoTP replaces the engine's model-parallel groups, "
                         "so DeepSpeed 0.19.8 cannot combine it with Ulysses", "parallel.tp",
                         "use one of them (sp for long sequences, tp for wide layers)")
    if p.tp * p.sp > 1 and getattr(model_cfg, "num_local_experts", 0):
        field, why = (("parallel.tp", "AutoTP does not split the fused expert tensors") if p.tp > 1 else
                      ("parallel.sp", "the load-balancing loss of sequence slices is not the whole sequence's"))
        raise UsageError(f"{field} on a mixture-of-experts model: {why}", field,
                         "split a MoE with parallel.ep (experts over ranks) instead")
    if p.tp > 1:
        for count, name in ((heads, "attention heads"), (kv_heads, "key/value heads")):
            if count and count % p.tp:
                raise UsageError(f"parallel.tp {p.tp} does not divide the model's {count} {name}", "parallel.tp",
                                 "use a tp that divides both the attention and the key/value head counts")
        ffn = getattr(model_cfg, "intermediate_size", None)
        if ffn and ffn % p.tp:
            raise UsageError(f"parallel.tp {p.tp} does not divide the model's intermediate_size {ffn}", "parallel.tp",
                             "use a tp that divides intermediate_size")
    if p.sp > 1:
        if seq_len % p.sp:
            raise UsageError(f"parallel.sp {p.sp} does not divide data.seq_len {seq_len}", "parallel.sp",
                             f"use a data.seq_len that is a multiple of {p.sp}")
        if heads and heads % p.sp:
            raise UsageError(f"parallel.sp {p.sp} does not divide the model's {heads} attention heads (Ulysses "
                             "gives each rank whole heads)", "parallel.sp", "use an sp that divides the head count")
        if kv_heads and kv_heads % p.sp and p.sp % kv_heads:
            raise UsageError(f"parallel.sp {p.sp} and the model's {kv_heads} key/value heads: one must divide the "
                             "other (Ulysses shards or replicates them)", "parallel.sp",
                             "use an sp that divides the key/value head count, or a multiple of it")
        impl = getattr(model_cfg, "_attn_implementation", None) or "sdpa"
        if impl in ULYSSES_REFUSES:
            raise UsageError(f"parallel.sp needs attention Ulysses can wrap; the model config asks for {impl}",
                             recipe.model_field, "set the config's attn_implementation to sdpa (or a flash "
                             "attention) for sequence parallelism")
        if recipe.data.packing:
            raise UsageError("parallel.sp splits each sequence over ranks, and data.packing's document isolation needs "
                             "a row's whole sequence in attention to build its mask", "data.packing",
                             "set data.packing=false (one document or conversation a row, padded) for sequence "
                             "parallelism")
    if p.tiled_mlp and getattr(model_cfg, "num_local_experts", 0):
        raise UsageError("parallel.tiled_mlp tiles a dense MLP; this model's layers are mixtures of experts",
                         "parallel.tiled_mlp", "turn tiled_mlp off for a MoE model (tiled_loss works)")
    if (p.tiled_mlp or p.tiled_loss) and type(model_cfg).__name__ != "ZeroLMConfig":
        raise UsageError("parallel.tiled_mlp / tiled_loss patch zero_trainer's own model; this config builds "
                         f"{type(model_cfg).__name__.removesuffix('Config')}", "parallel.tiled_mlp",
                         "use a zero_trainer preset (or a zero_lm config.json), or turn tiling off")


def apply(model, recipe, micro_batch: int):
    """Patch a built model for the recipe's SP and tiling. Returns the mpu for deepspeed.initialize (or None)."""
    p = recipe.parallel
    if p.tiled_mlp:
        for layer in model.model.layers:
            layer.mlp.forward = types.MethodType(_tiled_mlp_forward, layer.mlp)
    if p.tiled_loss:
        model.loss_head = types.MethodType(_tiled_loss_head, model)
    if p.sp == 1:
        return None
    from deepspeed.runtime.sequence_parallel import parallel_state_sp
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    parallel_state_sp._SEQUENCE_PARALLEL_GROUP = parallel_state_sp._SEQUENCE_DATA_PARALLEL_GROUP = None
    # eval and sampling run every rank on the whole sequence (disable_in_eval): generation's growing prompt
    # cannot be split evenly
    return UlyssesSPAttentionHF.register_with_transformers(
        model, core_attn_implementation=model.config._attn_implementation, sequence_parallel_size=p.sp,
        micro_batch_size=micro_batch, seq_length_is_variable=True, disable_in_eval=True)


def restore_attention(mpu, model) -> None:
    """Put back the attention function Ulysses replaced (a later run in the same process must not see it)."""
    if mpu is None:
        return
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    impl = model.config._attn_implementation
    ALL_ATTENTION_FUNCTIONS[impl] = type(ALL_ATTENTION_FUNCTIONS)._global_mapping.get(impl, sdpa_attention_forward)


def sequence_slice(batch, layout: Layout):
    """This rank's part of a batch of whole sequences (input ids, positions, next-token targets; B × T each): all of
    it, or with SP its T/sp tokens of each (the targets were shifted before cutting, so the boundary token keeps its
    target; positions stay global)."""
    if layout.sp == 1:
        return batch
    T = batch[0].shape[1]
    chunk = T // layout.sp
    cut = slice(layout.sp_rank * chunk, (layout.sp_rank + 1) * chunk)
    return tuple(t[:, cut].contiguous() for t in batch)  # contiguous: transformers' loss views the targets flat


def items_per_micro_batch(total_targets, layout: Layout, grad_accum: int):
    """What each rank divides its summed loss by (HF's num_items_in_batch), given the targets of the whole step
    (every micro-batch of every data-parallel rank, counted once): total / (grad_accum · dp · sp). DeepSpeed then
    averages the micro-batches and the ranks (SP: see gradient_scale), so the step's gradient is that of the summed
    loss over the total — every learned token weighs the same whatever the accumulation, world size or padding — and
    the mean of the ranks' losses, which the loop logs, is the step's loss per target."""
    return total_targets / (grad_accum * layout.dp * layout.sp)


def gradient_scale(layout: Layout, zero_stage: int) -> float:
    """What backward multiplies the loss by so the gradients are the unsplit run's. DeepSpeed 0.19.8 reduces
    gradients over the SP ranks differently by stage (measured against 1-rank runs, tests/test_parallel.py):
    stage 3 averages them, stages 0-2 sum them, where each rank's sp × share must count once."""
    return 1.0 if layout.sp == 1 or zero_stage == 3 else 1.0 / layout.sp


def _tiled_mlp_forward(self, x):
    """DeepSpeed's TiledMLP over the plan's tiles (ALST's rule, ceil(tokens / hidden)); every rank of the run has
    the same slice length, so they agree on the count."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    params = [self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight]
    return TiledMLP.apply(lambda mlp, t: type(mlp).forward(mlp, t), self, x, mlp_tiles(x.shape[1], x.shape[2]), params)


def _tiled_loss_head(self, hidden, targets, num_items=None):
    """model.loss_head over the plan's tiles of tokens, each under torch.utils.checkpoint, with DeepSpeed's
    chunked_cross_entropy inside: a tile's logits are freed after its forward and recomputed in its backward, so one
    tile's logits exist at a time and the whole sequence's never do. Plain autograd, so any later scaling of the
    loss (accumulation, SP, fp16's loss scale) reaches every gradient (DeepSpeed's TiledFusedLogitsLoss computes the
    head's weight gradient inside forward, assuming an incoming gradient of exactly 1)."""
    import torch
    from deepspeed.runtime.chunked_cross_entropy import chunked_cross_entropy
    from torch.utils.checkpoint import checkpoint

    def tile_loss(h, y):
        return chunked_cross_entropy(self.lm_head(h), y, reduction="sum")

    rows, ys = hidden.flatten(0, 1), targets.flatten()
    tile_bytes = int(os.environ.get("ZERO_TRAINER_TEST_LOSS_TILE_BYTES", 0)) or None  # tests cut small models too
    tiles = loss_tiles(rows.shape[0], self.config.vocab_size, tile_bytes)
    total = sum(checkpoint(tile_loss, h, y, use_reentrant=False)
                for h, y in zip(rows.chunk(tiles), ys.chunk(tiles), strict=True))
    return total / (num_items if num_items is not None else torch.clamp((ys != -100).sum(), min=1)), None
