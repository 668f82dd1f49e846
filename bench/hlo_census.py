"""Census of one decode step from a compiled program's HLO text (as `decode_profile.py` writes it), and
(`kernel_census`, used by `bench/gpu_aot.py`) the kernels every computation of any program launches.

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


# ---------------------------------------------------------------- kernels per computation

_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = (.+?) ([\w\-]+)\((.*)$")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition|true_computation|false_computation)=%([\w.\-]+)")
# kernels that only move bytes
COPY_KINDS = ("copy", "fusion (dynamic-slice)", "fusion (slice)", "fusion (concatenate)", "fusion (copy/transpose)",
              "fusion (pad/reverse)")
NOT_LAUNCHED = SKIP | {"after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency", "domain"}


def computations(text: str) -> dict[str, list[str]]:
    """{computation name: its instruction lines} of an HLO module's text; the entry is named "ENTRY"."""
    out, name = {}, None
    for line in text.splitlines():
        if name is None:
            m = re.match(r"^(ENTRY )?%([\w.\-]+) .*\{\s*$", line)
            if m:
                name = "ENTRY" if m.group(1) else m.group(2)
                out[name] = []
        elif line.startswith("}"):
            name = None
        else:
            out[name].append(line)
    return out


def _root(rest: str, computations: dict[str, list[str]]) -> str:
    """The ROOT line of the computation an instruction calls (`rest`: its text after the opcode), or ""."""
    callee = _CALLS.search(rest)
    lines = computations.get(callee.group(1), []) if callee else []
    return next((line for line in lines if line.lstrip().startswith("ROOT")), "")


def kernel_kind(op: str, rest: str, name: str, fused: dict[str, list[str]]) -> str | None:
    """What one instruction of a launching computation runs on the GPU (None: nothing, a view or a
    constant). Fusions by their emitter; custom calls by target; copies; control flow."""
    if op in NOT_LAUNCHED or op.endswith("-done"):
        return None
    if op == "fusion-start":  # an async fusion (its -done only waits): e.g. a dynamic slice on its own stream
        return kernel_kind("fusion", rest, name, fused) + " async"
    if op == "fusion":
        emitter = re.search(r'"kind":"(__[\w$]+)"', rest)
        emitter = emitter.group(1) if emitter else ""
        if "gemm" in emitter:
            return "gemm (triton)"
        if emitter == "__triton":
            return "triton (normalisation/softmax)"
        if emitter in ("__custom_fusion", "__dynamic_memcpy") or "address_computation" in emitter \
                or "dynamic_slice" in emitter:
            return f"custom fusion {emitter}"
        root = _root(rest, fused)
        if " dynamic-update-slice(" in root or "dynamic_update_slice" in name:
            return "fusion (dynamic-update-slice)"
        if " scatter(" in root:
            return "fusion (scatter)"
        if " dynamic-slice(" in root:
            return "fusion (dynamic-slice)"
        if " slice(" in root:
            return "fusion (slice)"
        if " concatenate(" in root:
            return "fusion (concatenate)"
        opcode = _INSTRUCTION.match(root)  # the root's opcode (its metadata may name "transpose(jvp(...))")
        opcode = opcode.group(3) if opcode and "kind=kLoop" in rest else ""
        if opcode in ("copy", "transpose"):
            return "fusion (copy/transpose)"
        if opcode in ("pad", "reverse"):
            return "fusion (pad/reverse)"
        return "fusion"
    if op == "custom-call":
        target = re.search(r'custom_call_target="([^"]+)"', rest)
        target = target.group(1) if target else "?"
        if "cublas" in target:
            return "gemm (cublas)"
        if "cudnn" in target:
            return "cudnn"
        return f"custom-call {target}"
    if op in ("copy", "copy-start"):
        return "copy"
    if op in ("while", "conditional", "call"):
        return None  # their computations are counted on their own (a call's inline)
    return op  # an unfused op emitted as its own kernel (rare after fusion)


def moved_bytes(op: str, rest: str, out_shape: str, shapes: dict[str, str], fused: dict[str, list[str]]) -> int:
    """Bytes one kernel reads and writes: its result and operands (`shapes`: name -> shape of the
    instructions before it), a fusion parameter used only through slices (of it or of its bitcasts) counted
    as those slices, an in-place dynamic-update-slice as its update only. An estimate: a fusion may read a broadcast
    operand more than once."""
    operands = [shapes.get(o, "") for o in re.findall(r"%([\w.\-]+)", rest.split("), ")[0])]
    sizes = [nbytes(s) for s in operands]
    lines = fused.get(_CALLS.search(rest).group(1), []) if op == "fusion" and _CALLS.search(rest) else []
    users, params = collections.defaultdict(list), {}
    for line in lines:
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        if m.group(3) == "parameter":
            params[m.group(1)] = int(re.match(r"\d+", m.group(4)).group(0))
        for o in re.findall(r"%([\w.\-]+)", m.group(4).split("), ")[0]):
            users[o].append((m.group(3), m.group(2), m.group(1)))

    def sliced(name: str) -> int | None:  # bytes read when `name` is used only through slices (and bitcasts)
        total = 0
        for kind, shape, user in users[name]:
            if kind in ("slice", "dynamic-slice"):
                total += nbytes(shape)
            elif kind == "bitcast" and users[user]:
                inner = sliced(user)
                if inner is None:
                    return None
                total += inner
            else:
                return None
        return total if users[name] else None

    for name, i in params.items():
        read = sliced(name) if i < len(sizes) else None
        if read is not None:
            sizes[i] = min(sizes[i], read)
    root = _INSTRUCTION.match(_root(rest, fused)) if lines else None
    if root and root.group(3) == "dynamic-update-slice":  # in place: the update is read and written
        return 2 * min((s for s in sizes if s), default=0)
    return nbytes(out_shape) + sum(sizes)


def kernel_census(text: str, layers: int = 0) -> dict:
    """Kernels per launching computation (the entry, while bodies and conditions, conditional branches,
    called computations): {name: {"role", "trip_count" (XLA's known_trip_count of a while body, or None),
    "kinds": {kind: count}, "kernels", "copy_bytes": {copy kind: bytes written}, "moved_bytes": {kind:
    bytes read and written (`moved_bytes`)}, "inner": the launching computations it runs}}; with
    `layers`, a while body's count per layer too ("per_layer")."""
    comps = computations(text)
    launching = {"ENTRY": ("entry", None)}
    for lines in comps.values():
        for line in lines:
            m = _INSTRUCTION.match(line)
            if not m:
                continue
            op, rest = m.group(3), m.group(4)
            if op == "while":
                trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
                body, cond = (re.search(rf"{k}=%([\w.\-]+)", rest).group(1) for k in ("body", "condition"))
                launching[body] = ("while body", int(trip.group(1)) if trip else None)
                launching[cond] = ("while condition", None)
            elif op == "conditional":
                branches = re.search(r"branch_computations=\{([^}]*)\}", rest)
                names = re.findall(r"%([\w.\-]+)", branches.group(1)) if branches else []
                names += re.findall(r"(?:true|false)_computation=%([\w.\-]+)", rest)
                launching.update({branch: ("conditional branch", None) for branch in names})
            elif op == "call":
                callee = re.search(r"to_apply=%([\w.\-]+)", rest)
                if callee:
                    launching[callee.group(1)] = ("call", None)
    out = {}
    for name, (role, trip) in launching.items():
        kinds, copied, moved, inner, shapes = (collections.Counter(), collections.Counter(), collections.Counter(),
                                                [], {})
        for line in comps.get(name, []):
            m = _INSTRUCTION.match(line)
            if not m:
                continue
            shapes[m.group(1)] = m.group(2)
            kind = kernel_kind(m.group(3), m.group(4), m.group(1), comps)
            if kind:
                kinds[kind] += 1
                moved[kind] += moved_bytes(m.group(3), m.group(4), m.group(2), shapes, comps)
            if kind and kind.removesuffix(" async") in COPY_KINDS:  # bytes written: the fused root's shape
                root = _INSTRUCTION.match(_root(m.group(4), comps))
                copied[kind] += nbytes(root.group(2) if root else m.group(2))
            if m.group(3) in ("while", "call", "conditional"):
                inner += [c for c in re.findall(r"(?:body|condition|to_apply)=%([\w.\-]+)", m.group(4))
                          if c in launching]
        out[name] = dict(role=role, trip_count=trip, kinds=dict(kinds), kernels=sum(kinds.values()),
                         copy_bytes=dict(copied), moved_bytes=dict(moved), inner=inner)
        if layers and role == "while body":
            out[name]["per_layer"] = out[name]["kernels"] / layers
    return out


def expanded(census: dict, name: str, field: str = "kinds") -> collections.Counter:
    """Kernel kinds (or `field` "copy_bytes": bytes written by copy kernels, "moved_bytes": bytes read and
    written) of one run of computation `name`, the loops inside it run their known trip counts."""
    total = collections.Counter(census[name][field])
    for inner in census[name]["inner"]:
        times = census[inner]["trip_count"] or 1
        for kind, n in expanded(census, inner, field).items():
            total[kind] += n * (times if census[inner]["role"] == "while body" else 1)
    return total


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
