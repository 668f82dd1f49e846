"""Full-size TheWorld parity on one GPU: the PyTorch reference composition against theworld_jax.

Random weights, real sizes: Gemma 3 with the gemma-3-4b-it config, diffusers' default AutoencoderKLWan
(the Cosmos-Predict2 VAE: base_dim 96, z_dim 16) and an mlp world projector 16 -> 2560, all float32 with
TF32 off on both sides. One prompt with one 896x896 image (256 soft tokens, token_type_ids) and one world
image (512x512 -> 4096 world tokens): about 4,400 fused tokens. The checkpoints are written to a temp dir
(Gemma in the hub layout, the VAE with save_pretrained, the projector as an upstream TheWorld checkpoint)
and the JAX side loads them through the public API, `TheWorld.from_pretrained(upstream_dir, ...)`.

    python -m bench.theworld_gpu_parity --out bench/results/theworld_gpu_parity     # on a GPU
    python -m bench.theworld_gpu_parity --tiny --out /tmp/parity                     # same path, CPU, tiny

Reports max |logit diff|, max |ref|, relative errors and top-1 agreement over valid positions, the loss
on both sides, and each side's forward wall time (first call, median of 3).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch holds GPU memory first

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


from tests.helpers import theworld_reference as ref  # noqa: E402
from bench.common import GEMMA3_4B_CONFIG, log, randomize_gemma, timed, write_report  # noqa: E402

# The real tokenizer's special ids; every other id is a word "w<id>" (len 262145, like Gemma 3's).
FULL_SPECIALS = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 105: "<start_of_turn>", 106: "<end_of_turn>",
                 255999: "<start_of_image>", 256000: "<end_of_image>", 262144: "<image_soft_token>"}
FULL_TOKENIZER_LEN = 262145



def full_processor():
    """An offline Gemma3Processor with Gemma 3's ids: a word-level tokenizer of 262145 entries, 896 px."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {FULL_SPECIALS.get(i, f"w{i}"): i for i in range(FULL_TOKENIZER_LEN)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        padding_side="left", extra_special_tokens={
            "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"})
    hf_tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    try:
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil as ImageProc
    except ImportError:
        ImageProc = transformers.Gemma3ImageProcessor
    return transformers.Gemma3Processor(image_processor=ImageProc(size={"height": 896, "width": 896}),
                                        tokenizer=hf_tok, image_seq_length=256)


def build(args, device):
    """(processor, gemma, vae, projector, sizes) on `device`, float32, eval mode."""
    import transformers
    from diffusers import AutoencoderKLWan
    from tests.helpers.tiny_vae import TINY_CONFIGS, randomize

    torch.manual_seed(args.seed)
    if args.tiny:
        from tests.helpers.tiny_gemma import build_processor, tiny_gemma3_config

        processor, config, embed_std = build_processor(), tiny_gemma3_config(), 0.05
        vae_kwargs, vae_size, gemma_image = TINY_CONFIGS["cosmos_like"], (64, 64), 56
    else:
        processor, config, embed_std = full_processor(), transformers.Gemma3Config(**GEMMA3_4B_CONFIG), 0.03
        vae_kwargs, vae_size, gemma_image = {}, (512, 512), 896
    config._attn_implementation = args.attn
    with torch.device(device):
        gemma = transformers.Gemma3ForConditionalGeneration(config)
    gemma = randomize_gemma(gemma.float().eval(), args.seed + 1, embed_std)
    vae = randomize(AutoencoderKLWan(**vae_kwargs), args.seed + 2).float().eval().to(device)
    torch.manual_seed(args.seed + 3)
    projector = ref.TorchWorldProjector(vae.config.z_dim, config.text_config.hidden_size, "mlp")
    return processor, gemma, vae, projector.float().eval().to(device), vae_size, gemma_image


def make_inputs(args, processor, gemma_image: int):
    """One prompt with one image (pixel_values, token_type_ids), labels, and one world image."""
    rng = np.random.RandomState(args.seed)
    if args.tiny:
        text = ("<bos>Describe the scene <start_of_image> The robot picks up the blue block and places it "
                "on top of the green one. What happens next?")
    else:
        words = lambda n: " ".join(f"w{i}" for i in rng.randint(1000, 250000, n))  # noqa: E731
        text = f"<bos>{words(3)} <start_of_image> {words(40)}"
    image = Image.fromarray(rng.randint(0, 256, (gemma_image, gemma_image, 3), dtype=np.uint8))
    enc = processor(text=[text], images=[[image]], return_tensors="pt")
    batch = {k: enc[k] for k in ("input_ids", "attention_mask", "pixel_values", "token_type_ids")}
    labels = batch["input_ids"].clone()
    labels[batch["token_type_ids"] == 1] = -100
    batch["labels"] = labels
    world = rng.randint(0, 256, (480, 640, 3), dtype=np.uint8)  # resized to the VAE size on both sides
    return batch, world


def save_checkpoints(workdir, processor, gemma, vae, projector, args) -> str:
    from tests.helpers.tiny_gemma import save_tiny_gemma3

    gemma_dir, vae_dir, upstream_dir = (os.path.join(workdir, n) for n in ("gemma", "vae", "theworld"))
    save_tiny_gemma3(gemma, processor, gemma_dir, layout="hub", shards=1 if args.tiny else 4)
    vae.save_pretrained(vae_dir)
    ref.save_upstream_checkpoint(upstream_dir, projector, gemma_dir, vae_dir, "spatial", "mlp", vae.config.z_dim)
    return upstream_dir


def run_reference(args, device, workdir):
    log(f"building the torch models on {device}")
    processor, gemma, vae, projector, vae_size, gemma_image = build(args, device)
    log(f"saving checkpoints under {workdir}")
    upstream_dir = save_checkpoints(workdir, processor, gemma, vae, projector, args)
    log("torch reference forward")
    batch, world = make_inputs(args, processor, gemma_image)
    sow = len(processor.tokenizer)
    model = ref.TheWorldReference(gemma, vae, projector, sow, sow + 1, mode="spatial",
                                  vae_input_range=args.vae_input_range, vae_size=vae_size)
    dev = {k: v.to(device) for k, v in batch.items()}
    wait = (lambda _: torch.cuda.synchronize()) if device.type == "cuda" else (lambda _: None)
    with torch.no_grad():
        (logits, loss), first, median, _ = timed(functools.partial(model, images=[world], **dev), wait)
        fused = model.prepare(dev["input_ids"], dev["attention_mask"], dev["pixel_values"],
                              dev["token_type_ids"], dev["labels"], [world])
    result = dict(logits=logits[0].cpu().numpy(), valid=fused["attention_mask"][0].bool().cpu().numpy(),
                  loss=float(loss), first_s=first, median_s=median, sow_id=sow,
                  fused_len=int(logits.shape[1]), world_tokens=int(logits.shape[1] - batch["input_ids"].shape[1] - 2))
    del model, gemma, vae, projector, logits, loss, fused, dev
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result, batch, world, upstream_dir, vae_size


def run_jax(args, batch, world, upstream_dir, vae_size):
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_default_matmul_precision", "highest")
    from theworld_jax import TheWorld

    log("loading the JAX TheWorld")
    t0 = time.perf_counter()
    model = TheWorld.from_pretrained(upstream_dir, dtype=jnp.float32, vae_input_range=args.vae_input_range,
                                     vae_image_size=vae_size, world_attention="causal")
    load_s = time.perf_counter() - t0
    inputs = {k: v.numpy() for k, v in batch.items()}
    log(f"JAX forward (loaded in {load_s:.1f}s)")
    out, first, median, _ = timed(functools.partial(model, images=[world], **inputs),
                               lambda o: jax.block_until_ready(o.logits))
    return dict(logits=np.asarray(out.logits[0], dtype=np.float32),
                loss=None if out.loss is None else float(out.loss), load_s=load_s, first_s=first,
                median_s=median, sow_id=getattr(model.config, "sow_token_id", None),
                device=str(jax.devices()[0]), jax_version=jax.__version__)


def compare(ref_logits, jax_logits, valid, chunk: int = 256) -> dict:
    """Errors over valid positions, chunked over positions to bound host memory."""
    max_diff = max_ref = sq_diff = sq_ref = 0.0
    agree = total = 0
    for start in range(0, ref_logits.shape[0], chunk):
        keep = valid[start:start + chunk]
        r = ref_logits[start:start + chunk][keep].astype(np.float64)
        j = jax_logits[start:start + chunk][keep].astype(np.float64)
        if not len(r):
            continue
        d = np.abs(j - r)
        max_diff, max_ref = max(max_diff, float(d.max())), max(max_ref, float(np.abs(r).max()))
        sq_diff, sq_ref = sq_diff + float((d ** 2).sum()), sq_ref + float((r ** 2).sum())
        agree += int((r.argmax(-1) == j.argmax(-1)).sum())
        total += len(r)
    rel_max = max_diff / max(1.0, max_ref)
    return dict(positions=total, max_abs_diff=max_diff, max_abs_ref=max_ref, rel_max_diff=rel_max,
                rel_l2=(sq_diff / sq_ref) ** 0.5, top1_agreement=agree / total,
                within_fp32_tolerance=rel_max <= 1e-4)


def versions(device) -> dict:
    import diffusers
    import transformers

    out = dict(python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
               diffusers=diffusers.__version__, torch_device=str(device))
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def markdown(res: dict) -> str:
    ref_, jx, cmp_ = res["reference"], res.get("jax", {}), res.get("comparison")
    lines = [f"# TheWorld parity ({'tiny, CPU' if res['tiny'] else 'full size'}, float32, TF32 off)", "",
             f"Environment: {json.dumps(res['versions'])}", "",
             (f"Fused sequence: {ref_['fused_len']} tokens ({ref_['world_tokens']} world tokens); "
              f"VAE input range {res['vae_input_range']}; attention {res['attn']}; <start_of_world> id "
              f"{ref_['sow_id']} (torch) / {jx.get('sow_id')} (jax)."), ""]
    if cmp_ is None:
        lines += [f"**JAX side did not run**: {jx.get('error', 'unknown')}", ""]
    else:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in cmp_.items()]
        lines += [f"| loss (torch / jax) | {ref_['loss']:.6f} / {jx.get('loss')} |", ""]
    lines += ["| side | load s | first call s | median of 3 s |", "|---|---|---|---|",
              f"| torch reference | - | {ref_['first_s']:.3f} | {ref_['median_s']:.3f} |"]
    if "first_s" in jx:
        lines.append(f"| theworld_jax ({jx['device']}) | {jx['load_s']:.1f} | {jx['first_s']:.3f} | "
                     f"{jx['median_s']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="directory for theworld_gpu_parity.{json,md}")
    parser.add_argument("--tiny", action="store_true", help="tiny models on CPU (validates the path)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attn", default="eager", choices=("eager", "sdpa"), help="transformers attention")
    parser.add_argument("--vae-input-range", default="minus_one_one", choices=ref.VAE_INPUT_RANGES)
    parser.add_argument("--workdir", default=None, help="where checkpoints are written (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the written checkpoints")
    args = parser.parse_args(argv)

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if not args.tiny and device.type != "cuda":
        print("warning: no CUDA device; running the full-size model on CPU", file=sys.stderr)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    workdir = args.workdir or tempfile.mkdtemp(prefix="theworld_parity_")
    res = dict(tiny=args.tiny, attn=args.attn, vae_input_range=args.vae_input_range, versions=versions(device))
    try:
        ref_out, batch, world, upstream_dir, vae_size = run_reference(args, device, workdir)
        ref_logits, valid = ref_out.pop("logits"), ref_out.pop("valid")
        res["reference"] = ref_out
        print(f"reference: {ref_out}", flush=True)
        try:
            jax_out = run_jax(args, batch, world, upstream_dir, vae_size)
            jax_logits = jax_out.pop("logits")
            res["jax"] = jax_out
            if jax_logits.shape != ref_logits.shape:
                res["jax"]["error"] = f"logits shape {jax_logits.shape}, reference {ref_logits.shape}"
            else:
                res["comparison"] = compare(ref_logits, jax_logits, valid)
        except Exception as err:  # report the torch half even when the JAX side is missing or broken
            res["jax"] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    text = markdown(res)
    print(text)
    if args.out:
        write_report(args.out, "theworld_gpu_parity", res, text)
    if "error" in res.get("jax", {}):
        print(res["jax"].get("traceback", res["jax"]["error"]), file=sys.stderr)
        return 2
    return 0 if res["comparison"]["within_fp32_tolerance"] else 1


if __name__ == "__main__":
    sys.exit(main())
