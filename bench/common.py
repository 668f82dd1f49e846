"""Shared pieces of the GPU scripts: the gemma-3-4b-it config, prompt ids, a timestamped log."""

from __future__ import annotations

import time

import torch

# google/gemma-3-4b-it (its hub config.json).
_N_LAYERS = 34
GEMMA3_4B_CONFIG = dict(
    text_config=dict(
        vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=_N_LAYERS,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
        sliding_window=1024, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh", attention_bias=False,
        attn_logit_softcapping=None, final_logit_softcapping=None, max_position_embeddings=131072,
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(_N_LAYERS)],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}},
        tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=2),
    vision_config=dict(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
        image_size=896, patch_size=14, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
        vision_use_head=False),
    mm_tokens_per_image=256, boi_token_index=255999, eoi_token_index=256000, image_token_index=262144,
    eos_token_id=[1, 106],
)
TEXT_IDS = (3, 255999)  # random prompt words: no pad/eos/bos, below the image ids

_T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {message}", flush=True)


def hf_config(tiny: bool):
    import transformers

    if tiny:
        from tiny_gemma import tiny_gemma3_config
        return tiny_gemma3_config()
    return transformers.Gemma3Config(**GEMMA3_4B_CONFIG)


def randomize_gemma(model, seed: int, embed_std: float):
    """Re-draw what transformers initialises to zero or one: RMSNorms, LayerNorms, SigLIP biases, projector."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    emb = model.model.language_model.embed_tokens.weight
    gen = torch.Generator(device=emb.device).manual_seed(seed)
    rand = lambda p: torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype)  # noqa: E731
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Gemma3RMSNorm):
                module.weight.copy_(0.1 * rand(module.weight))
            elif isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1 + 0.1 * rand(module.weight))
        for name, param in model.model.vision_tower.named_parameters():
            if name.endswith("bias"):
                param.copy_(0.05 * rand(param))
        proj = model.model.multi_modal_projector.mm_input_projection_weight
        proj.copy_(rand(proj) / proj.shape[0] ** 0.5)
        emb.copy_(embed_std * rand(emb))
    return model
