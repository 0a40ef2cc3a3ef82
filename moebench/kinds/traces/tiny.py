"""Tiny randomly initialised transformers MoE models built from configs (no hub access), for
the recorder's tests and for making the small committed trace. Imports transformers."""

from __future__ import annotations

import torch

COMMON = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)

# Per family: the smallest config that exercises its routing (E=8, k=2; DeepSeek-V3 with 4
# groups of which 2 are kept, a dense first layer and a routed scaling factor).
TINY: dict[str, dict] = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                      shared_expert_intermediate_size=32, norm_topk_prob=False),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True, head_dim=8),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, eos_token_id=None, pad_token_id=None),
    "deepseek_v2": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
                        first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=8, topk_method="greedy", routed_scaling_factor=1.5,
                        num_key_value_heads=4),
    "deepseek_v3": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
                        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=8, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                        num_hidden_layers=3, num_key_value_heads=4, rope_scaling=None),
    "gpt_oss": dict(num_local_experts=8, num_experts_per_tok=2, head_dim=8, sliding_window=16,
                    layer_types=["sliding_attention", "full_attention"]),
}


def tiny_config(model_type: str, **overrides):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **{**COMMON, **TINY[model_type], **overrides})


def tiny_model(model_type: str, seed: int = 0, router_std: float = 0.5, **overrides):
    """A tiny eval-mode model of ``model_type``. Router gates are redrawn N(0, router_std^2) so
    routing is far from ties; a selection bias (DeepSeek-V3) is drawn U(-0.05, 0.05) so it
    changes some choices."""
    from transformers import AutoModelForCausalLM

    from moebench.kinds.traces.families import router_modules

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, _, module in router_modules(model):
            module.weight.copy_(torch.randn(module.weight.shape, generator=g) * router_std)
            bias = getattr(module, "e_score_correction_bias", None)
            if bias is not None:
                bias.copy_((torch.rand(bias.shape, generator=g) - 0.5) * 0.1)
    return model
