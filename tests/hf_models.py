"""Tiny transformers MoE models built from their configs (random weights: the hub is never reached).

Each family gets 2 layers, hidden 64, 8 experts, vocab 256, every layer sparse, and the routing options
that tell its rule apart from its neighbours' (a scale other than 1, a non-zero selection bias, groups),
so a conversion that dropped one of them would no longer match.
"""

from __future__ import annotations

import torch

SMALL = dict(hidden_size=64, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256, num_local_experts=8,
             num_experts=8, n_routed_experts=8, max_position_embeddings=256, first_k_dense_replace=0,
             mlp_only_layers=[], decoder_sparse_step=1, moe_layer_start_index=0)

#: per family: config overrides beyond SMALL
FAMILIES = {
    "mixtral": {},
    "qwen2_moe": {"shared_expert_intermediate_size": 48},
    "qwen3_moe": {"norm_topk_prob": True, "num_experts_per_tok": 2},
    "olmoe": {"num_experts_per_tok": 2},
    "granitemoe": {},
    "deepseek_v2": {"num_key_value_heads": 4, "head_dim": 8, "num_experts_per_tok": 2, "n_shared_experts": 1,
                    "routed_scaling_factor": 2.5, "topk_method": "group_limited_greedy", "n_group": 2,
                    "topk_group": 1, "q_lora_rank": None, "kv_lora_rank": 16, "qk_rope_head_dim": 8,
                    "qk_nope_head_dim": 8, "v_head_dim": 16},
    "deepseek_v3": {"num_key_value_heads": 4, "head_dim": 8, "num_experts_per_tok": 2, "n_shared_experts": 1,
                    "routed_scaling_factor": 2.5, "n_group": 2, "topk_group": 1, "norm_topk_prob": True,
                    "q_lora_rank": None, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
                    "v_head_dim": 16},
    "glm4_moe": {"num_experts_per_tok": 2, "n_shared_experts": 1, "routed_scaling_factor": 1.5, "n_group": 2,
                 "topk_group": 1},
    "gpt_oss": {"num_experts_per_tok": 2, "layer_types": ["full_attention", "full_attention"]},
    "minimax": {"layer_types": ["full_attention", "full_attention"]},
    "jamba": {"attn_layer_period": 1, "attn_layer_offset": 0, "expert_layer_period": 1, "expert_layer_offset": 0},
    "ernie4_5_moe": {"num_experts_per_tok": 2, "moe_num_shared_experts": 1, "tie_word_embeddings": True},
    "hunyuan_v1_moe": {"moe_topk": 2, "num_experts_per_tok": 2},
    "phimoe": {},
}
#: families whose block deploytool refuses, with a word of the reason
REFUSED = {"phimoe": "no routing rule"}


def tiny_config(family: str, **overrides):
    from transformers import AutoConfig

    default = AutoConfig.for_model(family)
    wanted = {**SMALL, **FAMILIES.get(family, {}), **overrides}
    return AutoConfig.for_model(family, **{k: v for k, v in wanted.items()
                                            if hasattr(default, k) or k in FAMILIES.get(family, {}) or k in overrides})


def tiny_model(family: str, *, seed: int = 0, **overrides):
    """The family's causal LM at random weights, in eval mode, with non-zero selection biases."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides)).eval()
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith("e_score_correction_bias"):
                tensor.copy_(torch.rand_like(tensor) * 0.1)
    return model
