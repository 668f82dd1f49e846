"""Generation: jit-compiled prefill, then a decode loop that stays on the device (lax.while_loop).

Flow (as transformers' generate for Gemma 3; docs/design.md, section 6):
- the prompt (text, image soft tokens, spliced world tokens) is left-padded to a bucket length and run
  once through the decoder into an empty KV cache, with token_type_ids (bidirectional image blocks)
  only here; RoPE positions are cumsum(attention_mask) - 1;
- each decode step embeds the previous token (text scaling), at position last + 1 and sequence index
  last + 1, writes it into the cache and attends over it (sliding layers keep a ring of the window);
- a row stops after it produced one of the eos ids and emits `pad_token_id` from then on; the loop ends
  when every row stopped or max_new_tokens were produced. Ids >= vocab_limit are never produced.

Bucketing (recompiles): prompts are left-padded to `BucketPolicy.length(L)`: the next power of two (at
least `minimum`) up to `granule`, then the next multiple of `granule`; the new-token buffer is bucketed
the same way. One (batch, prompt bucket, new-token bucket, inputs' structure, sampling mode) gives one
prefill and one decode program; the number of steps and the stop condition are traced values.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from theworld_jax.attention import Layout, block_layout, make_attention_mask, make_decode_mask
from theworld_jax.inputs import Batch
from theworld_jax.jit import DECODE_LOOP_OPTIONS, LARGE_PROGRAM_OPTIONS, jit_module
from theworld_jax.modeling.kv_cache import KVCache
from theworld_jax.sampling import SamplingConfig, choose


@dataclasses.dataclass(frozen=True)
class BucketPolicy:
    """Padded lengths: next power of two >= max(length, minimum) up to `granule`, then multiples of it.

    128 keeps a long prompt's padding under 3 % (4,400 tokens -> 4,480) on lengths the fast attention
    path and the GPU's matrix tiles take whole; each new bucket is one more compilation (cached).
    """

    minimum: int = 32
    granule: int = 128

    def length(self, n: int) -> int:
        if n <= self.granule:
            return max(self.minimum, 1 << max(0, int(n) - 1).bit_length())
        return -(-int(n) // self.granule) * self.granule


EOS_SLOTS = 8  # eos ids travel as a traced (EOS_SLOTS,) array padded with -1: changing them recompiles nothing


@struct.dataclass
class DecodeState:
    """Everything the decode loop carries. tokens (B, N) new tokens (pad past `step`); last, position,
    done (B,): the last token, its RoPE position, whether the row stopped; step, index (): tokens
    produced so far and the sequence index of `last`."""

    cache: KVCache
    tokens: jax.Array
    last: jax.Array
    position: jax.Array
    done: jax.Array
    step: jax.Array
    index: jax.Array
    key: jax.Array


def _finish(token, done, eos: jax.Array, pad_token_id: int):
    """Pad finished rows, then mark rows whose token is one of `eos` (EOS_SLOTS,) as finished."""
    token = jnp.where(done, pad_token_id, token)
    return token, done | jnp.any(token[:, None] == eos[None, :], axis=1)


def _prefill(model: nnx.Module, batch: dict, key, temperature, top_p, eos, *, sampling: SamplingConfig,
             pad_token_id: int, capacity: int, layout: Layout | None) -> DecodeState:
    """The prompt through the decoder into an empty KV cache, and the first token (jitted by `start`)."""
    lm = model.language_model
    fused = model.lm_inputs(**batch)
    embeds, mask, types, positions = fused.embeds, fused.attention_mask, fused.token_type_ids, fused.positions
    b, length = mask.shape
    cache = KVCache.init(lm.config, b, length + capacity, dtype=lm.dtype)
    last = jnp.full((b, 1), length - 1, jnp.int32)
    hidden, cache = lm(embeds, positions=positions, mask=make_attention_mask(mask, types, layout=layout), cache=cache,
                       keep=last)
    key, sub = jax.random.split(key)
    token = choose(lm.logits(hidden)[:, 0], sub, sampling, temperature, top_p)
    token, done = _finish(token, jnp.zeros((b,), bool), eos, pad_token_id)
    tokens = jnp.full((b, capacity), pad_token_id, jnp.int32).at[:, 0].set(token)
    return DecodeState(cache=cache, tokens=tokens, last=token, position=positions[:, -1] + 1, done=done,
                       step=jnp.int32(1), index=jnp.int32(length), key=key)


def _decode(lm: nnx.Module, state: DecodeState, limit, temperature, top_p, eos, *, sampling: SamplingConfig,
            pad_token_id: int) -> DecodeState:
    """Decode steps of the language model `lm` until `limit` tokens were produced in all or every row
    stopped (jitted by `Decoding`, `state` donated)."""
    limit = jnp.minimum(limit, state.tokens.shape[1])

    def running(s: DecodeState):
        return (s.step < limit) & ~jnp.all(s.done)

    def step(s: DecodeState) -> DecodeState:
        b = s.last.shape[0]
        mask = make_decode_mask(s.index[None], batch=b)
        hidden, cache = lm(lm.embed(s.last[:, None]), positions=s.position[:, None], mask=mask, cache=s.cache)
        key, sub = jax.random.split(s.key)
        token = choose(lm.logits(hidden)[:, 0], sub, sampling, temperature, top_p)
        token, done = _finish(token, s.done, eos, pad_token_id)
        tokens = jax.lax.dynamic_update_slice(s.tokens, token[:, None], (0, s.step))
        return DecodeState(cache=cache, tokens=tokens, last=token, position=s.position + 1, done=done,
                           step=s.step + 1, index=s.index + 1, key=key)

    return jax.lax.while_loop(running, step, state)


def _left_pad(x: np.ndarray | None, length: int, value: int) -> np.ndarray | None:
    if x is None:
        return None
    return np.pad(np.asarray(x, np.int32), ((0, 0), (length - x.shape[1], 0)), constant_values=value)


class Decoding:
    """One batch being generated: prefilled when built, advanced on the device by `advance`.

    Build it with `start(...)`. `sequences()` gives prompt + the tokens produced so far (B, L + n).
    """

    def __init__(self, lm: nnx.Module, state: DecodeState, prompt_ids: np.ndarray, max_new_tokens: int,
                 static: dict, dynamic: tuple):
        self._decode = jit_module(_decode, lm, static_argnames=tuple(static), donate_argnames=("state",),
                                  compiler_options=DECODE_LOOP_OPTIONS)
        self._state = state
        self._prompt = prompt_ids
        self.max_new_tokens = max_new_tokens
        self._static = static  # sampling, pad_token_id
        self._dynamic = dynamic  # temperature, top_p, eos
        self.produced = 1
        self.finished = max_new_tokens <= 1 or bool(np.all(np.asarray(state.done)))

    def advance(self, steps: int | None = None) -> np.ndarray:
        """Run up to `steps` more decode steps (default: to the end) -> the new tokens (B, k) of this call."""
        before = self.produced
        if not self.finished:
            target = self.max_new_tokens if steps is None else min(self.max_new_tokens, before + max(1, steps))
            self._state = self._decode(self._state, np.int32(target), *self._dynamic, **self._static)
            self.produced = int(self._state.step)
            self.finished = self.produced >= self.max_new_tokens or bool(np.all(np.asarray(self._state.done)))
        return self.new_tokens()[:, before:]

    @property
    def state(self) -> DecodeState:
        """The decode loop's state on the device (cache, tokens so far, ...); `advance` replaces it."""
        return self._state

    def new_tokens(self) -> np.ndarray:
        """(B, n) the tokens produced so far (pad_token_id after a row's eos)."""
        return np.asarray(self._state.tokens)[:, :self.produced]

    def sequences(self) -> np.ndarray:
        """(B, L + n): the prompt ids as given, then the new tokens, like transformers' generate."""
        return np.concatenate([self._prompt, self.new_tokens()], axis=1)


def start(model: nnx.Module, batch: Batch, *, max_new_tokens: int = 32, do_sample: bool = False,
          temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
          eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
          vocab_limit: int | None = None, buckets: BucketPolicy = BucketPolicy()) -> Decoding:
    """Prefill a prepared batch and return its `Decoding` (see `generate` for the arguments)."""
    config = model.gemma_config
    text = config.text
    ids, mask = np.asarray(batch.input_ids, np.int32), np.asarray(batch.attention_mask, np.int32)
    world_tokens = batch.world_tokens
    real = mask.astype(bool).sum(axis=1)
    if not real.all():
        raise ValueError(f"row {int(np.argmin(real))} is all padding (attention_mask 0); every row needs a token")
    if int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    longest = int(real.max()) + world_tokens + max_new_tokens
    if longest > text.max_position_embeddings:
        raise ValueError(f"prompt ({int(real.max())} tokens + {world_tokens} world tokens) plus max_new_tokens "
                         f"{max_new_tokens} is {longest}, more than max_position_embeddings "
                         f"{text.max_position_embeddings}")
    eos = config.eos_token_id if eos_token_id is None else eos_token_id
    eos = [int(eos)] if np.ndim(eos) == 0 else [int(e) for e in eos]
    if len(eos) > EOS_SLOTS or any(e < 0 for e in eos):
        raise ValueError(f"eos_token_id must be at most {EOS_SLOTS} non-negative ids, got {eos}")
    pad = text.pad_token_id if pad_token_id is None else int(pad_token_id)
    sampling = SamplingConfig.make(vocab_limit=text.vocab_size if vocab_limit is None else int(vocab_limit),
                                   vocab_size=text.vocab_size, do_sample=do_sample, temperature=temperature,
                                   top_k=top_k, top_p=top_p)

    length = buckets.length(ids.shape[1] + world_tokens) - world_tokens
    padded = dict(input_ids=_left_pad(ids, length, pad), attention_mask=_left_pad(mask, length, 0),
                  token_type_ids=_left_pad(batch.token_type_ids, length, 0), pixel_values=batch.pixel_values,
                  video=batch.video)
    dynamic = (np.float32(temperature), np.float32(1.0 if top_p is None else top_p),
               np.asarray(eos + [-1] * (EOS_SLOTS - len(eos)), np.int32))  # host values: no device call each
    static = dict(sampling=sampling, pad_token_id=pad)
    world_attention = getattr(model.config, "world_attention", "causal")
    extra = (world_tokens,) if world_tokens and world_attention == "bidirectional" else ()
    layout = block_layout(padded["token_type_ids"], padded["attention_mask"], extra_blocks=extra)  # fast attention
    prefill = jit_module(_prefill, model, static_argnames=("capacity", "layout", *static),
                         compiler_options=LARGE_PROGRAM_OPTIONS)
    state = prefill(padded, jax.random.key(seed), *dynamic, capacity=buckets.length(int(max_new_tokens)),
                    layout=layout, **static)
    return Decoding(model.language_model, state, ids, int(max_new_tokens), static, dynamic)


def generate(model: nnx.Module, batch: Batch, **options) -> np.ndarray:
    """Prompt + new tokens (B, L + n) int32, n <= max_new_tokens (fewer when every row stopped early).

    model: a Gemma3Model or a TheWorldModel; batch: from `theworld_jax.inputs.prepare_batch` (world tokens
    injected and the VAE input built when the world branch is used). Rows may be left padded. Options:
    max_new_tokens; sampling: do_sample, temperature, top_k, top_p, seed; eos_token_id: an id, ids, or ()
    for none (default: the config's); pad_token_id (default: the config's); vocab_limit: ids >= it are
    never produced (default: the vocabulary size); buckets: the padding policy.
    """
    decoding = start(model, batch, **options)
    decoding.advance()
    return decoding.sequences()


def stream_text(decoding: Decoding, tokenizer, *, chunk: int = 1, skip_special_tokens: bool = True) -> Iterator[str]:
    """Yield the answer of a batch-1 `Decoding` as text pieces, `chunk` tokens per device call.

    Each piece is what the decoded text gained; text ending in an unfinished UTF-8 character waits.
    """
    if decoding.new_tokens().shape[0] != 1:
        raise ValueError(f"streaming text needs a batch of one row, got {decoding.new_tokens().shape[0]}")
    shown = ""
    new = decoding.new_tokens()[0]
    while True:
        text = tokenizer.decode([int(t) for t in new], skip_special_tokens=skip_special_tokens)
        if len(text) > len(shown) and (decoding.finished or not text.endswith("\ufffd")):
            yield text[len(shown):]
            shown = text
        if decoding.finished:
            return
        decoding.advance(chunk)
        new = decoding.new_tokens()[0]
