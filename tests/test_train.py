"""The training launcher on the tiny config (issue 11, point 7).

Two stages, as upstream trains: stage 1 trains the projector only; stage 2 (`init=` stage 1's final/)
unfreezes the language model. Stage 2 is the reference run that the other runs must reproduce: killed
with SIGKILL and restarted (bitwise), on 8 simulated devices and on 2 processes (float32, tight
tolerance). Every run trains 8 rows per step (batch_size x devices x accumulation), so all see the same
rows in the same order.

Every run is a subprocess with the same environment: XLA's CPU backend optimisations are off (compiling
takes half the time; every run compiles alike, so the comparisons stand) and the runs share a persistent
compilation cache (the resumed run reuses the reference's executable). The runs that need only stage 1
start together with the reference run, so that their compiles overlap on the cores.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from theworld_jax.train.config import TrainConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
STEPS = 6
COMMON = [f"steps={STEPS}", "checkpoint_every=2", "log_every=1", "seed=0", "progress_bar=false", "data.eval=null",
          "data.num_threads=1", "optimizer.warmup_steps=1", "optimizer.learning_rate=1e-2"]
STAGE2 = ["model.freeze_gemma_language=false"]  # + init= stage 1's final/


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("jax-cache")


def _env(cache_dir, devices: int = 1) -> dict:
    return dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu",
                JAX_DEFAULT_MATMUL_PRECISION="highest", TOKENIZERS_PARALLELISM="false",
                JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0 "
                          "--xla_llvm_disable_expensive_passes=true")


def _launch(cache_dir, out, *overrides, devices=1, env_extra=None, module="train") -> subprocess.Popen:
    env = {**_env(cache_dir, devices), **(env_extra or {})}
    cmd = [sys.executable, "-m", module, "--config", TINY, f"output_dir={out}", *COMMON, *overrides]
    log = tempfile.TemporaryFile("w+")  # not a pipe: runs that nobody reads yet never block on a full one
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    return proc


def _finish(proc: subprocess.Popen, expect_rc: int = 0) -> str:
    proc.wait(timeout=900)
    proc.log.seek(0)
    out = proc.log.read()
    proc.log.close()
    assert proc.returncode == expect_rc, out[-3000:]
    return out


def _params(directory) -> dict[str, np.ndarray]:
    """A saved model's parameters (path -> array) on this process's one device, whatever mesh wrote them."""
    import jax
    import orbax.checkpoint as ocp

    path = os.path.join(directory, "params")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as ckpt:
        meta = ckpt.metadata(path)
        tree = getattr(getattr(meta, "item_metadata", meta), "tree", getattr(meta, "item_metadata", meta))
        target = {k: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device) for k, m in tree.items()}
        restored = ckpt.restore(path, target)
    return {k: np.asarray(v) for k, v in restored.items()}


def _group(params: dict, *prefixes: str) -> dict:
    picked = {k: v for k, v in params.items() if k.startswith(prefixes)}
    assert picked, prefixes
    return picked


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, cache_dir):
    """Projector only (the default freeze flags), 2 steps; through `python -m theworld_jax.train`."""
    out = tmp_path_factory.mktemp("stage1")
    _finish(_launch(cache_dir, out, "steps=2", "model.freeze_gemma_language=true", "data.batch_size=8",
                    module="theworld_jax.train"))
    return out / "final"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def started(request, tmp_path_factory, cache_dir, stage1):
    """The slow tests' runs that need only stage 1, started before the reference run so that the
    processes overlap on the cores (the tests wait for them). Only those of the selected tests."""
    selected = {item.name for item in request.session.items}
    runs = {}
    if "test_sigkill_and_resume_is_bitwise" in selected:
        out = tmp_path_factory.mktemp("killed")
        runs["killed"] = out, [_launch(cache_dir, out, f"init={stage1}", *STAGE2, "data.batch_size=8",
                                       env_extra={"THEWORLD_TRAIN_SIGKILL_AFTER_STEP": "5"})]
    if "test_eight_devices_equal_one" in selected:
        out = tmp_path_factory.mktemp("eight")
        runs["eight"] = out, [_launch(cache_dir, out, f"init={stage1}", *STAGE2, "data.batch_size=1", devices=8)]
    if "test_two_processes_equal_one" in selected:
        out, port = tmp_path_factory.mktemp("two"), _free_port()
        runs["two"] = out, [_launch(cache_dir, out, f"init={stage1}", *STAGE2, "data.batch_size=2",
                                    "optimizer.accumulation=2", f"distributed.coordinator_address=localhost:{port}",
                                    "distributed.num_processes=2", f"distributed.process_id={i}") for i in range(2)]
    yield runs
    for _, procs in runs.values():
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir, stage1, started):
    """Stage 2, uninterrupted, 1 process, 1 device, 8 rows per micro-batch, with a held-out evaluation."""
    out = tmp_path_factory.mktemp("reference")
    log = _finish(_launch(cache_dir, out, f"init={stage1}", *STAGE2, "data.batch_size=8", "eval_every=6",
                          "data.eval=theworld_jax/data/tiny/eval.jsonl"))
    assert "compiled 1x" in log
    return out


def test_loss_falls_and_outputs(reference):
    records = [json.loads(line) for line in open(reference / "metrics.jsonl")]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    for r in steps:
        assert {"step", "loss", "learning_rate", "tokens_per_s"} <= set(r)
    assert steps[-1]["loss"] < 0.8 * steps[0]["loss"], [r["loss"] for r in steps]
    assert any("eval_loss" in r for r in records)
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(reference / "tensorboard"))
    assert sorted(os.listdir(reference / "checkpoints"), key=int) == ["2", "4", "6"]


def test_stages_frozen_bitwise_and_init(reference, stage1):
    """Frozen parameters are bitwise unchanged through both stages; stage 1 moved only the projector,
    stage 2 (init=stage 1's final/) moved the language model too; final/ loads with from_pretrained."""
    import jax.numpy as jnp

    from theworld_jax import TheWorld
    from theworld_jax.train import model as model_lib
    from theworld_jax.weights.loader import param_path
    from flax import nnx

    config = load_config(TINY, COMMON)
    initial = model_lib.build_theworld(config.model, init=None, seed=0)
    start = {param_path(p): np.asarray(v.get_value())
             for p, v in nnx.to_flat_state(nnx.state(initial.model, nnx.Param))}
    one, two = _params(stage1), _params(reference / "final")
    assert start.keys() == one.keys() == two.keys()
    frozen = ("gemma.vision_tower.", "gemma.multi_modal_projector.", "vae.")
    for key in _group(start, *frozen):
        np.testing.assert_array_equal(two[key], start[key], err_msg=key)
    for key in _group(start, "gemma.language_model."):
        np.testing.assert_array_equal(one[key], start[key], err_msg=key)  # frozen in stage 1
    assert all(not np.array_equal(two[k], one[k]) for k in _group(start, "gemma.language_model."))
    assert all(not np.array_equal(one[k], start[k]) for k in _group(start, "world_projector."))
    assert all(not np.array_equal(two[k], one[k]) for k in _group(start, "world_projector."))
    trained = TheWorld.from_pretrained(str(reference / "final"), dtype=jnp.float32)
    assert trained.config.freeze_gemma_language is False


def test_init_starts_from_the_earlier_run(stage1, tmp_path):
    """`init=DIR`: stage 2 starts from stage 1's values (projector included) with its own freeze set."""
    from theworld_jax.train.loop import setup

    config = load_config(TINY, [f"output_dir={tmp_path}", *COMMON, f"init={stage1}", *STAGE2])
    run, state, _, _ = setup(config)
    one = _params(stage1)
    params = {k: np.asarray(v) for k, v in state["params"].items()}
    assert any(k.startswith("gemma.language_model.") for k in params)
    assert not any(k.startswith(("vae.", "gemma.vision_tower.")) for k in params)
    for key in _group(params, "world_projector.", "gemma.language_model."):
        np.testing.assert_array_equal(params[key], one[key], err_msg=key)


def test_collective_final_save_clears_what_a_killed_save_left(stage1, tmp_path):
    """A run killed while writing final/ leaves its temporaries in output_dir; the next save removes them
    and replaces the earlier final/ (each of them the run's own), nothing else."""
    import jax.numpy as jnp

    from theworld_jax import TheWorld
    from theworld_jax.train import outputs

    theworld = TheWorld.from_pretrained(str(stage1), dtype=jnp.float32)  # stage 1 trained in float32
    for leftover in (".final.tmp-collective", ".final.tmp-collective-old", "final"):
        (tmp_path / leftover).mkdir()
        (tmp_path / leftover / "stale").write_text("x")
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    outputs.save_final_collectively(theworld, str(tmp_path / "final"))
    assert sorted(os.listdir(tmp_path)) == ["final", "metrics.jsonl"]
    saved, original = _params(tmp_path / "final"), _params(stage1)
    assert saved.keys() == original.keys()
    for key in saved:
        np.testing.assert_array_equal(saved[key], original[key], err_msg=key)


def test_dataset_image_starts_are_the_fused_image_positions():
    """Dataset.image_starts (the training Layout's block_start comes from them) are where each row's image
    begins once the world markers and tokens are in: after <bos>, <sow>, the world tokens and <eow>."""
    from theworld_jax.train import data as data_lib
    from theworld_jax.train import model as model_lib
    from theworld_jax.tiny import DATA_DIR

    config = load_config(TINY, [])
    theworld = model_lib.build_theworld(config.model, init=None, seed=0)
    extra, world = model_lib.extra_tokens(theworld), theworld.num_world_tokens(1)
    sow_id = theworld.config.sow_token_id
    encoder = data_lib.Encoder(theworld.processor, theworld.gemma_config.image_token_id, world_marker_id=sow_id)
    dataset = data_lib.load_dataset(os.path.join(DATA_DIR, "train.jsonl"), config.data, encoder, extra_tokens=extra)
    loader = data_lib.Loader(dataset, encoder, model_lib.image_preparer(theworld), extra_tokens=extra, pad_id=0,
                             num_threads=1)
    batch = model_lib.prepare(theworld, loader.batch(np.arange(3), 96))
    image = np.argmax(batch["token_type_ids"] == 1, axis=1)
    sow = np.argmax(batch["input_ids"] == sow_id, axis=1)
    assert (sow < image).all()
    np.testing.assert_array_equal(dataset.image_starts[:3], image + world)
    assert model_lib.attention_layout(theworld, int(dataset.image_starts.min())).block_start > world


def test_logits_at_labelled_positions_give_the_full_loss():
    """The step's loss (logits at the labelled positions only) equals the full-logits loss, and padding
    the rows further changes nothing."""
    import jax
    from flax import nnx

    from tests.helpers.tiny_training import tiny_training_batches
    from theworld_jax.train import model as model_lib

    theworld, size, (batch, longer) = tiny_training_batches(["model.freeze_gemma_language=false"], (96, 128))
    assert 0 < size < batch["input_ids"].shape[1]
    graphdef, state = nnx.split(theworld.model)
    layout = model_lib.attention_layout(theworld)

    @jax.jit
    def losses(state, batch):
        model = nnx.merge(graphdef, state)
        total, count = model_lib.loss_terms(model, batch, layout=layout, remat="full")
        full = model.forward(batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"],
                             token_type_ids=batch["token_type_ids"], video=batch["video"], labels=batch["labels"],
                             layout=layout)
        return total / count, full.loss, count

    kept, full, count = losses(state, batch)
    assert int(count) == int((batch["labels"][:, 1:] != -100).sum())
    np.testing.assert_allclose(float(kept), float(full), rtol=1e-6)
    # Padded to 128 (what GPUs get): the same loss.
    np.testing.assert_allclose(float(losses(state, longer)[0]), float(kept), rtol=1e-6)


@pytest.mark.slow
def test_sigkill_and_resume_is_bitwise(reference, stage1, started, cache_dir):
    out, (killed,) = started["killed"]
    _finish(killed, expect_rc=-9)
    assert os.path.isdir(out / "checkpoints") and not os.path.exists(out / "final")
    log = _finish(_launch(cache_dir, out, f"init={stage1}", *STAGE2, "data.batch_size=8"))
    assert "resumed from" in log and "at step 4" in log and "compiled 1x" in log, log[-2000:]
    expected, got = _params(reference / "final"), _params(out / "final")
    assert expected.keys() == got.keys()
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]
    assert steps == list(range(1, STEPS + 1))  # the killed run's lines past the checkpoint are dropped


def _close(got: dict, expected: dict) -> None:
    assert expected.keys() == got.keys()
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=2e-4, atol=2e-6, err_msg=key)


@pytest.mark.slow
def test_eight_devices_equal_one(reference, started):
    """8 simulated devices, 1 row each (accumulation 1) == 1 device with 8 rows."""
    out, (proc,) = started["eight"]
    assert "compiled 1x" in _finish(proc)
    _close(_params(out / "final"), _params(reference / "final"))


@pytest.mark.slow
def test_two_processes_equal_one(reference, started):
    """2 processes x 1 device x 2 rows x accumulation 2 == 1 device with 8 rows."""
    out, procs = started["two"]
    logs = [_finish(p) for p in procs]
    assert "compiled 1x" in logs[0]
    _close(_params(out / "final"), _params(reference / "final"))


def test_bad_config_key_names_the_key(tmp_path, cache_dir):
    with pytest.raises(TrainConfigError, match="'optimizer.lerning_rate'"):
        load_config(TINY, ["optimizer.lerning_rate=1e-4"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  train: x.jsonl\n  bucket: 3\n")
    with pytest.raises(TrainConfigError, match="'data.bucket'"):
        load_config(str(bad))
    with pytest.raises(TrainConfigError, match="data.loss_on"):
        load_config(TINY, ["data.loss_on=prompt"])
    proc = subprocess.run([sys.executable, "-m", "train", "--config", TINY, "stepz=3"], cwd=ROOT,
                          env=_env(cache_dir), capture_output=True, text=True)
    assert proc.returncode != 0 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "unknown config key 'stepz'" in proc.stderr


def test_output_dir_not_ours_is_refused(tmp_path):
    from theworld_jax.train.outputs import claim_output_dir

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists"):
        claim_output_dir(str(tmp_path), {})
    assert (tmp_path / "notes.txt").read_text() == "mine"
