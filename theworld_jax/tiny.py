"""Tiny random base models in HuggingFace format, built offline with this package's own code (no torch).

`write_tiny_gemma3(dir)` writes a two-layer Gemma 3 (one sliding, one full attention layer, a one-layer
SigLIP) as transformers lays it out: config.json, model.safetensors (hub key layout) and the processor
files. `write_tiny_vae(dir)` writes a small Wan2.1 VAE in diffusers' AutoencoderKLWan layout. Both are
random: they exercise every code path a real checkpoint takes, and they answer gibberish.

The processor is a transformers Gemma3Processor: a byte-level BPE tokenizer trained on the spot on a few
sentences (with Gemma 3's special tokens and chat template), and transformers' PIL image processor at
56x56 with 4 soft tokens per image.
"""

from __future__ import annotations

import math
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
                  "<start_of_image>", "<end_of_image>", "<image_soft_token>")
BPE_VOCAB_SIZE = 280
VOCAB_SIZE = 300  # the embedding's rows: the tokenizer, the two world tokens, padding
IMAGE_SIZE = 56
PATCH_SIZE = 14
MM_TOKENS_PER_IMAGE = 4
DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "tiny")  # configs/tiny.yaml's data
VAE_IMAGE_SIZE = (32, 32)  # what the tiny TheWorld resizes images to for the VAE (configs/tiny.yaml): 4x4 latents

# The Gemma 3 chat template: an optional system turn folded into the first user turn, user/model turns
# alternating, images rendered as <start_of_image> (the processor expands them into soft tokens).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- else -%}"
    "{{ raise_exception('Invalid content type') }}"
    "{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

# The tokenizer learns its alphabet and merges from these lines only, so a random model's output is made
# of their characters and pieces of words (gibberish, but readable). Other characters become <unk>.
_CORPUS = (
    "What is in this image? Describe the scene in one sentence.\n",
    "What is happening in this scene, and what happens next?\n",
    "A red ball flies over the green grass; it will fall and bounce.\n",
    "The sun is shining above a small house with a brown roof, a tree and two white clouds.\n",
    "A cat is sitting on a red chair next to the window.\n",
    "The robot picks up the blue block and places it on top of the green one.\n",
    "How many people are walking in the park? There are three of them.\n",
    "Which shape is it: a circle, a square or a triangle? It is a yellow square.\n",
    "user model assistant system: Yes. No. Left, right, up, down. 0 1 2 3 4 5 6 7 8 9 (A) (B) (C) (D)\n",
    "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG. the quick brown fox jumps over the lazy dog!\n",
) * 4
def build_tokenizer():
    """A byte-level BPE tokenizer with Gemma 3's special tokens (ids 0..8), trained on `_CORPUS`."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_CORPUS, trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE, special_tokens=list(SPECIAL_TOKENS), show_progress=False))
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        padding_side="left", extra_special_tokens={
            "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"})


def build_processor():
    """An offline Gemma3Processor: 56x56 images, 4 soft tokens per image, the Gemma 3 chat template."""
    import transformers
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    return transformers.Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer=build_tokenizer(), chat_template=CHAT_TEMPLATE, image_seq_length=MM_TOKENS_PER_IMAGE)


def gemma3_config_dict() -> dict:
    """The transformers config.json fields of the tiny Gemma 3 (token ids match `build_tokenizer`)."""
    ids = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    eos = [ids["<eos>"], ids["<end_of_turn>"]]
    text = dict(
        model_type="gemma3_text", vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"], num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, sliding_window=8,
        max_position_embeddings=512, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}},
        pad_token_id=ids["<pad>"], bos_token_id=ids["<bos>"], eos_token_id=eos, tie_word_embeddings=True)
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, vision_use_head=False)
    return dict(model_type="gemma3", text_config=text, vision_config=vision, mm_tokens_per_image=MM_TOKENS_PER_IMAGE,
                boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
                image_token_index=ids["<image_soft_token>"], eos_token_id=eos)


def wan_vae_config():
    """A small Wan2.1 VAE: the Cosmos layout (spatial factor 8, time / 4) at base width 8, 4 latent channels."""
    from theworld_jax.config.wan_vae import WanVAEConfig

    return WanVAEConfig(base_dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1,
                        temperal_downsample=(False, True, True))


_BLOCK = 1 << 24  # arrays larger than _LARGE values reuse windows of one block of this many draws
_LARGE = 1 << 20


def random_like(build, seed: int = 0) -> nnx.Module:
    """The module `build()` makes, with every parameter drawn by NumPy (no per-shape XLA compilation).

    Zero-centred norm weights (Gemma's (1 + w) RMSNorms) get 0.1 N(0, 1), norm scales and gammas
    1 + 0.1 N(0, 1), biases and position embeddings 0.02 N(0, 1), every other array N(0, 1) / sqrt(fan in)
    with fan in = all axes but the last (so the tied embedding stays small). An array of more than 2**20
    values tiles a window of one shared block of 2**24 draws, so a 4B-parameter model is drawn in seconds
    (benchmarks); values are cast on the host.
    """
    abstract = nnx.eval_shape(build)
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    flat = nnx.to_flat_state(params)
    rng = np.random.default_rng(seed)
    block = None
    for path, var in flat:
        shape, dtype = var.get_value().shape, var.get_value().dtype
        rule = _init_rule(str(path[-1]), shape)
        size = math.prod(shape)
        if size <= _LARGE:
            value = np.asarray(rule(rng.standard_normal(shape, np.float32)), dtype)
        else:  # scaled and cast on the window, then tiled: one pass over the array, in its own dtype
            if block is None:
                block = np.tile(rng.standard_normal(_BLOCK, np.float32), 2)
            start = int(rng.integers(0, _BLOCK))
            value = np.resize(np.asarray(rule(block[start:start + min(size, _BLOCK)]), dtype), shape)
        var.set_value(jnp.asarray(value))
    return nnx.merge(graphdef, nnx.from_flat_state(flat), rest)


def _init_rule(name: str, shape: tuple[int, ...]):
    """N(0, 1) draws -> the parameter's values (random_like's table), elementwise."""
    if name.endswith("bias") or name == "position_embedding":
        return lambda noise: 0.02 * noise
    if name in ("weight", "norm_scale"):
        return lambda noise: 0.1 * noise
    if name in ("scale", "gamma"):
        return lambda noise: 1 + 0.1 * noise
    fan_in = math.sqrt(math.prod(shape[:-1]))
    return lambda noise: noise / fan_in


def write_tiny_gemma3(directory: str, seed: int = 0) -> str:
    """A random tiny Gemma 3 with its processor, written to the new directory `directory` in HF format."""
    from theworld_jax.config.gemma3 import Gemma3Config
    from theworld_jax.modeling.gemma3 import Gemma3Model
    from theworld_jax.weights.gemma3_keys import export_gemma3

    config = Gemma3Config.from_dict(gemma3_config_dict())
    os.makedirs(directory)
    build_processor().save_pretrained(directory)
    export_gemma3(random_like(lambda: Gemma3Model(config, dtype=jnp.float32, rngs=nnx.Rngs(0)), seed), directory)
    return directory


def write_tiny_vae(directory: str, seed: int = 0) -> str:
    """A random tiny Wan2.1 VAE written to `directory` in diffusers' AutoencoderKLWan layout."""
    from theworld_jax import CosmosVAE

    vae = random_like(lambda: CosmosVAE(wan_vae_config(), dtype=jnp.float32, rngs=nnx.Rngs(0)), seed)
    vae.save_pretrained(directory)
    return directory
