"""Tiny random diffusers AutoencoderKLWan models, saved in diffusers format for the parity tests."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan

# Two structurally different configs: the Cosmos layout shrunk (spatial factor 8, time / 4), and one
# with three stages (spatial factor 4), a single temporal downsample (time / 2), two res blocks per stage
# and a separate decoder width. (Non-empty attn_scales cannot be tested: diffusers' encoder fails on it.)
TINY_CONFIGS = {
    "cosmos_like": dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                        temperal_downsample=[False, True, True]),
    "three_stage": dict(base_dim=12, decoder_base_dim=8, z_dim=6, dim_mult=[1, 2, 3], num_res_blocks=2,
                        temperal_downsample=[True, False]),
}


def randomize(vae: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Re-draw every parameter: norm gammas around 1, biases small, conv weights kaiming-like."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in ** 0.5)
    return vae


def make_tiny_vae(path: str, name: str = "cosmos_like", seed: int = 0, **overrides) -> AutoencoderKLWan:
    """Build, randomise and save_pretrained a tiny AutoencoderKLWan into `path`; returns it in eval mode."""
    vae = AutoencoderKLWan(**{**TINY_CONFIGS[name], **overrides})
    randomize(vae, seed).eval()
    vae.save_pretrained(path)
    return vae
