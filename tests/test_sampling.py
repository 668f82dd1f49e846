"""top_k with top_p: the nucleus found among the top-k survivors equals the radix search over the vocabulary
(top-k's filter, then top-p's alone: the path before) and transformers' warpers."""

import jax
import numpy as np
import pytest
import torch

from theworld_jax import sampling

filter_logits = jax.jit(sampling.filter_logits, static_argnames="config")
choose = jax.jit(sampling.choose, static_argnames="config")
TINY = 1e-6
ALMOST_ONE = 1 - 2 ** -24  # the largest float32 below 1


def ours(logits, top_k: int, top_p: float, temperature: float = 1.0, limit: int | None = None) -> np.ndarray:
    vocab = logits.shape[1]
    config = sampling.SamplingConfig.make(vocab_limit=limit or vocab, vocab_size=vocab, do_sample=True,
                                          temperature=temperature, top_k=top_k, top_p=top_p)
    assert config.top_k == top_k and config.use_top_p
    return np.asarray(filter_logits(logits, config, np.float32(temperature), np.float32(top_p)))


def radix(logits, top_k: int, top_p: float, temperature: float = 1.0, limit: int | None = None) -> np.ndarray:
    """top-k's filter, then top-p's radix search over the whole vocabulary on what it left."""
    vocab = logits.shape[1]
    first = sampling.SamplingConfig.make(vocab_limit=limit or vocab, vocab_size=vocab, do_sample=True,
                                         temperature=temperature, top_k=top_k)
    then = sampling.SamplingConfig.make(vocab_limit=vocab, vocab_size=vocab, do_sample=True, top_p=top_p)
    cut = filter_logits(logits, first, np.float32(temperature), np.float32(1.0))
    return np.asarray(filter_logits(cut, then, np.float32(1.0), np.float32(top_p)))


def rows(batch: int, vocab: int, seed: int) -> np.ndarray:
    """(batch, vocab) float32 logits, each row another distribution: from flat to peaked, rounded (ties
    everywhere, at the k-th value and at the nucleus' edge too), or with fewer finite logits than top_k."""
    rng = np.random.RandomState(seed)
    out = np.empty((batch, vocab), np.float32)
    for i in range(batch):
        kind = (seed + i) % 5
        out[i] = rng.randn(vocab) * [0.3, 2.0, 8.0, 3.0, 1.0][kind]
        if kind == 3:
            out[i] = np.round(out[i])
        if kind == 4:
            out[i, rng.rand(vocab) < 0.97] = -np.inf
    return out


@pytest.mark.parametrize("batch", [1, 8])
def test_top_k_top_p_equals_the_radix_search(batch):
    logits = rows(batch, 1000, batch)
    if batch > 1:
        logits[-1] = -np.inf  # nothing to choose from: everything stays removed
    cut_inside = cut_nothing = 0
    for top_k, temperature in ((1, 1.0), (7, 0.7), (64, 1.3)):
        top_k_only = np.isfinite(radix(logits, top_k, 1.0, temperature, limit=990)).sum(axis=1)
        for top_p in (TINY, 0.3, 0.9, 0.99, 0.999):  # each at least 1e-5 from every partial mass here
            got = ours(logits, top_k, top_p, temperature, limit=990)
            np.testing.assert_array_equal(got, radix(logits, top_k, top_p, temperature, limit=990),
                                          err_msg=f"top_k={top_k} top_p={top_p}")
            kept = np.isfinite(got).sum(axis=1)
            assert (kept[:7] >= 1).all() and (kept <= top_k_only).all()
            cut_inside += (kept < top_k_only).sum()
            cut_nothing += (kept[:7] == top_k_only[:7]).sum()
        if batch > 1:
            assert np.isneginf(got[-1]).all()
    assert min(cut_inside, cut_nothing) >= 5 * batch  # the nucleus inside the top k, and all of it


def test_ties_at_the_edges_are_kept_together():
    """Row 0: the k-th value and the nucleus' smallest tied three times. Row 1: two distinct logits of
    equal probability (float32), kept together as the radix search over probabilities keeps them. top_p
    1 - 2**-24 keeps everything (the least probable survivors weigh 0.5 % and 1.2 %; where they weigh less
    than float32's rounding of the sums, the two searches may differ, as they may from transformers)."""
    logits = np.full((2, 300), -9.0, np.float32)
    logits[0, :8] = [6, 4, 4, 4, 2, 2, 2, 1]
    logits[1, :4] = [0.125, 0.125 - 2 ** -27, -1, -1]
    probs = np.asarray(jax.nn.softmax(logits[:, :8], axis=-1))  # top_k=8's survivors
    assert logits[1, 0] != logits[1, 1] and probs[1, 0] == probs[1, 1]
    mass6, mass4 = probs[0, 0], probs[0, :4].sum()
    for top_k, top_p, kept in [(2, 0.99, (4, 2)), (2, TINY, (1, 2)), (8, TINY, (1, 2)), (8, 0.99, (7, 300)),
                               (8, ALMOST_ONE, (8, 300)),
                               (8, (mass6 + mass4) / 2, (4, 4)), (8, mass4 + 1e-4, (7, 4)),
                               (8, (mass4 + probs[0, :7].sum()) / 2, (7, 4))]:
        got = ours(logits, top_k, top_p)
        np.testing.assert_array_equal(got, radix(logits, top_k, top_p), err_msg=f"top_k={top_k} top_p={top_p}")
        assert tuple(np.isfinite(got).sum(axis=1)) == kept, (top_k, top_p)


def test_top_k_top_p_matches_transformers_warpers():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    spread = np.array([[0.5], [1], [2], [3], [4], [5], [6], [8]], np.float32)
    logits = np.random.RandomState(3).randn(8, 500).astype(np.float32) * spread
    for top_k in (64, 8):
        for top_p in (0.01, 0.3, 0.95, 0.999):
            ref = torch.from_numpy(logits)
            for warper in (TopKLogitsWarper(top_k), TopPLogitsWarper(top_p)):
                ref = warper(torch.zeros((8, 1), dtype=torch.long), ref)
            np.testing.assert_array_equal(ours(logits, top_k, top_p), ref.numpy(), err_msg=f"{top_k} {top_p}")


def test_draws_stay_in_the_nucleus():
    logits = np.random.RandomState(5).randn(1, 2000).astype(np.float32)
    config = sampling.SamplingConfig.make(vocab_limit=2000, vocab_size=2000, do_sample=True, top_k=64, top_p=0.5)
    kept = np.isfinite(ours(logits, 64, 0.5))[0]
    draws = np.asarray(jax.vmap(lambda key: choose(logits, key, config, np.float32(1.0), np.float32(0.5)))(
        jax.random.split(jax.random.key(0), 2000)))[:, 0]
    assert 1 < kept.sum() < 64 and kept[draws].all() and len(set(draws.tolist())) == kept.sum()
