"""python -m convert: HF / diffusers / upstream checkpoints -> Orbax, and export back to upstream."""

import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file

import theworld_reference as ref
from theworld_jax.convert import main
from theworld_jax import CosmosVAE, TheWorld
from tiny_gemma import build_processor, build_tiny_gemma3, save_tiny_gemma3
from tiny_vae import make_tiny_vae


def params_of(module):
    return {"/".join(map(str, p)): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def assert_same_params(a, b):
    pa, pb = params_of(a), params_of(b)
    assert sorted(pa) == sorted(pb)
    for key in pa:
        np.testing.assert_array_equal(pa[key], pb[key], err_msg=key)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    gemma = build_tiny_gemma3()
    save_tiny_gemma3(gemma, build_processor(), str(root / "gemma"), layout="hub")
    make_tiny_vae(str(root / "vae"), "cosmos_like")
    torch.manual_seed(0)
    projector = ref.TorchWorldProjector(4, gemma.config.text_config.hidden_size, "mlp")
    ref.save_upstream_checkpoint(str(root / "upstream"), projector, str(root / "gemma"), str(root / "vae"),
                                 "spatial", "mlp", 4)
    return root


def test_gemma3_converts_to_the_same_params(sources):
    out = str(sources / "gemma_orbax")
    assert main(["gemma3", "--src", str(sources / "gemma"), "--dst", out, "--dtype", "float32"]) == 0
    import jax.numpy as jnp

    direct = TheWorld.from_pretrained(str(sources / "gemma"), enable_world=False, dtype=jnp.float32)
    assert_same_params(TheWorld.from_pretrained(out, dtype=jnp.float32).model, direct.model)


def test_cosmos_vae_converts_and_loads_back(sources):
    out = str(sources / "vae_orbax")
    assert main(["cosmos-vae", "--src", str(sources / "vae"), "--dst", out]) == 0
    assert_same_params(CosmosVAE.from_pretrained(out), CosmosVAE.from_pretrained(str(sources / "vae")))


def test_upstream_projector_survives_convert_and_export(sources):
    out, back = str(sources / "theworld_orbax"), str(sources / "exported")
    assert main(["theworld", "--gemma", str(sources / "gemma"), "--cosmos", str(sources / "vae"),
          "--projection", str(sources / "upstream"), "--dst", out, "--dtype", "float32"]) == 0
    assert main(["export", "--src", out, "--dst", back]) == 0
    original, exported = load_file(str(sources / "upstream" / "model.safetensors")), load_file(back + "/model.safetensors")
    assert sorted(original) == sorted(exported)
    for key in original:
        np.testing.assert_array_equal(original[key], exported[key], err_msg=key)
    assert TheWorld.from_pretrained(back, gemma_model_name=str(sources / "gemma"),
                                    cosmos_model_name=str(sources / "vae")).config.vae_input_range == "zero_255"


def test_export_of_a_model_without_world_is_refused(sources, capsys):
    out = str(sources / "gemma_only")
    assert main(["gemma3", "--src", str(sources / "gemma"), "--dst", out]) == 0
    assert main(["export", "--src", out, "--dst", str(sources / "nothing")]) == 1
    assert "no world branch" in capsys.readouterr().err
    assert not (sources / "nothing").exists()
