"""The processor: loaded back from a TheWorld checkpoint without transformers' model-type warning."""

import json

import pytest

from theworld_jax.processing import load_processor
from tests.helpers.tiny_gemma import build_processor


@pytest.fixture(scope="module")
def processor():
    return build_processor()


@pytest.mark.parametrize("model_type, text_only", [("theworld_jax", False), ("the_world", True)])
def test_processor_of_a_theworld_checkpoint_loads_without_warning(tmp_path, capfd, caplog, processor, model_type,
                                                                  text_only):
    (processor.tokenizer if text_only else processor).save_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    capfd.readouterr()
    loaded = load_processor(str(tmp_path))
    assert "model of type" not in capfd.readouterr().err + caplog.text
    if text_only:
        assert loaded.get_vocab() == processor.tokenizer.get_vocab()
    else:
        assert type(loaded) is type(processor) and loaded.to_dict() == processor.to_dict()
