"""Model presets: shapes as data (ZeroLMConfig fields), read by model.py to build and by plan/shapes.py to count.

Only shapes live here; optimisation knobs live in recipes. Parameter counts are unique parameters, a tied
embedding counted once. No imports: `zero-trainer plan --model 70b` reads this without torch.
"""

PRESETS: dict[str, dict] = {
    # 1.0M
    "debug": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=2048, tie_word_embeddings=True, max_position_embeddings=512),
    # minimind's two dense sizes: 25.8M / 104.0M
    "minimind-26m": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=6400, tie_word_embeddings=True,
                         max_position_embeddings=8192),
    "minimind-104m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=16, num_attention_heads=8,
                          num_key_value_heads=2, vocab_size=6400, tie_word_embeddings=True,
                          max_position_embeddings=8192),
    # Mixture of experts on those shapes (Mixtral's router; each expert the dense FFN's size).
    # debug-moe: 4 experts, top-2 (renormalised top-2 weights give the router a gradient through the main loss).
    "debug-moe": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=2048, tie_word_embeddings=True, max_position_embeddings=512,
                      num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.01),
    # minimind's MoE defaults on minimind-26m: 4 experts, top-1, aux coefficient 5e-4, no shared expert
    "minimind-moe": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=6400, tie_word_embeddings=True,
                         max_position_embeddings=8192, num_local_experts=4, num_experts_per_tok=1,
                         router_aux_loss_coef=5.0e-4),
    # Llama-3.2-1B / 3B shapes with Llama-2's 32k vocabulary: 1.04B / 2.92B
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=True, max_position_embeddings=8192),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=True, max_position_embeddings=8192),
    # Llama-2 shapes: 6.74B / 13.0B / 68.98B
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=4096),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40, vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=4096),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=4096),
    # Llama-3.1-8B's shape with 512k positions: 8.03B, the long-context recipe (ALST trains it at 500k tokens)
    "llama3-8b-512k": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
                           max_position_embeddings=524288, rope_theta=500000.0),
}
