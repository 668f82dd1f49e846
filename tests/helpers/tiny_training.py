"""Training rows of the tiny config's data set, prepared for the model (the launcher's path)."""

from __future__ import annotations

import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


def tiny_training_batches(overrides: list[str], lengths: tuple[int, ...], rows: int = 3):
    """(theworld, keep size, one batch of the first `rows` rows per padded length in `lengths`): a tiny
    random TheWorld of configs/tiny.yaml with `overrides`, and its launcher batches with "keep"."""
    from theworld_jax.tiny import DATA_DIR
    from theworld_jax.train import data as data_lib
    from theworld_jax.train import model as model_lib
    from theworld_jax.train.config import load_config

    config = load_config(TINY, overrides)
    theworld = model_lib.build_theworld(config.model, init=None, seed=0)
    extra = model_lib.extra_tokens(theworld)
    encoder = data_lib.Encoder(theworld.processor, theworld.gemma_config.image_token_id)
    dataset = data_lib.load_dataset(os.path.join(DATA_DIR, "train.jsonl"), config.data, encoder, extra_tokens=extra)
    loader = data_lib.Loader(dataset, encoder, model_lib.image_preparer(theworld), extra_tokens=extra, pad_id=0,
                             num_threads=1)
    size = model_lib.keep_size(dataset.targets)
    batches = [model_lib.with_keep(model_lib.prepare(theworld, loader.batch(np.arange(rows), length)), size)
               for length in lengths]
    return theworld, size, batches
