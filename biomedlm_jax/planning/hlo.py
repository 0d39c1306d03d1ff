"""What a compiled program does per step, read from its optimized HLO text: bytes moved by collectives,
dot and convolution FLOPs, and the bytes a loop carries. One traversal (`_walk`) serves them all: it
counts every instruction once per execution, multiplying a `while` body by its trip count (XLA's
`known_trip_count`, else read from the loop's induction variable: its start in the initial tuple, its
step in the body, its limit in the condition; the TPU compiler unrolls windowed-einsum loops by two),
so a scanned model's per-layer work counts n_layer times. XLA's own cost analysis counts a loop body
once. Inside an async chain's fusions (the TPU compiler copies one collective into the start, every
continuation -- computations named `async_collective_fusion.N` -- and the done fusion) a `channel_id`
counts once however many copies carry it; elsewhere every instruction counts, since distinct
collectives share channel ids there (a windowed einsum's collective-permutes all carry channel 1).

Each collective counts the bytes one device holds of the data it exchanges (`_moved_bytes`): an
all-gather its gathered output, a reduce-scatter its unreduced input, an all-reduce, all-to-all or
collective-permute its buffer, in the dtype it moves (the output's: the TPU compiler fuses converts
into collectives). An asynchronous pair (`all-gather-start` /
`all-gather-done`) counts once, at its `-done`; a collective wrapped in an `async-start` counts inside
the computation it calls. The TPU compiler writes a reduce-scatter as a fusion that calls a computation
named `all-reduce-scatter.N` (`.clone.M` inside loops; an all-reduce and the device's slice of it), with operands printed without
shapes: such a fusion counts as one reduce-scatter of its computation's input (any operand printed
without a shape is looked up where its computation declares it). TPU7x runs collectives on its
SparseCores: a `call-start` of a computation that ends `}, execution_thread="sparsecore"`. Its asynchronous
collectives are a fusion ending in an `AsyncCollectiveStart` custom call and one ending in
`AsyncCollectiveDone`, each holding the collective: the "done" half is not walked. Loops whose trip
count neither source gives are counted once and reported in `unknown_trip_counts`.
"""
from __future__ import annotations

import collections
import math
import re
from typing import Callable

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1,
          "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "f8e4m3b11fnuz": 1}
_ARRAY = re.compile(r"\b(" + "|".join(sorted(_BYTES, key=len, reverse=True)) + r")\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>.+?)\s(?P<op>[a-z][\w\-]*)\((?P<rest>.*)$")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s.*\{\s*$")
_CALLS = re.compile(r"\b(?:calls|body|condition|to_apply)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_ASYNC_DONE = 'custom_call_target="AsyncCollectiveDone"'
_TPU_REDUCE_SCATTER = re.compile(r"all-reduce-scatter(\.\d+)?(\.clone(\.\d+)?)*$")  # .clone.N inside loops
_CHANNEL = re.compile(r"\bchannel_id=(\d+)")
_ASYNC_PIECE = re.compile(r'custom_call_target="AsyncCollective(Start|Continuation)"')
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')
_NAME = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=")
_REF = re.compile(r"%([\w.\-]+)")
_GROUPS_LIST = re.compile(r"replica_groups=\{\{([\d,\s]*)\}")  # {{0,1,2,3},{4,5,6,7}}
_GROUPS_IOTA = re.compile(r"replica_groups=\[([\d,]+)\]<=")  # [2,4]<=[8]: 2 groups of 4
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")  # mesh['axis_0'=16,...] {'axis_0'}
_PARAM = re.compile(r"([\w.\-]+):\s*((?:\([^)]*\))|(?:[\w]+\[[\d,]*\]))")


def _count(dims: str) -> int:
    """Elements of an array whose dimensions are written `dims` ("8,128"; "" for a scalar)."""
    return math.prod(int(d) for d in filter(None, dims.split(",")))


def bytes_by_dtype(text: str) -> collections.Counter:
    """{dtype: bytes} of every array shape written in `text` (an HLO shape, or a tuple of them)."""
    by = collections.Counter()
    for dtype, dims in _ARRAY.findall(text):
        by[dtype] += _count(dims) * _BYTES[dtype]
    return by


def array_bytes(text: str) -> int:
    """Bytes of every array shape written in `text`."""
    return int(sum(bytes_by_dtype(text).values()))


def _kind(op: str):
    """(collective kind, counts here) of an opcode, or (None, False)."""
    for k in KINDS:
        if op == k or op == f"{k}-done":
            return k, True
        if op == f"{k}-start":
            return k, False
    return None, False


def _operands(rest: str) -> str:
    """The operand list of an instruction: `rest` up to the parenthesis that closes the call."""
    depth = 1
    for i, ch in enumerate(rest):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            return rest[:i]
    return rest


def parse(text: str) -> dict:
    """{computation: [instruction dicts]} and the entry computation's name."""
    comps, headers, entry, current = {}, {}, None, None
    for line in text.splitlines():
        if current is None:
            h = _HEADER.match(line)
            if h and "=" not in line.split("(")[0]:
                current = h.group("name")
                comps[current] = []
                headers[current] = line.split("->")[0]  # the name and the parameters' shapes
                if line.lstrip().startswith("ENTRY"):
                    entry = current
            continue
        if line.strip().startswith("}"):  # `}`, or `}, execution_thread="sparsecore"` (TPU7x offloads)
            current = None
            continue
        m = _INSTR.match(line)
        if m:
            n = _NAME.match(line)
            comps[current].append({"op": m.group("op"), "shape": m.group("shape"), "rest": m.group("rest"),
                                   "name": n.group(1) if n else "", "root": line.lstrip().startswith("ROOT ")})
    return {"computations": comps, "headers": headers, "entry": entry}


def _source(instrs: dict, name: str):
    """The instruction `name` stands for in a computation ({name: instruction}), through copies,
    converts and bitcasts; None when it is not there."""
    for _ in range(8):
        ins = instrs.get(name)
        if ins is None or ins["op"] not in ("copy", "convert", "bitcast"):
            return ins
        refs = _REF.findall(_operands(ins["rest"]))
        if len(refs) != 1:
            return None
        name = refs[0]
    return None


def _constant(instrs: dict, name: str):
    """The integer value of the scalar constant `name` (through copies); None if it is not one."""
    ins = _source(instrs, name)
    m = re.match(r"\s*(-?\d+)\)", ins["rest"]) if ins is not None and ins["op"] == "constant" else None
    return int(m.group(1)) if m else None


def _tuple_index(instrs: dict, name: str):
    """K when `name` is get-tuple-element(parameter, index=K) (through copies), else None."""
    ins = _source(instrs, name)
    m = re.search(r"\bindex=(\d+)", ins["rest"]) if ins is not None and ins["op"] == "get-tuple-element" else None
    return int(m.group(1)) if m else None


def trip_count(rest: str, comps: dict, caller: str = ""):
    """A while loop's iterations: XLA's `known_trip_count` when recorded, else from its induction
    variable: the condition compares tuple element K with a constant limit (LT, LE, GT, GE or NE), the
    body's root sets element K to itself plus a constant step, and the loop's initial tuple (in the
    `caller` computation) gives its start (0 when it cannot be read). The TPU compiler unrolls some
    loops (windowed einsums: step 2, limit 4), so the step matters. None when neither says."""
    t = _TRIP.search(rest)
    if t:
        return int(t.group(1))
    cond, body = (re.search(rf"\b{k}=%?([\w.\-]+)", rest) for k in ("condition", "body"))
    cond_ins = {i["name"]: i for i in comps.get(cond.group(1), [])} if cond else {}
    for ins in cond_ins.values():
        m = re.search(r"direction=(LT|LE|GT|GE|NE)", ins["rest"])
        if ins["op"] != "compare" or not m:
            continue
        refs = _REF.findall(_operands(ins["rest"]))
        if len(refs) != 2:
            continue
        direction = m.group(1)
        k, limit = _tuple_index(cond_ins, refs[0]), _constant(cond_ins, refs[1])
        if k is None or limit is None:  # constant on the left: flip the comparison
            k, limit = _tuple_index(cond_ins, refs[1]), _constant(cond_ins, refs[0])
            direction = {"LT": "GT", "LE": "GE", "GT": "LT", "GE": "LE", "NE": "NE"}[direction]
        if k is None or limit is None:
            continue
        start, step = _start(rest, comps, caller, k), _step(comps, body.group(1) if body else "", k)
        if step is None or step == 0:
            return None
        if direction in ("GT", "GE"):  # counting down
            start, limit, step, direction = -start, -limit, -step, {"GT": "LT", "GE": "LE"}[direction]
        span = limit - start + (1 if direction == "LE" else 0)
        if step < 0 or (direction == "NE" and span % step):
            return None
        return max(0, -(-span // step))
    return None


def _start(rest: str, comps: dict, caller: str, k: int) -> int:
    """Element k of a while loop's initial tuple when it is a constant, else 0."""
    instrs = {i["name"]: i for i in comps.get(caller, [])}
    refs = _REF.findall(_operands(rest))
    init = instrs.get(refs[0]) if refs else None
    if init is None or init["op"] != "tuple":
        return 0
    elems = _REF.findall(_operands(init["rest"]))
    value = _constant(instrs, elems[k]) if k < len(elems) else None
    return 0 if value is None else value


def _step(comps: dict, body: str, k: int):
    """What the loop body adds to tuple element k each iteration (None if not `element + constant`)."""
    instrs = {i["name"]: i for i in comps.get(body, [])}
    root = next((i for i in comps.get(body, []) if i.get("root")), None)
    if root is None or root["op"] != "tuple":
        return None
    elems = _REF.findall(_operands(root["rest"]))
    nxt = _source(instrs, elems[k]) if k < len(elems) else None  # through a copy of the sum
    if nxt is None or nxt["op"] not in ("add", "subtract"):
        return None
    a, b = (_REF.findall(_operands(nxt["rest"])) + [None, None])[:2]
    for counter, const in ((a, b), (b, a)):
        if _tuple_index(instrs, counter) == k and _constant(instrs, const) is not None:
            value = _constant(instrs, const)
            return -value if nxt["op"] == "subtract" else value
    return None


def _walk(parsed: dict, visit: Callable[[str, dict, int], bool]) -> int:
    """Call visit(computation, instruction, executions per step) for every instruction reachable from
    the entry computation; a visit that returns True keeps the walk out of what that instruction calls.
    Returns how many loops had no trip count (their bodies counted once)."""
    comps = parsed["computations"]
    if parsed["entry"] is None:
        raise ValueError("no ENTRY computation in the HLO text")
    unknown = 0

    def walk(name: str, mult: int, depth: int) -> None:
        nonlocal unknown
        if depth > 64:
            raise ValueError(f"HLO computations nest deeper than 64 at {name}")
        if any(_ASYNC_DONE in ins["rest"] for ins in comps[name]):
            return  # the TPU compiler's "done" half repeats the collective its "start" half holds
        for ins in comps[name]:
            op, rest = ins["op"], ins["rest"]
            if visit(name, ins, mult) or op.endswith("-done") or op.endswith("-update"):
                continue  # a -done's computation was walked at the matching -start
            k = 1
            if op == "while":
                k = trip_count(rest, comps, name)
                if k is None:
                    unknown += 1
                    k = 1
            callees = _CALLS.findall(rest)
            for b in _BRANCHES.findall(rest):
                callees += [c.strip().lstrip("%") for c in b.split(",") if c.strip()]
            for c in callees:
                if c in comps and c != name:
                    walk(c, mult * k, depth + 1)

    walk(parsed["entry"], 1, 0)
    return unknown


def _shape_tables(parsed: dict) -> dict:
    """Per computation: {instruction or parameter name: its shape text}."""
    shapes = {}
    for name, instrs in parsed["computations"].items():
        header = parsed["headers"][name]
        table = dict(_PARAM.findall(header.split("(", 1)[1] if "(" in header else ""))
        table.update((ins["name"], ins["shape"]) for ins in instrs)
        shapes[name] = table
    return shapes


def _elements(text: str) -> int:
    return sum(_count(dims) for _, dims in _ARRAY.findall(text))


def _moved_bytes(kind: str, ins: dict, table: dict) -> int:
    """The bytes of one device's data a collective exchanges: its output (an all-gather's gathered
    buffer, an all-reduce's, all-to-all's or permute's buffer), but a reduce-scatter's input, in its
    output's dtype (the TPU compiler fuses a convert into some collectives: an f32 operand, a bf16
    all-reduce). An operand printed without its shape (`reduce-scatter(%param_0.39)`) is sized where its
    computation declares it."""
    out = array_bytes(ins["shape"])
    if kind != "reduce-scatter" or ins["op"].endswith("-done"):
        return out
    ops = _operands(ins["rest"])
    shapes = ops if _ARRAY.search(ops) else " ".join(table.get(r, "") for r in _REF.findall(ops))
    m = _ARRAY.search(ins["shape"])
    itemsize = _BYTES[m.group(1)] if m else 1
    return max(out, int(_elements(shapes) * itemsize))


def group_size(rest: str, devices: int) -> int:
    """How many devices take part in one group of a collective: its `replica_groups` as an explicit
    list, an iota form (`[groups,size]<=[...]`) or the TPU compiler's mesh form (`mesh['axis_0'=16,
    'axis_1'=16] {'axis_0'}`: the named axes' product); all `devices` when it has none (or `{}`)."""
    m = _GROUPS_LIST.search(rest)
    if m:
        return len([d for d in m.group(1).split(",") if d.strip()])
    m = _GROUPS_IOTA.search(rest)
    if m:
        return int(m.group(1).split(",")[-1])
    m = _GROUPS_MESH.search(rest)
    if m:
        sizes = dict(re.findall(r"'([\w]+)'=(\d+)", m.group(1)))
        return math.prod(int(sizes.get(a, 1)) for a in re.findall(r"'([\w]+)'", m.group(2)))
    return devices


def link_factor(kind: str, n: int) -> float:
    """Bytes one device sends over its links per byte of `collective_bytes`'s count, in a group of n
    (bandwidth-optimal ring or torus algorithms): an all-gather or reduce-scatter sends (n-1)/n of the
    full buffer, an all-reduce (a reduce-scatter then an all-gather) twice that, an all-to-all the
    (n-1)/n that leaves the device, a collective-permute its whole buffer."""
    if kind == "collective-permute":
        return 1.0
    if n <= 1:
        return 0.0
    return (2.0 if kind == "all-reduce" else 1.0) * (n - 1) / n


def collective_bytes(text: str, devices: int = 1) -> dict:
    """{"bytes": {kind: bytes per device per step}, "link_bytes": {kind: bytes each device sends over
    its links per step (link_factor, with each collective's group size; `devices`: the group of a
    collective that names none)}, "count": {kind: executions per step}, "unknown_trip_counts": loops
    whose body was counted once for want of a trip count}."""
    parsed = parse(text)
    headers, comps = parsed["headers"], parsed["computations"]
    shapes = _shape_tables(parsed)
    moved, link, count = collections.Counter(), collections.Counter(), collections.Counter()
    seen: set = set()  # channel ids counted in async chains: one collective, however many fusions copy it
    chained = {name for name, instrs in comps.items() if name.startswith("async_collective_fusion")
               or any(_ASYNC_PIECE.search(i["rest"]) for i in instrs)}

    def first(comp: str, rest: str) -> bool:
        """Whether this copy of a collective counts: always, outside an async chain's fusions (distinct
        collectives share channel ids there: a windowed einsum's permutes all carry channel 1); inside
        them, the first copy of each channel."""
        m = _CHANNEL.search(rest)
        if m is None or comp not in chained:
            return True
        if m.group(1) in seen:
            return False
        seen.add(m.group(1))
        return True

    def visit(comp: str, ins: dict, mult: int) -> bool:
        op = ins["op"]
        kind, counts = _kind(op)
        if kind and counts and first(comp, ins["rest"]):
            size = _moved_bytes(kind, ins, shapes[comp])
            moved[kind] += size * mult
            link[kind] += size * mult * link_factor(kind, group_size(ins["rest"], devices))
            count[kind] += mult
        callees = _CALLS.findall(ins["rest"])
        if op == "fusion" and callees and _TPU_REDUCE_SCATTER.match(callees[0]):
            # the TPU compiler's reduce-scatter: a fusion of an all-reduce and this device's slice (the
            # all-reduce's channel id names it, so an async chain's copies count once)
            inner = next((i["rest"] for i in comps.get(callees[0], []) if _CHANNEL.search(i["rest"])), "")
            if first(comp, inner):
                size = max(array_bytes(headers.get(callees[0], "")), array_bytes(ins["shape"])) * mult
                moved["reduce-scatter"] += size
                link["reduce-scatter"] += size * link_factor("reduce-scatter", group_size(inner, devices))
                count["reduce-scatter"] += mult
            return True
        return False

    unknown = _walk(parsed, visit)
    return {"bytes": {k: int(moved.get(k, 0)) for k in KINDS}, "link_bytes": {k: int(link.get(k, 0)) for k in KINDS},
            "count": {k: int(count.get(k, 0)) for k in KINDS},
            "unknown_trip_counts": unknown}


def loop_carried_bytes(text: str) -> dict:
    """{dtype: bytes} of the largest `while` loop's carried values: what a decode loop holds on to from
    one iteration to the next. Weights the loop reads as int8 are carried as s8; weights whose
    dequantization XLA hoisted out of the loop are carried as float copies."""
    best: dict = {}
    for instrs in parse(text)["computations"].values():
        for ins in instrs:
            if ins["op"] == "while":
                by = bytes_by_dtype(ins["shape"])
                if sum(by.values()) > sum(best.values()):
                    best = {k: int(v) for k, v in by.items()}
    return best


_CYCLES = re.compile(r'"estimated_cycles"\s*:\s*"(\d+)"')
_NO_ESTIMATE = 1 << 62  # the compiler writes 2^63 - 1 where it has no estimate


def estimated_cycles(text: str) -> dict:
    """{"cycles": the TPU compiler's own per-op estimate (`estimated_cycles` in each op's backend config)
    summed over one execution, loops by their trips, "ops": how many ops carried one, "unknown_ops": how
    many carried the compiler's "no estimate" (2^63 - 1: on TPU7x, the gathers and copies it offloads
    to the SparseCores), left out}. An op that carries an estimate (a fusion) is not looked into.
    Collectives carry none: this is the compute and memory-bound work, not the communication."""
    parsed = parse(text)
    total, ops, unknown = 0, 0, 0

    def visit(_, ins: dict, mult: int) -> bool:
        nonlocal total, ops, unknown
        m = _CYCLES.search(ins["rest"])
        if m is None or ins["op"] in ("while", "call", "conditional"):  # their bodies carry the estimates
            return False
        if int(m.group(1)) >= _NO_ESTIMATE:
            unknown += 1
        else:
            total += int(m.group(1)) * mult
            ops += 1
        return True

    _walk(parsed, visit)
    return {"cycles": total, "ops": ops, "unknown_ops": unknown}


# --- FLOPs per step -------------------------------------------------------------------------------------


def _dims(shape: str) -> list:
    m = _ARRAY.search(shape)
    return [int(d) for d in filter(None, m.group(2).split(","))] if m else []


def _window(rest: str) -> dict:
    m = re.search(r"window=\{([^}]*)\}", rest)
    out = {}
    for part in (m.group(1).split() if m else []):
        key, _, val = part.partition("=")
        out[key] = val.split("x")
    return out


def conv_flops(out_shape: str, lhs_shape: str, rhs_shape: str, rest: str) -> float:
    """2 x multiply-adds of an HLO convolution, counting only window positions that land on real
    (not padding, not dilation) input elements, as XLA's HloCostAnalysis does."""
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", rest)
    if not labels:
        return 0.0
    lhs_l, rhs_l, out_l = labels.groups()
    lhs, rhs, out = _dims(lhs_shape), _dims(rhs_shape), _dims(out_shape)
    if not (lhs and rhs and out):
        return 0.0
    groups = int((re.search(r"feature_group_count=(\d+)", rest) or [0, 1])[1])
    batch_groups = int((re.search(r"batch_group_count=(\d+)", rest) or [0, 1])[1])
    w = _window(rest)
    fma = lhs[lhs_l.index("b")] // batch_groups * (lhs[lhs_l.index("f")] // groups) * rhs[rhs_l.index("o")]
    for k in sorted(c for c in lhs_l if c.isdigit()):
        i = int(k)
        size_in, kernel, size_out = lhs[lhs_l.index(k)], rhs[rhs_l.index(k)], out[out_l.index(k)]

        def attr(name, default, j=i):
            vals = w.get(name)
            return vals[j] if vals and j < len(vals) else default

        stride, lhs_dil, rhs_dil = int(attr("stride", 1)), int(attr("lhs_dilate", 1)), int(attr("rhs_dilate", 1))
        pad_lo = int(str(attr("pad", "0_0")).split("_")[0])
        valid = 0
        for o in range(size_out):
            for kk in range(kernel):
                pos = o * stride - pad_lo + kk * rhs_dil
                if pos >= 0 and pos % lhs_dil == 0 and pos // lhs_dil < size_in:
                    valid += 1
        fma *= valid
    return 2.0 * fma


def dot_flops(out_shape: str, lhs_shape: str, rest: str) -> float:
    m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
    lhs = _dims(lhs_shape)
    k = math.prod(lhs[int(d)] for d in (m.group(1).split(",") if m and m.group(1) else []))
    return 2.0 * math.prod(_dims(out_shape)) * k


def step_flops(text: str) -> float:
    """Dot and convolution FLOPs per execution of the entry computation (per device): each one's
    multiply-adds (valid window positions only, as XLA's own cost analysis counts them), loops counted
    per iteration."""
    parsed = parse(text)
    shapes = _shape_tables(parsed)
    total = 0.0

    def visit(comp: str, ins: dict, mult: int) -> bool:
        nonlocal total
        if ins["op"] in ("convolution", "dot"):
            table = shapes[comp]
            refs = [r for r in _REF.findall(_operands(ins["rest"])) if r in table]
            if ins["op"] == "convolution" and len(refs) >= 2:
                total += mult * conv_flops(ins["shape"], table[refs[0]], table[refs[1]], ins["rest"])
            elif ins["op"] == "dot" and refs:
                total += mult * dot_flops(ins["shape"], table[refs[0]], ins["rest"])
        return False

    _walk(parsed, visit)
    return total
