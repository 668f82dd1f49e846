"""python -m convert: HF / diffusers / upstream checkpoints -> Orbax, and export back to upstream."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file

from tests.helpers import theworld_reference as ref
from tests.helpers.checkpoints import orbax_params
from tests.helpers.tiny_gemma import build_processor, build_tiny_gemma3, save_tiny_gemma3
from tests.helpers.tiny_vae import make_tiny_vae
from theworld_jax import CosmosVAE, TheWorld
from theworld_jax.convert import main
from theworld_jax.weights.safetensors_io import CheckpointError


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


_KILLABLE = """
import sys, time
from theworld_jax import io_safety
def wait_instead_of_swapping(tmp, target):
    print(tmp, flush=True)  # the output is written; the process is killed before it is put in place
    time.sleep(120)
io_safety._swap_in = wait_instead_of_swapping
from theworld_jax.convert import main
main(sys.argv[1:])
"""


def test_a_convert_killed_midway_leaves_nothing_that_the_rerun_does_not_clean(sources, capsys, monkeypatch):
    import os
    import signal
    import subprocess
    import sys

    parent = sources / "killed"
    parent.mkdir()
    (parent / ".keep.tmp-not-ours").mkdir()
    out = str(parent / "out")
    argv = ["gemma3", "--src", str(sources / "gemma"), "--dst", out]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-c", _KILLABLE, *argv], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": repo})
    tmp = proc.stdout.readline().strip()
    assert os.path.basename(tmp).startswith(".out.tmp-") and os.path.isdir(os.path.join(tmp, "params"))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert sorted(os.listdir(parent)) == [".keep.tmp-not-ours", os.path.basename(tmp)]

    monkeypatch.setenv("THEWORLD_PROGRESS", "1")
    assert main(argv) == 0
    assert sorted(os.listdir(parent)) == [".keep.tmp-not-ours", "out"]
    assert "writing" in capsys.readouterr().err
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
    TheWorld.from_pretrained(out)
    (parent / "again").mkdir()
    assert main([*argv[:-1], str(parent / "again"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_save_pretrained_onto_a_file_keeps_it_unless_asked(sources, tmp_path):
    import os

    from theworld_jax.io_safety import UnsafeTargetError

    model = TheWorld.from_pretrained(str(sources / "gemma"), enable_world=False)
    target = tmp_path / "model"
    target.write_text("my notes")
    with pytest.raises(UnsafeTargetError, match="is a file"):
        model.save_pretrained(str(target))
    assert target.read_text() == "my notes" and os.listdir(tmp_path) == ["model"]
    with pytest.raises(UnsafeTargetError, match="is the source"):
        model.save_pretrained(str(sources / "gemma"), overwrite=True)
    model.save_pretrained(str(target), overwrite=True)
    assert os.path.isdir(target / "params") and os.listdir(tmp_path) == ["model"]


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_a_truncated_safetensors_file_is_named(sources, tmp_path):
    broken = _copy(sources / "gemma", tmp_path / "gemma")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file.*truncated") as e:
        TheWorld.from_pretrained(str(broken), enable_world=False)
    assert str(weights) in str(e.value) and "\n" not in str(e.value)


def test_a_missing_shard_is_named(sources, tmp_path):
    import json

    broken = _copy(sources / "gemma", tmp_path / "gemma")
    (broken / "model.safetensors").rename(broken / "model-00001-of-00002.safetensors")
    keys = load_file(str(broken / "model-00001-of-00002.safetensors"))
    index = {"weight_map": {k: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, k in enumerate(keys)}}
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors\.index\.json names shard .*00002-of-00002"):
        TheWorld.from_pretrained(str(broken), enable_world=False)


def test_a_corrupt_orbax_checkpoint_is_named_in_one_line(sources, tmp_path, capsys):
    out = tmp_path / "orbax"
    assert main(["gemma3", "--src", str(sources / "gemma"), "--dst", str(out)]) == 0
    corrupt = _copy(out, tmp_path / "corrupt")
    for data in (corrupt / "params").glob("ocdbt.process_*/d/*"):
        data.write_bytes(data.read_bytes()[:10])
    with pytest.raises(CheckpointError, match=r"corrupt/params: cannot read the Orbax checkpoint's arrays") as e:
        TheWorld.from_pretrained(str(corrupt))
    assert "\n" not in str(e.value) and len(str(e.value)) < 500
    unreadable = _copy(out, tmp_path / "unreadable")
    (unreadable / "params" / "_METADATA").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"unreadable/params: .*corrupt"):
        TheWorld.from_pretrained(str(unreadable))
    from theworld_jax import chat

    assert chat.main(["--model", str(corrupt), "--prompt", "hi"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "corrupt/params" in lines[-1], lines


@pytest.mark.parametrize("command,dtype", [("gemma3", "bfloat16"), ("gemma3", "float32"), ("cosmos-vae", "bfloat16")])
def test_convert_writes_the_requested_dtype(sources, tmp_path, command, dtype):
    import os

    src = sources / ("gemma" if command == "gemma3" else "vae")
    umask = os.umask(0o027)  # every file and directory written follows the user's umask
    try:
        main([command, "--src", str(src), "--dst", str(tmp_path / "out"), "--dtype", dtype])
    finally:
        os.umask(umask)
    written = orbax_params(str(tmp_path / "out"))
    assert written and {d for _, d in written.values()} == {jnp.dtype(dtype)}
    paths = [str(tmp_path / "out")] + [os.path.join(d, n) for d, ds, fs in os.walk(tmp_path / "out") for n in ds + fs]
    modes = {p: oct(os.stat(p).st_mode & 0o777) for p in paths}
    assert len(modes) > 5 and {m for p, m in modes.items() if os.path.isdir(p)} == {oct(0o750)}
    assert {m for p, m in modes.items() if not os.path.isdir(p)} == {oct(0o640)}, modes
