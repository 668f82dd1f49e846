"""World-token fusion against a plain per-row reference written here, and the loss against torch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from theworld_jax.inputs import check_fused_length, inject_world_tokens, validate_world_batch
from theworld_jax.modeling.fusion import FusedBatch, causal_lm_loss, causal_lm_loss_terms, splice_world

PAD, BOS, SOW, EOW = 0, 2, 40, 41
N, D = 4, 6


def batch():
    """Three rows: unpadded, left-padded, <sow> later in the row (after a prompt)."""
    ids = np.array([[BOS, SOW, EOW, 5, 6, 7, 8, 9, 10],
                    [PAD, PAD, BOS, SOW, EOW, 5, 6, 7, 8],
                    [BOS, 11, 12, SOW, EOW, 13, 14, 15, 16]], np.int32)
    mask = (ids != PAD).astype(np.int32)
    types = np.zeros_like(ids)
    types[0, 5:7] = 1
    types[2, 1:3] = 1
    labels = np.where(mask == 1, ids + 100, -100).astype(np.int32)
    labels[0, 3] = -100
    rng = np.random.default_rng(0)
    embeds = rng.normal(size=ids.shape + (D,)).astype(np.float32)
    world = rng.normal(size=(ids.shape[0], N, D)).astype(np.float32)
    return embeds, ids, mask, types, labels, world


def reference_splice(embeds, ids, mask, types, labels, world, world_type):
    """One row at a time, with Python lists: the spec of docs/design.md section 3, read literally."""
    out = {k: [] for k in ("embeds", "mask", "types", "labels", "positions")}
    for b in range(ids.shape[0]):
        s = list(ids[b]).index(SOW)
        row_labels = list(labels[b])
        row_labels[s] = -100
        row_labels[s + 1] = -100  # <eow>
        out["embeds"].append(np.concatenate([embeds[b, :s + 1], world[b], embeds[b, s + 1:]]))
        out["mask"].append(list(mask[b, :s + 1]) + [1] * N + list(mask[b, s + 1:]))
        out["types"].append(list(types[b, :s + 1]) + [world_type] * N + list(types[b, s + 1:]))
        out["labels"].append(row_labels[:s + 1] + [-100] * N + row_labels[s + 1:])
        seen, positions = 0, []
        for m in out["mask"][-1]:
            seen += m
            positions.append(max(seen - 1, 0))
        out["positions"].append(positions)
    return {k: np.array(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def jitted():
    return jax.jit(splice_world, static_argnames=("sow_id", "world_attention"))


@pytest.mark.parametrize("mode,world_type", [("causal", 0), ("bidirectional", 1)])
def test_splice_matches_per_row_reference(jitted, mode, world_type):
    embeds, ids, mask, types, labels, world = batch()
    got = jitted(embeds, ids, mask, types, labels, world, sow_id=SOW, world_attention=mode)
    ref = reference_splice(embeds, ids, mask, types, labels, world, world_type)
    np.testing.assert_array_equal(np.asarray(got.embeds), ref["embeds"])
    np.testing.assert_array_equal(np.asarray(got.attention_mask), ref["mask"])
    np.testing.assert_array_equal(np.asarray(got.token_type_ids), ref["types"])
    np.testing.assert_array_equal(np.asarray(got.labels), ref["labels"])
    np.testing.assert_array_equal(np.asarray(got.positions), ref["positions"])


def test_splice_without_token_types_or_labels(jitted):
    embeds, ids, mask, _, _, world = batch()
    causal = jitted(embeds, ids, mask, None, None, world, sow_id=SOW, world_attention="causal")
    assert causal.token_type_ids is None and causal.labels is None
    bidir = jitted(embeds, ids, mask, None, None, world, sow_id=SOW, world_attention="bidirectional")
    ref = reference_splice(embeds, ids, mask, np.zeros_like(ids), ids, world, 1)
    np.testing.assert_array_equal(np.asarray(bidir.token_type_ids), ref["types"])


def test_splice_keeps_dtypes_and_does_not_scale_world():
    embeds, ids, mask, types, labels, world = batch()
    got = splice_world(jnp.asarray(embeds, jnp.bfloat16), ids, mask, types, labels, world, sow_id=SOW)
    assert got.embeds.dtype == jnp.bfloat16 and got.embeds.shape == (3, ids.shape[1] + N, D)
    np.testing.assert_array_equal(np.asarray(got.embeds[1, 4:4 + N], np.float32),
                                  np.asarray(jnp.asarray(world[1], jnp.bfloat16), np.float32))


def test_splice_compiles_once_for_new_values():
    traces = []

    @jax.jit
    def fused(*args):
        traces.append(1)
        return splice_world(*args, sow_id=SOW, world_attention="causal")

    embeds, ids, mask, types, labels, world = batch()
    first = fused(embeds, ids, mask, types, labels, world)
    ids2 = np.array([[PAD, BOS, 5, 6, 7, 8, SOW, EOW, 9]] * 3, np.int32)
    second = fused(embeds + 1, ids2, (ids2 != PAD).astype(np.int32), types, labels, world * 2)
    assert len(traces) == 1
    assert isinstance(second, FusedBatch)
    assert not np.array_equal(np.asarray(first.attention_mask), np.asarray(second.attention_mask))


def test_splice_rejects_bad_shapes():
    embeds, ids, mask, types, labels, world = batch()
    with pytest.raises(ValueError, match=r"world must be \(B, N, D\)"):
        splice_world(embeds, ids, mask, types, labels, world[:, :, :3], sow_id=SOW)
    with pytest.raises(ValueError, match="token_type_ids has shape"):
        splice_world(embeds, ids, mask, types[:, :-1], labels, world, sow_id=SOW)
    with pytest.raises(ValueError, match="world_attention='full'"):
        splice_world(embeds, ids, mask, types, labels, world, sow_id=SOW, world_attention="full")


def reference_inject(ids, mask, types, labels):
    """Per row: find the first real token (BOS) and insert <sow><eow> after it."""
    out = ([], [], [], [])
    for b in range(ids.shape[0]):
        k = list(mask[b]).index(1) + 1
        for dst, src, pair in zip(out, (ids, mask, types, labels), ([SOW, EOW], [1, 1], [0, 0], [-100, -100])):
            dst.append(list(src[b, :k]) + pair + list(src[b, k:]))
    return tuple(np.array(x) for x in out)


def test_inject_after_bos_with_left_padding():
    ids = np.array([[BOS, 5, 6, 7, 8],
                    [PAD, PAD, BOS, 5, 6],
                    [PAD, BOS, 9, 9, 9]], np.int32)
    mask = (ids != PAD).astype(np.int32)
    types = np.zeros_like(ids)
    types[0, 2:4] = 1
    labels = np.where(mask == 1, ids, -100)
    got = inject_world_tokens(ids, mask, types, labels, bos_id=BOS, sow_id=SOW, eow_id=EOW)
    for g, r in zip(got, reference_inject(ids, mask, types, labels)):
        np.testing.assert_array_equal(g, r)
    assert validate_world_batch(got[0], got[1], sow_id=SOW, eow_id=EOW).tolist() == [1, 3, 2]


def test_inject_leaves_marked_batch_and_missing_parts_alone():
    _, ids, mask, types, labels, _ = batch()
    got = inject_world_tokens(ids, mask, types, labels, bos_id=BOS, sow_id=SOW, eow_id=EOW)
    assert all(g is x for g, x in zip(got, (ids, mask, types, labels)))
    plain = np.array([[BOS, 5, 6]])
    new_ids, new_mask, new_types, new_labels = inject_world_tokens(plain, None, None, None, bos_id=BOS,
                                                                   sow_id=SOW, eow_id=EOW)
    assert new_ids.tolist() == [[BOS, SOW, EOW, 5, 6]] and new_mask.tolist() == [[1] * 5]
    assert new_types is None and new_labels is None


@pytest.mark.parametrize("rows,message", [
    ([[BOS, SOW, 5, 6]], "has no <end_of_world>"),
    ([[BOS, EOW, SOW, 6]], "comes before"),
    ([[BOS, SOW, EOW, SOW, EOW]], "has 2 <start_of_world>"),
    ([[BOS, SOW, EOW, 5, EOW]], "has 2 <end_of_world>"),
    ([[BOS, SOW, 5, EOW, 6]], "1 token"),
    ([[BOS, SOW, EOW, 5], [BOS, 5, 6, 7]], "row 1.*has none while other rows"),
    ([[BOS, 5, EOW, 6]], "row 0 has <end_of_world>"),
])
def test_validate_rejects_malformed_markers(rows, message):
    with pytest.raises(ValueError, match=message):
        validate_world_batch(np.array(rows), sow_id=SOW, eow_id=EOW)


def test_validate_rejects_markers_on_padding():
    ids = np.array([[SOW, EOW, BOS, 5]])
    with pytest.raises(ValueError, match="padding"):
        validate_world_batch(ids, np.array([[0, 0, 1, 1]]), sow_id=SOW, eow_id=EOW)


def test_inject_errors_name_the_row():
    ids = np.array([[BOS, 5, 6], [PAD, 7, 8]])
    with pytest.raises(ValueError, match=r"row 1 has no BOS \(id 2\)"):
        inject_world_tokens(ids, (ids != PAD).astype(int), None, None, bos_id=BOS, sow_id=SOW, eow_id=EOW)
    with pytest.raises(ValueError, match="row 1 is all padding"):
        inject_world_tokens(ids, np.array([[1, 1, 1], [0, 0, 0]]), None, None, bos_id=BOS, sow_id=SOW,
                            eow_id=EOW)
    with pytest.raises(ValueError, match=r"labels has shape \(2, 2\), expected \(2, 3\)"):
        inject_world_tokens(ids, None, None, ids[:, :2], bos_id=BOS, sow_id=SOW, eow_id=EOW)
    with pytest.raises(ValueError, match="input_ids is empty"):
        inject_world_tokens(np.zeros((0, 3)), None, None, None, bos_id=BOS, sow_id=SOW, eow_id=EOW)


def test_check_fused_length():
    check_fused_length(10, 6, 16)
    with pytest.raises(ValueError, match=r"17 tokens \(11 text \+ 6 world\).*max_position_embeddings 16"):
        check_fused_length(11, 6, 16)


def test_causal_lm_loss_matches_torch_cross_entropy():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 7, 11)).astype(np.float32) * 3
    labels = rng.integers(0, 11, size=(3, 7))
    labels[0, :4] = -100
    labels[2, 5] = -100
    ref = torch.nn.functional.cross_entropy(torch.from_numpy(logits[:, :-1]).reshape(-1, 11),
                                            torch.from_numpy(labels[:, 1:]).reshape(-1), ignore_index=-100)
    got = jax.jit(causal_lm_loss)(logits, labels)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), ref.item(), rtol=1e-6)
    total, count = causal_lm_loss_terms(logits, labels)
    assert int(count) == int((labels[:, 1:] != -100).sum())
    np.testing.assert_allclose(float(total), ref.item() * int(count), rtol=1e-6)


def test_causal_lm_loss_with_no_counted_token_is_zero():
    logits = jnp.ones((2, 4, 5))
    labels = jnp.array([[3, -100, -100, -100], [1, -100, -100, -100]])  # only position 0, which is never a target
    assert float(causal_lm_loss(logits, labels)) == 0.0
    assert int(causal_lm_loss_terms(logits, labels)[1]) == 0
