"""Census of one decode step from a compiled program's HLO text (as `decode_profile.py` writes it).

Lists the kernels of the while loop's body (every instruction but parameters, tuples, bitcasts and
constants), grouped by what they compute (read from the op metadata and shapes), with the bytes each
reads and writes (in-place dynamic-update-slice fusions: the update only; a fusion reading one row of the
embedding: that row). No timings: bytes over the copy bandwidth give each group's floor.

    python bench/hlo_census.py bench/results/decode_hlo_before_B1_h200.txt.gz [--bandwidth 3.3e12]
"""

from __future__ import annotations

import argparse
import collections
import gzip
import re

ITEM = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4, "s64": 8, "pred": 1, "s8": 1, "u8": 1}
SKIP = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant"}


def nbytes(shape: str) -> int:
    total = 0
    for dtype, dims in re.findall(r"(bf16|f16|f32|s32|u32|s64|pred|s8|u8)\[([\d,]*)\]", shape):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * ITEM[dtype]
    return total


def computation(lines: list[str], name: str) -> list[str]:
    start = next(i for i, line in enumerate(lines) if re.match(rf"^%{re.escape(name)} ", line))
    body = []
    for line in lines[start + 1:]:
        if line.startswith("}"):
            return body
        body.append(line)
    return body


def group(name: str, shapes: str, op_name: str, vocab: str, slots: set[str]) -> str:
    """`shapes`: the result's and the operands' shapes, joined."""
    where = op_name.split("while/body/")[-1]
    dims = set(re.findall(r"\d+", " ".join(re.findall(r"\[([\d,]*)\]", shapes))))
    if "dynamic_update_slice" in name or "dynamic_slice" in name or "scatter" in where:
        return "KV-cache write"
    if vocab in dims:
        return "lm_head and the choice of token"
    if any(e in where for e in ("BTD,DNH", "BSD,DKH", "BTNH,NHD")):
        return "q/k/v/o projections"
    if any(e in where for e in ("BLD,DF", "BLF,FD")) or dims & {"10240", "20480"} or "[16,1," in shapes:
        return "MLP"
    if dims & slots or any(e in where for e in ("BKGTS", "BTKGH")):
        return "attention"
    return "norms, RoPE, residuals, embedding, loop bookkeeping"


def census(text: str, vocab: str = "262208") -> tuple[dict, int]:
    lines = text.splitlines()
    entry = next(i for i, line in enumerate(lines) if line.startswith("ENTRY"))
    loop = next(line for line in lines[entry:] if " while(" in line)
    body = re.search(r"body=%([\w.\-]+)", loop).group(1)
    slots = set(re.findall(r"state_cache_layers_\d+__index[.\w]*: s32\[\d+,(\d+)\]", lines[entry]))
    shapes, groups, graphs = {}, collections.defaultdict(lambda: [0, 0]), 0
    for line in computation(lines, body):
        m = re.match(r"\s*(ROOT )?%([\w.\-]+) = (.+?) ([\w\-]+)\((.*)$", line)
        if not m:
            continue
        name, shape, op, rest = m.group(2), m.group(3), m.group(4), m.group(5)
        shapes[name] = shape
        if op in SKIP:
            continue
        graphs += "command_buffer" in line
        operands = [shapes.get(o, "") for o in re.findall(r"%([\w.\-]+)", rest.split(")")[0])]
        found = re.search(r'op_name="([^"]+)"', line)
        op_name = found.group(1) if found else ""
        g = group(name, " ".join([shape] + operands), op_name, vocab, slots)
        if "dynamic_update_slice" in name:
            moved = 2 * min((nbytes(s) for s in operands if nbytes(s) > 0), default=0)
        elif any(s.startswith(f"bf16[{vocab},") or s.startswith(f"f32[{vocab},") for s in operands) \
                and vocab not in shape:  # one row of the embedding table
            g, moved = "norms, RoPE, residuals, embedding, loop bookkeeping", 2 * nbytes(shape)
        else:
            moved = nbytes(shape) + sum(nbytes(s) for s in operands)
        groups[g][0] += 1
        groups[g][1] += moved
    return dict(groups), graphs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hlo")
    parser.add_argument("--bandwidth", type=float, default=3.3e12, help="bytes per second (the copy bandwidth)")
    args = parser.parse_args(argv)
    opener = gzip.open if args.hlo.endswith(".gz") else open
    with opener(args.hlo, "rt") as f:
        groups, graphs = census(f.read())
    kernels, moved = sum(v[0] for v in groups.values()), sum(v[1] for v in groups.values())
    print(f"{kernels} kernels per step (command buffers in the body: {graphs}), {moved / 1e9:.3f} GB moved, "
          f"{1e3 * moved / args.bandwidth:.2f} ms at {args.bandwidth / 1e12:.3f} TB/s")
    for g, (n, b) in sorted(groups.items(), key=lambda kv: -kv[1][1]):
        print(f"  {g:55s} {n:5d} kernels {b / 1e9:7.3f} GB {1e3 * b / args.bandwidth:6.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
