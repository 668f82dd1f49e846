"""top_k with top_p: the nucleus found among the top-k survivors equals the radix search over the vocabulary
(top-k's filter, then top-p's alone: the path before), and transformers' warpers."""

import jax
import numpy as np
import pytest
import torch

from theworld_jax import sampling

filter_logits = jax.jit(sampling.filter_logits, static_argnames="config")
choose = jax.jit(sampling.choose, static_argnames="config")
TINY = np.float32(1e-6)
ALMOST_ONE = np.float32(1 - 2 ** -24)  # the largest float32 below 1


def ours(logits, *, top_k, top_p, temperature=1.0, limit=None):
    config = sampling.SamplingConfig.make(vocab_limit=limit or logits.shape[1], vocab_size=logits.shape[1],
                                          do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    assert config.top_k == top_k and config.use_top_p
    return np.asarray(filter_logits(logits, config, np.float32(temperature), np.float32(top_p)))


def radix(logits, *, top_k, top_p, temperature=1.0, limit=None):
    """top-k's filter, then top-p's radix search over the whole vocabulary on what it left."""
    vocab = logits.shape[1]
    first = sampling.SamplingConfig.make(vocab_limit=limit or vocab, vocab_size=vocab, do_sample=True,
                                         temperature=temperature, top_k=top_k)
    then = sampling.SamplingConfig.make(vocab_limit=vocab, vocab_size=vocab, do_sample=True, top_p=top_p)
    cut = filter_logits(logits, first, np.float32(temperature), np.float32(1.0))
    return np.asarray(filter_logits(cut, then, np.float32(1.0), np.float32(top_p)))


def rows(batch: int, vocab: int, seed: int) -> np.ndarray:
    """(batch, vocab) float32 logits, every row another distribution: spread from flat to peaked, some
    rounded (many ties, at the k-th value too), some with few finite entries."""
    rng = np.random.RandomState(seed)
    out = np.empty((batch, vocab), np.float32)
    for i in range(batch):
        kind = (seed + i) % 5
        x = rng.randn(vocab) * [0.3, 2.0, 8.0, 3.0, 1.0][kind]
        if kind == 3:
            x = np.round(x)  # ties everywhere: at the k-th value and at the nucleus' edge
        if kind == 4:
            x[rng.rand(vocab) < 0.97] = -np.inf  # fewer finite logits than top_k
        out[i] = x
    return out


@pytest.mark.parametrize("batch", [1, 8])
def test_top_k_top_p_equals_the_radix_search(batch):
    vocab = 1000
    for seed, (top_k, top_p, temperature) in enumerate([(64, 0.95, 0.8), (50, 0.5, 1.0), (5, 0.9, 1.3),
                                                        (64, ALMOST_ONE, 1.0), (64, TINY, 1.0), (1, 0.5, 1.0),
                                                        (200, 0.99, 2.0)]):
        logits = rows(batch, vocab, seed)
        got = ours(logits, top_k=top_k, top_p=top_p, temperature=temperature, limit=990)
        np.testing.assert_array_equal(got, radix(logits, top_k=top_k, top_p=top_p, temperature=temperature,
                                                 limit=990), err_msg=f"top_k={top_k} top_p={top_p}")
        assert np.isfinite(got).any(axis=1).all()


def test_ties_at_the_edges_are_kept_together():
    """The k-th value tied three times, then the nucleus' smallest probability tied three times."""
    logits = np.full((3, 300), -5.0, np.float32)
    logits[:, :8] = [[6, 4, 4, 4, 2, 2, 2, 1]] * 3
    probs = np.exp(logits[0, :8] - 6) / np.exp(logits[0, :8] - 6).sum()  # top_k=8's survivors
    mass6, mass4 = probs[0], probs[:4].sum()
    for top_k, top_p, kept in [(2, 0.99, 4), (5, 0.99, 7), (8, (mass6 + mass4) / 2, 4), (8, mass6 / 2, 1),
                               (8, mass4 + 1e-4, 7), (8, 0.5 * mass4 + 0.5 * probs[:7].sum(), 7)]:
        got = ours(logits, top_k=top_k, top_p=np.float32(top_p))
        np.testing.assert_array_equal(got, radix(logits, top_k=top_k, top_p=np.float32(top_p)))
        assert (np.isfinite(got).sum(axis=1) == kept).all(), (top_k, top_p)


def test_a_row_of_minus_infinity_keeps_everything():
    logits = rows(4, 300, 0)
    logits[1] = -np.inf
    got = ours(logits, top_k=10, top_p=0.9)
    np.testing.assert_array_equal(got, radix(logits, top_k=10, top_p=0.9))
    assert np.isneginf(got[1]).all()


@pytest.mark.parametrize("batch", [1, 8])
def test_top_k_top_p_matches_transformers_warpers(batch):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = np.random.RandomState(batch).randn(batch, 500).astype(np.float32) * 3  # no ties
    for top_k, top_p in [(64, 0.95), (30, 0.3), (100, 0.999), (8, 0.01)]:
        ref = torch.from_numpy(logits)
        for warper in (TopKLogitsWarper(top_k), TopPLogitsWarper(top_p)):
            ref = warper(torch.zeros((batch, 1), dtype=torch.long), ref)
        np.testing.assert_array_equal(ours(logits, top_k=top_k, top_p=top_p), ref.numpy())


def test_draws_stay_in_the_nucleus():
    logits = np.random.RandomState(5).randn(1, 2000).astype(np.float32)
    config = sampling.SamplingConfig.make(vocab_limit=2000, vocab_size=2000, do_sample=True, top_k=64, top_p=0.5)
    kept = np.isfinite(ours(logits, top_k=64, top_p=0.5))[0]
    draws = np.asarray(jax.vmap(lambda key: choose(logits, key, config, np.float32(1.0), np.float32(0.5)))(
        jax.random.split(jax.random.key(0), 2000)))[:, 0]
    assert 1 < kept.sum() < 64 and kept[draws].all() and len(set(draws.tolist())) == kept.sum()
