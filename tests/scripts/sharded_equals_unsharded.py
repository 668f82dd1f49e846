"""Run from the repository root as `python -m tests.scripts.sharded_equals_unsharded` with
XLA_FLAGS=--xla_force_host_platform_device_count=8: TheWorld on a (1, 4, 2) mesh gives the logits and
greedy tokens of the unsharded model. Prints OK on success."""

import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

jax.config.update("jax_default_matmul_precision", "highest")

from theworld_jax import TheWorld  # noqa: E402
from theworld_jax.sharding import HIDDEN, activate, constrain, make_mesh  # noqa: E402
from tests.helpers.tiny_gemma import build_processor, build_tiny_gemma3, save_tiny_gemma3  # noqa: E402
from tests.helpers.tiny_vae import make_tiny_vae  # noqa: E402

assert len(jax.devices()) == 8, jax.devices()
root = tempfile.mkdtemp()
save_tiny_gemma3(build_tiny_gemma3(), build_processor(), os.path.join(root, "gemma"), layout="hub")
make_tiny_vae(os.path.join(root, "vae"), "cosmos_like")
kw = dict(enable_world=True, cosmos_model_name=os.path.join(root, "vae"), dtype=jnp.float32, vae_image_size=(32, 32))
plain = TheWorld.from_pretrained(os.path.join(root, "gemma"), **kw)
mesh = make_mesh(data=1, fsdp=4, tensor=2)
sharded = TheWorld.from_pretrained(os.path.join(root, "gemma"), mesh=mesh, **kw)

embedding = sharded.model.gemma.language_model.embed_tokens.embedding.get_value()
assert tuple(embedding.sharding.spec) == ("tensor", "fsdp"), embedding.sharding.spec
q = sharded.model.gemma.language_model.layers[0].self_attn.q_proj.kernel.get_value()
assert tuple(q.sharding.spec) == ("fsdp", "tensor", None), q.sharding.spec
k = sharded.model.gemma.language_model.layers[0].self_attn.k_proj.kernel.get_value()
assert tuple(k.sharding.spec) == ("fsdp", None, None), k.sharding.spec  # 1 kv head: not split over tensor=2

with activate(mesh):  # the decoder-layer boundary constraint: batch over data and fsdp
    hidden = jax.jit(lambda x: constrain(x, HIDDEN))(jnp.zeros((4, 5, 64)))
assert hidden.sharding.spec[0] in ("fsdp", ("data", "fsdp")), hidden.sharding.spec

rng = np.random.RandomState(0)
images = [rng.randint(0, 256, (40, 50, 3), dtype=np.uint8) for _ in range(4)]
prompts = ["<bos>Hello <start_of_image> what?", "<bos>A cat <start_of_image> on a chair by the window",
           "<bos>Short <start_of_image>", "<bos>The <start_of_image> world is big and round"]
enc = dict(plain.processor(text=prompts, images=[[Image.fromarray(i)] for i in images], padding=True,
                           return_tensors="np"))
ours, ref = sharded(**enc, images=images), plain(**enc, images=images)
valid = np.asarray(ref.attention_mask).astype(bool)
diff = np.abs(np.asarray(ours.logits) - np.asarray(ref.logits))[valid].max()
assert diff <= 1e-5 * max(1.0, np.abs(np.asarray(ref.logits)[valid]).max()), diff
gen_kw = dict(images=images, max_new_tokens=6, eos_token_id=())
np.testing.assert_array_equal(sharded.generate(**enc, **gen_kw), plain.generate(**enc, **gen_kw))

saved = os.path.join(root, "saved")
sharded.save_pretrained(saved)
again = TheWorld.from_pretrained(saved, mesh=mesh, dtype=jnp.float32)
assert again.model.gemma.language_model.layers[0].self_attn.q_proj.kernel.get_value().sharding.spec == q.sharding.spec
np.testing.assert_allclose(np.asarray(again(**enc, images=images).logits), np.asarray(ours.logits), rtol=0, atol=1e-6)
print("OK", diff)
