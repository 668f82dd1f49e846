"""PyTorch reference composition of TheWorld, written from docs/design.md, section 3 ("Data flow and the token layout").

Building blocks are transformers' Gemma3ForConditionalGeneration and diffusers' AutoencoderKLWan; the
glue (world-token injection, VAE input, latents -> tokens, projector, per-row splice, loss) is written
here with plain per-row Python loops, for clarity over speed. The JAX TheWorld is checked against it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

IGNORE = -100
PROJECTION_ARCHITECTURES = ("mlp", "mlp_no_final_gelu", "linear")
PROJECTION_MODES = ("spatial", "channel")
WORLD_ATTENTIONS = ("causal", "bidirectional")
VAE_INPUT_RANGES = ("minus_one_one", "zero_255")


class TorchWorldProjector(nn.Module):
    """World latent tokens (B, N, in_features) -> embeddings (B, N, out_features); upstream's key names."""

    def __init__(self, in_features: int, out_features: int, architecture: str = "mlp"):
        super().__init__()
        if architecture == "mlp":
            layers = [nn.Linear(in_features, out_features), nn.GELU(),
                      nn.Linear(out_features, out_features), nn.GELU()]
        elif architecture == "mlp_no_final_gelu":
            layers = [nn.Linear(in_features, out_features), nn.GELU(),
                      nn.Linear(out_features, out_features)]
        elif architecture == "linear":
            layers = [nn.Linear(in_features, out_features)]
        else:
            raise ValueError(f"unknown projection architecture {architecture!r}; "
                             f"expected one of {PROJECTION_ARCHITECTURES}")
        self.projection = nn.Sequential(*layers)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.projection(tokens)


def latents_to_tokens(mean: torch.Tensor, mode: str) -> torch.Tensor:
    """VAE posterior mean (B, z, T', H', W') -> world tokens.

    spatial: per latent frame H'*W' tokens of z (row-major h, w), frames in time order -> (B, T'*H'*W', z).
    channel: per latent frame z tokens of H'*W' (row-major)                            -> (B, T'*z, H'*W').
    """
    if mean.ndim != 5:
        raise ValueError(f"latents must be (B, z, T, H, W), got shape {tuple(mean.shape)}")
    if mode not in PROJECTION_MODES:
        raise ValueError(f"unknown world projection mode {mode!r}; expected one of {PROJECTION_MODES}")
    per_frame = []
    for t in range(mean.shape[2]):
        frame = mean[:, :, t].flatten(2)  # (B, z, H'*W'), row-major over (h, w)
        per_frame.append(frame.transpose(1, 2) if mode == "spatial" else frame)
    return torch.cat(per_frame, dim=1)


def _frames_of(item) -> list[Image.Image]:
    """One world input (PIL image, uint8 (H, W, 3) array or uint8 (T, H, W, 3) clip) -> RGB PIL frames."""
    if isinstance(item, Image.Image):
        return [item.convert("RGB")]
    arr = np.asarray(item)
    if arr.dtype != np.uint8:
        raise ValueError(f"world image arrays must be uint8, got dtype {arr.dtype}")
    if arr.ndim == 3 and arr.shape[-1] == 3:
        return [Image.fromarray(arr, mode="RGB")]
    if arr.ndim == 4 and arr.shape[-1] == 3 and arr.shape[0] >= 1:
        return [Image.fromarray(frame, mode="RGB") for frame in arr]
    raise ValueError(f"a world image must be (H, W, 3) or a clip (T, H, W, 3), got shape {arr.shape}")


def vae_input(images: Sequence, size: tuple[int, int] = (512, 512),
              value_range: str = "minus_one_one") -> torch.Tensor:
    """Images / clips, one per row -> VAE input (B, 3, T, H, W) float32, resized with PIL bilinear.

    size is (H, W); value_range "minus_one_one" gives x/127.5 - 1, "zero_255" gives x (upstream's range).
    """
    if value_range not in VAE_INPUT_RANGES:
        raise ValueError(f"unknown vae input range {value_range!r}; expected one of {VAE_INPUT_RANGES}")
    if len(images) == 0:
        raise ValueError("images is empty; expected one image or clip per row")
    height, width = size
    rows = []
    for item in images:
        frames = [np.asarray(f.resize((width, height), Image.BILINEAR), dtype=np.float32)
                  for f in _frames_of(item)]
        rows.append(np.stack(frames))  # (T, H, W, 3)
    lengths = {r.shape[0] for r in rows}
    if len(lengths) != 1:
        raise ValueError(f"all world clips in a batch must have the same length, got {sorted(lengths)}")
    x = torch.from_numpy(np.stack(rows)).permute(0, 4, 1, 2, 3).contiguous()  # (B, 3, T, H, W)
    return x / 127.5 - 1.0 if value_range == "minus_one_one" else x


def _insert(row: torch.Tensor, at: int, values: Sequence[int]) -> torch.Tensor:
    extra = torch.tensor(values, dtype=row.dtype, device=row.device)
    return torch.cat([row[:at], extra, row[at:]])


def inject_world_tokens(input_ids, attention_mask, token_type_ids, labels, bos_id, sow_id, eow_id):
    """Insert [sow, eow] right after each row's BOS (first attended token) when no row has sow.

    Returns (input_ids, attention_mask, token_type_ids, labels), length L+2 (or unchanged when every row
    already holds sow followed by eow). The two new tokens get attention 1, token_type 0, label -100.
    """
    has_sow = [bool((row == sow_id).any()) for row in input_ids]
    if all(has_sow):
        for b, row in enumerate(input_ids):
            s = int((row == sow_id).nonzero()[0])
            if not bool((row[s + 1:] == eow_id).any()):
                raise ValueError(f"row {b} has <start_of_world> (id {sow_id}) at {s} but no "
                                 f"<end_of_world> (id {eow_id}) after it")
        return input_ids, attention_mask, token_type_ids, labels
    if any(has_sow):
        raise ValueError(f"rows {[b for b, h in enumerate(has_sow) if not h]} lack <start_of_world> while "
                         f"others have it; expected all rows or none")
    if bool((input_ids == eow_id).any()):
        raise ValueError(f"<end_of_world> (id {eow_id}) found without <start_of_world> (id {sow_id})")
    out_ids, out_mask, out_tt, out_labels = [], [], [], []
    for b in range(input_ids.shape[0]):
        attended = attention_mask[b].nonzero()
        if len(attended) == 0:
            raise ValueError(f"row {b} has no attended token; expected a BOS to inject world tokens after")
        p = int(attended[0])
        if int(input_ids[b, p]) != bos_id:
            raise ValueError(f"row {b}: first attended token is {int(input_ids[b, p])}, expected BOS {bos_id}")
        out_ids.append(_insert(input_ids[b], p + 1, [sow_id, eow_id]))
        out_mask.append(_insert(attention_mask[b], p + 1, [1, 1]))
        if token_type_ids is not None:
            out_tt.append(_insert(token_type_ids[b], p + 1, [0, 0]))
        if labels is not None:
            out_labels.append(_insert(labels[b], p + 1, [IGNORE, IGNORE]))
    return (torch.stack(out_ids), torch.stack(out_mask),
            torch.stack(out_tt) if token_type_ids is not None else None,
            torch.stack(out_labels) if labels is not None else None)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """position_ids = cumsum(attention_mask) - 1, pads clipped to 0 (as transformers' generate)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits[:, :-1] against labels[:, 1:] over labels != -100."""
    return nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
        ignore_index=IGNORE, reduction="mean")


def _image_features(gemma, pixel_values: torch.Tensor) -> torch.Tensor:
    """(num_images, mm_tokens, hidden): the projected SigLIP features (tensor or pooler_output by version)."""
    out = gemma.model.get_image_features(pixel_values)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def gemma_logits(gemma, input_ids, attention_mask, pixel_values=None, token_type_ids=None) -> torch.Tensor:
    """enable_world=False: Gemma 3 alone, positions from attention_mask -> float32 logits (B, L, V)."""
    kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
    out = gemma(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                position_ids=positions_from_mask(attention_mask), use_cache=False, **kwargs)
    return out.logits.float()


class TheWorldReference(nn.Module):
    """Gemma 3 + Wan VAE world tokens: forward(...) -> (logits float32 (B, L+N, V), loss or None)."""

    def __init__(self, gemma, vae, projector: TorchWorldProjector, sow_id: int, eow_id: int,
                 mode: str = "spatial", world_attention: str = "causal",
                 vae_input_range: str = "minus_one_one", vae_size: tuple[int, int] = (512, 512)):
        super().__init__()
        if mode not in PROJECTION_MODES:
            raise ValueError(f"unknown world projection mode {mode!r}; expected one of {PROJECTION_MODES}")
        if world_attention not in WORLD_ATTENTIONS:
            raise ValueError(f"unknown world attention {world_attention!r}; expected one of {WORLD_ATTENTIONS}")
        if vae_input_range not in VAE_INPUT_RANGES:
            raise ValueError(f"unknown vae input range {vae_input_range!r}; expected one of {VAE_INPUT_RANGES}")
        self.gemma, self.vae, self.projector = gemma, vae, projector
        self.sow_id, self.eow_id = sow_id, eow_id
        self.mode, self.world_attention = mode, world_attention
        self.vae_input_range, self.vae_size = vae_input_range, tuple(vae_size)

    def world_embeddings(self, images) -> torch.Tensor:
        """images (one per row) -> projected world tokens (B, N, hidden), not embed-scaled."""
        vae_param = next(self.vae.parameters())
        x = vae_input(images, self.vae_size, self.vae_input_range).to(vae_param.device, vae_param.dtype)
        mean = self.vae.encode(x).latent_dist.mode()
        proj_param = next(self.projector.parameters())
        return self.projector(latents_to_tokens(mean, self.mode).to(proj_param.dtype))

    def text_and_image_embeddings(self, input_ids, pixel_values=None) -> torch.Tensor:
        """Scaled text embeddings (B, L, D) with unscaled image features at image-token positions."""
        cfg = self.gemma.config
        embed = self.gemma.get_input_embeddings()
        image_mask = input_ids == cfg.image_token_id
        safe_ids = input_ids.masked_fill(image_mask, 0) if cfg.image_token_id >= embed.num_embeddings else input_ids
        embeds = embed(safe_ids)
        if pixel_values is not None:
            feats = _image_features(self.gemma, pixel_values).to(embeds.dtype)
            if int(image_mask.sum()) != feats.shape[0] * feats.shape[1]:
                raise ValueError(f"{int(image_mask.sum())} image tokens for {feats.shape[0]} images of "
                                 f"{feats.shape[1]} features")
            embeds = embeds.masked_scatter(image_mask.unsqueeze(-1).expand_as(embeds), feats)
        return embeds

    def splice(self, embeds, world, input_ids, attention_mask, token_type_ids, labels):
        """Insert world[b] right after row b's sow; returns (embeds, mask, token_type_ids, labels)."""
        n = world.shape[1]
        world_tt = 1 if self.world_attention == "bidirectional" else 0
        if token_type_ids is None and self.world_attention == "bidirectional":
            token_type_ids = torch.zeros_like(input_ids)
        out_e, out_m, out_tt, out_l = [], [], [], []
        for b in range(input_ids.shape[0]):
            s = int((input_ids[b] == self.sow_id).nonzero()[0])
            e = s + 1 + int((input_ids[b, s + 1:] == self.eow_id).nonzero()[0])
            out_e.append(torch.cat([embeds[b, :s + 1], world[b].to(embeds.dtype), embeds[b, s + 1:]]))
            out_m.append(_insert(attention_mask[b], s + 1, [1] * n))
            if token_type_ids is not None:
                out_tt.append(_insert(token_type_ids[b], s + 1, [world_tt] * n))
            if labels is not None:
                row = labels[b].clone()
                row[s] = IGNORE
                row[e] = IGNORE
                out_l.append(_insert(row, s + 1, [IGNORE] * n))
        return (torch.stack(out_e), torch.stack(out_m),
                torch.stack(out_tt) if token_type_ids is not None else None,
                torch.stack(out_l) if labels is not None else None)

    def prepare(self, input_ids, attention_mask, pixel_values=None, token_type_ids=None, labels=None,
                images=None) -> dict:
        """Steps 1-5: inject, embed, splice -> gemma's inputs (inputs_embeds, attention_mask, position_ids,
        token_type_ids or None) and the spliced labels (or None), all of length L_out."""
        if images is None:
            raise ValueError("images is None; the world path needs one image or clip per row "
                             "(use gemma_logits for enable_world=False)")
        if len(images) != input_ids.shape[0]:
            raise ValueError(f"{len(images)} world images for a batch of {input_ids.shape[0]} rows")
        bos_id = self.gemma.config.get_text_config().bos_token_id
        input_ids, attention_mask, token_type_ids, labels = inject_world_tokens(
            input_ids, attention_mask, token_type_ids, labels, bos_id, self.sow_id, self.eow_id)
        embeds = self.text_and_image_embeddings(input_ids, pixel_values)
        world = self.world_embeddings(images)
        embeds, attention_mask, token_type_ids, labels = self.splice(
            embeds, world, input_ids, attention_mask, token_type_ids, labels)
        return dict(inputs_embeds=embeds, attention_mask=attention_mask, token_type_ids=token_type_ids,
                    position_ids=positions_from_mask(attention_mask), labels=labels)

    def forward(self, input_ids, attention_mask, pixel_values=None, token_type_ids=None, labels=None,
                images=None):
        inputs = self.prepare(input_ids, attention_mask, pixel_values, token_type_ids, labels, images)
        labels = inputs.pop("labels")
        if inputs["token_type_ids"] is None:
            del inputs["token_type_ids"]
        logits = self.gemma(**inputs, use_cache=False).logits.float()
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return logits, loss


def save_upstream_checkpoint(directory, projector: TorchWorldProjector, gemma_dir: str, cosmos_dir: str,
                             mode: str, architecture: str, z_dim: int) -> None:
    """Write what an upstream PyTorch TheWorld checkpoint holds: config.json + model.safetensors."""
    from safetensors.torch import save_file

    if mode not in PROJECTION_MODES:
        raise ValueError(f"unknown world projection mode {mode!r}; expected one of {PROJECTION_MODES}")
    in_features = projector.projection[0].in_features
    if mode == "spatial" and in_features != z_dim:
        raise ValueError(f"spatial projector takes {in_features} features, expected z_dim {z_dim}")
    os.makedirs(directory, exist_ok=True)
    config = {
        "model_type": "the_world", "gemma_model_name": str(gemma_dir), "cosmos_model_name": str(cosmos_dir),
        "enable_world": True, "world_projection_mode": mode, "projection_architecture": architecture,
        "freeze_gemma_vision": True, "freeze_gemma_language": True, "freeze_cosmos_vae": True,
    }
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    tensors = {f"cosmos_encoder.world_projector.{k}": v.detach().to("cpu", torch.float32).contiguous()
               for k, v in projector.state_dict().items()}
    save_file(tensors, os.path.join(directory, "model.safetensors"))
