"""Host time per call of generate's two programs, with the real model's structure at tiny widths (CPU).

The prefill (`generation.start`) and each decode call (`Decoding.advance`) pass every parameter of the
model to a jitted program: with Gemma 3 4B's 34 decoder layers and 27-layer SigLIP that is 883 arrays, so
reading them and dispatching is paid on every call, on top of the device's work. This builds that
structure with 32-wide layers (the device work is then small) and times, on any backend: `start` of a
100-token prompt, and `advance(1)`, the call a token-by-token stream makes. Median of --repeats calls.

    python -m bench.host_overhead --out bench/results/host_overhead_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench.common import log  # noqa: E402
from tests.helpers.tiny_gemma import tiny_gemma3_config  # noqa: E402
from theworld_jax import generation  # noqa: E402
from theworld_jax.config.gemma3 import Gemma3Config  # noqa: E402
from theworld_jax.inputs import Batch  # noqa: E402
from theworld_jax.modeling.gemma3 import Gemma3Model  # noqa: E402

LAYER_TYPES = (["sliding_attention"] * 5 + ["full_attention"]) * 5 + ["sliding_attention"] * 4  # Gemma 3 4B


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="a JSON file for the figures")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    hf = tiny_gemma3_config(text_config=dict(num_hidden_layers=len(LAYER_TYPES), layer_types=LAYER_TYPES,
                                             hidden_size=32, intermediate_size=32),
                            vision_config=dict(num_hidden_layers=27))
    model = Gemma3Model(Gemma3Config.from_dict(hf.to_dict()), dtype=jnp.float32, rngs=nnx.Rngs(0))
    arrays = len(jax.tree.leaves(nnx.state(model)))
    ids = np.random.RandomState(0).randint(10, 200, (1, 100)).astype(np.int32)
    batch = Batch(input_ids=ids, attention_mask=np.ones_like(ids))
    options = dict(max_new_tokens=4 * args.repeats, eos_token_id=())
    decoding = generation.start(model, batch, **options)  # compiles both programs
    decoding.advance(1)
    start_ms = median_ms(lambda: generation.start(model, batch, **options), args.repeats)
    advance_ms = median_ms(lambda: decoding.advance(1), args.repeats)
    report = dict(backend=jax.default_backend(), device=str(jax.devices()[0]), arrays=arrays, jax=jax.__version__,
                  start_ms=start_ms, advance_one_ms=advance_ms, repeats=args.repeats)
    log(f"{arrays} arrays on {report['device']}: start {start_ms:.1f} ms, advance(1) {advance_ms:.1f} ms")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
