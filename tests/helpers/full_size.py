"""The released configs at full size: google/gemma-3-4b-it (transformers Gemma3Config kwargs) and the
Cosmos-Predict2 VAE (diffusers' default AutoencoderKLWan), with their parameter counts."""

from __future__ import annotations

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

# Parameter counts of transformers' / diffusers' models of these configs (meta device; lm_head tied).
GEMMA3_4B_PARAMS = {"language_model": 3_880_263_168, "vision_tower": 416_866_032, "multi_modal_projector": 2_950_272}
COSMOS_VAE_PARAMS = {"encoder": 53_595_872, "quant_conv": 1_056, "post_quant_conv": 272, "decoder": 73_295_331}
