"""The text/image processor: a transformers Gemma3Processor with TheWorld's two world tokens."""

from __future__ import annotations

import os

from theworld_jax import sources

SOW_TOKEN = "<start_of_world>"
EOW_TOKEN = "<end_of_world>"
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer.json",
                    "tokenizer_config.json", "tokenizer.model")


def has_processor(directory: str) -> bool:
    return os.path.isdir(directory) and any(
        os.path.exists(os.path.join(directory, name)) for name in _PROCESSOR_FILES)


def load_processor(directory: str):
    """The processor saved in `directory` (AutoProcessor), or None when the directory holds none.

    The config.json of a TheWorld checkpoint is not a transformers config: there the Gemma3Processor (or,
    for text-only Gemma, the tokenizer) is loaded with a Gemma 3 config given, so that transformers does
    not read our config.json as one of its own (and warn that its model type is not theirs).
    """
    if not has_processor(directory):
        return None
    import transformers

    if sources.detect(directory) == "gemma3":
        return transformers.AutoProcessor.from_pretrained(directory)
    given = dict(config=transformers.Gemma3Config())
    if os.path.exists(os.path.join(directory, "processor_config.json")):
        return transformers.Gemma3Processor.from_pretrained(directory, **given)
    return transformers.AutoTokenizer.from_pretrained(directory, **given)


def add_world_tokens(processor, vocab_size: int) -> tuple[int, int]:
    """Add <start_of_world>/<end_of_world> to the processor's tokenizer; return their ids.

    New tokens get ids len(tokenizer) and len(tokenizer)+1 (262145 and 262146 for Gemma 3), which fall
    inside the model's padded embedding; an id at or past `vocab_size` is an error, since the embedding
    has no row for it. A tokenizer that already holds both tokens (one saved by TheWorld) keeps them.
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    vocab = tokenizer.get_vocab()
    if SOW_TOKEN not in vocab or EOW_TOKEN not in vocab:
        tokenizer.add_tokens([SOW_TOKEN, EOW_TOKEN], special_tokens=True)
    sow_id, eow_id = tokenizer.convert_tokens_to_ids([SOW_TOKEN, EOW_TOKEN])
    for name, token_id in ((SOW_TOKEN, sow_id), (EOW_TOKEN, eow_id)):
        if token_id >= vocab_size:
            raise ValueError(
                f"{name} got id {token_id}, but the language model's embedding has only {vocab_size} rows")
    return int(sow_id), int(eow_id)


def original_vocab_size(processor, default: int) -> int:
    """Ids at or past this are never generated: the tokenizer's length before the world tokens."""
    if processor is None:
        return default
    tokenizer = getattr(processor, "tokenizer", processor)
    vocab = tokenizer.get_vocab()
    extra = sum(token in vocab for token in (SOW_TOKEN, EOW_TOKEN))
    return len(tokenizer) - extra
