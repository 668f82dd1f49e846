"""Tiny random Gemma 3 models and an offline Gemma3Processor, for tests.

Nothing is downloaded: the tokenizer is a byte-level BPE trained on a fixed corpus, the image
processor is transformers' PIL one, the model is a random `Gemma3ForConditionalGeneration` with its
zero-initialised weights (RMSNorms, projector) re-randomised. `save_tiny_gemma3` writes it in any of
the three key layouts a Gemma 3 checkpoint comes in (docs/design.md, section 5).
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
import transformers
from safetensors.numpy import save_file
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

# The tiny sizes, Gemma 3's special tokens and chat template: the same as the package's own tiny models.
from theworld_jax.tiny import (  # noqa: E402
    BPE_VOCAB_SIZE, CHAT_TEMPLATE, IMAGE_SIZE, MM_TOKENS_PER_IMAGE, PATCH_SIZE, SPECIAL_TOKENS, VOCAB_SIZE)

_CORPUS = (
    "What is in this image? Describe the scene in one sentence.",
    "A cat is sitting on a red chair next to the window, and the sun is shining.",
    "The robot picks up the blue block and places it on top of the green one.",
    "How many people are walking in the park? There are three of them.",
    "user model assistant system hello world the quick brown fox jumps over the lazy dog",
) * 4


def build_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with Gemma 3's special tokens, trained offline on a fixed corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_CORPUS, trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        padding_side="left", extra_special_tokens={
            "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"})


def build_processor(save_dir: str | None = None) -> transformers.Gemma3Processor:
    """An offline Gemma3Processor: 56x56 images, 4 soft tokens per image, the Gemma 3 chat template."""
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    processor = transformers.Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer=build_tokenizer(), chat_template=CHAT_TEMPLATE, image_seq_length=MM_TOKENS_PER_IMAGE)
    if save_dir is not None:
        processor.save_pretrained(save_dir)
    return processor


def tiny_gemma3_config(**overrides) -> transformers.Gemma3Config:
    """A two-layer (sliding, full) Gemma 3 with a one-layer SigLIP; token ids match `build_tokenizer`.

    `overrides` replace top-level fields; `text_config` / `vision_config` dicts update those sections.
    query_pre_attn_scalar (24) differs from head_dim (32), so a query scale taken from the wrong one fails.
    """
    tok = build_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    if VOCAB_SIZE <= len(tok) + 2:
        raise AssertionError(f"vocab {VOCAB_SIZE} leaves no room for the world tokens (tokenizer {len(tok)})")
    text = dict(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        layer_types=["sliding_attention", "full_attention"], num_attention_heads=2, num_key_value_heads=1,
        head_dim=32, query_pre_attn_scalar=24, sliding_window=8, max_position_embeddings=512,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}},
        pad_token_id=ids["<pad>"], bos_token_id=ids["<bos>"], eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]])
    text.update(overrides.pop("text_config", {}))
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, vision_use_head=False)
    vision.update(overrides.pop("vision_config", {}))
    top = dict(text_config=text, vision_config=vision, mm_tokens_per_image=MM_TOKENS_PER_IMAGE,
               boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
               image_token_index=ids["<image_soft_token>"], eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]])
    top.update(overrides)
    return transformers.Gemma3Config(**top)


def build_tiny_gemma3(config: transformers.Gemma3Config | None = None, seed: int = 0,
                      embed_std: float = 0.05) -> transformers.Gemma3ForConditionalGeneration:
    """A float32 eval-mode model with norms and projector re-randomised and small tied embeddings."""
    config = config or tiny_gemma3_config()
    torch.manual_seed(seed)
    model = transformers.Gemma3ForConditionalGeneration(config).float().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Gemma3RMSNorm):  # (1 + w) norms, zero at init
                module.weight.copy_(0.1 * torch.randn(module.weight.shape, generator=gen))
            elif isinstance(module, torch.nn.LayerNorm):  # SigLIP: ones at init
                module.weight.copy_(1 + 0.1 * torch.randn(module.weight.shape, generator=gen))
        for name, param in model.model.vision_tower.named_parameters():
            if name.endswith("bias"):  # zero (or nearly) at init
                param.copy_(0.05 * torch.randn(param.shape, generator=gen))
        proj = model.model.multi_modal_projector.mm_input_projection_weight
        proj.copy_(torch.randn(proj.shape, generator=gen) / proj.shape[0] ** 0.5)
        emb = model.model.language_model.embed_tokens.weight
        emb.copy_(embed_std * torch.randn(emb.shape, generator=gen))
    return model


# In-memory (transformers 5) key prefix -> the prefix each on-disk layout uses.
_LAYOUT_PREFIXES = {
    "in_memory": (),
    "transformers5": (("model.language_model.", "language_model.model."),
                      ("model.vision_tower.", "vision_tower."),
                      ("model.multi_modal_projector.", "multi_modal_projector.")),
    "hub": (("model.language_model.", "language_model.model."),
            ("model.vision_tower.", "vision_tower.vision_model."),
            ("model.multi_modal_projector.", "multi_modal_projector.")),
}


def layout_state_dict(model: torch.nn.Module, layout: str) -> dict[str, np.ndarray]:
    """The model's tensors as NumPy under `layout`'s key names (lm_head dropped: it is tied)."""
    if layout not in _LAYOUT_PREFIXES:
        raise ValueError(f"unknown layout {layout!r}; expected one of {sorted(_LAYOUT_PREFIXES)}")
    out = {}
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight":
            continue
        for old, new in _LAYOUT_PREFIXES[layout]:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = tensor.detach().cpu().contiguous().numpy()
    return out


def save_tiny_gemma3(model: torch.nn.Module, processor, directory: str, layout: str = "transformers5",
                     shards: int = 1) -> str:
    """Write config.json, safetensors (sharded with an index when shards > 1) and processor files."""
    os.makedirs(directory, exist_ok=True)
    model.config.save_pretrained(directory)
    if processor is not None:
        processor.save_pretrained(directory)
    tensors = layout_state_dict(model, layout)
    keys = list(tensors)
    if shards == 1:
        save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
        return directory
    weight_map = {}
    for i, part in enumerate(np.array_split(np.arange(len(keys)), shards)):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({keys[j]: tensors[keys[j]] for j in part}, os.path.join(directory, name),
                  metadata={"format": "pt"})
        weight_map.update({keys[j]: name for j in part})
    total = sum(t.nbytes for t in tensors.values())
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return directory
