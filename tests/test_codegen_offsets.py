"""No 32-bit address arithmetic that grows with the data, in any kernel, read from the
generated Triton IR (TTIR), and one compiled variant per dtype and alignment class.

Every kernel the package launches is built through its own launcher (``Launch``) from
real CPU tensors, for every constexpr variant the package can launch (the logits
kernels for each dtype and V size class, with and without entropy; the per-sequence
reduction for each CHECK / NORMALIZE / GRAD_SCALE; the hidden-state kernels for each
dtype, tile set (sm_80, sm_90; aligned rows or not) and each switch; the loss tail for
a covering set of its option switches: every value of every switch in some spec),
specialised by Triton's own binder and lowered to TTIR, where functions are inlined
and every offset's arithmetic is explicit. The rule checked:

    every ``arith.muli`` in 32 bits whose result reaches a ``tt.addptr`` offset has
    no operand derived from a runtime integer argument (a stride, a row or column
    count): such products are 64-bit.

A 32-bit product of program ids, loop indices, ``tl.arange`` and constexpr block sizes
only (``pid * BLOCK``, ``j * BLOCK_K``) is bounded by the grid or a loop bound and
allowed; ``kk * stride`` with ``kk`` int32 and ``stride`` an argument is not, whatever
casts follow it. Run in a subprocess (Triton's JIT must not be in interpreter mode):

    python tests/test_codegen_offsets.py --probe     # prints one JSON document
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

# ---------------------------------------------------------------- the TTIR reader
_DEF = re.compile(r"^(%[\w$.-]+)(?::(\d+))?\s*=\s*(.*)$")
_VAL = re.compile(r"%[\w$.-]+(?:#\d+)?")
_ARG = re.compile(r"(%[\w$.-]+): (i32|i64|i1|!tt\.ptr<[^>]*>|f32|f64|bf16|f16)")
_FOR = re.compile(
    r"scf\.for (%[\w$.-]+) = (%[\w$.#-]+) to (%[\w$.#-]+) step (%[\w$.#-]+)"
    r"(?: iter_args\((.*?)\))?"
)
# Values that carry no runtime size: ids, ranges, constants, loaded data, comparisons.
_STOP = (
    "tt.get_program_id",
    "tt.get_num_programs",
    "tt.make_range",
    "arith.constant",
    "tt.load",
    "arith.cmpi",
    "arith.cmpf",
)


def _strip_loc(text: str) -> str:
    return re.sub(r"\s*loc\(.*$", "", text)


def _locations(text: str) -> dict:
    """``#locN`` -> ``file:line`` (following name and callsite locations to a file position)."""
    raw = dict(re.findall(r"^(#loc\d*) = loc\((.*)\)\s*$", text, re.MULTILINE))

    def resolve(key, depth=0):
        body = raw.get(key, "")
        m = re.search(r'"([^"]+\.py)":(\d+):\d+', body)
        if m:
            return f"{os.path.basename(m.group(1))}:{m.group(2)}"
        refs = re.findall(r"#loc\d*", body)
        return resolve(refs[0], depth + 1) if refs and depth < 50 else "?"

    return {k: resolve(k) for k in raw}


def narrow_products(text: str) -> list[str]:
    """The 32-bit products with a runtime-sized operand that reach an address (``file:line``
    of each), in one kernel's TTIR (see the module docstring)."""
    locs = _locations(text)
    defs: dict[str, tuple[str, list[str], str, str]] = {}  # name -> (op, operands, type, loc)
    sized: set[str] = set()  # integer kernel arguments
    addptr_offsets = []
    stack: list = []
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("tt.func"):
            sized.update(n for n, t in _ARG.findall(s) if t in ("i32", "i64"))
        if s.startswith("}"):
            if stack:
                stack.pop()
            if s.endswith("{"):  # } else {
                stack.append(stack[-1] if stack else None)
            continue
        loc = re.search(r"loc\((#loc\d*)\)\s*$", s)
        loc = locs.get(loc.group(1), "?") if loc else "?"
        m = _DEF.match(s)
        if s.startswith("scf.yield") and stack and stack[-1]:
            results, carried = stack[-1]
            for i, v in enumerate(_VAL.findall(_strip_loc(s).split(" : ")[0])):
                for target in ((results[i] if i < len(results) else None), (carried[i] if i < len(carried) else None)):
                    if target:
                        defs[target][1].append(v)
        entry = None
        if m:
            name, nres, rest = m.group(1), m.group(2), m.group(3)
            body = _strip_loc(rest)
            op = body.split("(")[0].split()[0].strip('"')
            results = [f"{name}#{i}" for i in range(int(nres))] if nres else [name]
            if op == "scf.for":
                f = _FOR.search(body)
                defs[f.group(1)] = ("induction", [], "i32", loc)
                carried = []
                for pair in filter(None, (f.group(5) or "").split(",")):
                    a, init = (x.strip() for x in pair.split("="))
                    defs[a] = ("iter_arg", [init], "", loc)
                    carried.append(a)
                for r in results:
                    defs[r] = ("scf.for", [], "", loc)
                entry = (results, carried)
            elif op in ("scf.if", "scf.while"):
                for r in results:
                    defs[r] = (op, [], "", loc)
                entry = (results, [])
            else:
                operands, _, typ = body.partition(" : ")
                vals = _VAL.findall(operands[len(op) + 1 :] if operands.startswith(op) else operands)
                for r in results:
                    defs[r] = (op, vals, typ, loc)
                if op == "tt.addptr":
                    addptr_offsets.append(vals[1])
        if s.endswith("{"):
            stack.append(entry)

    memo: dict[str, bool] = {}

    def runtime_sized(v: str) -> bool:
        if v in sized:
            return True
        if v in memo:
            return memo[v]
        memo[v] = False  # cycles (loop-carried values) resolve to False until proven
        op, operands, _, _ = defs.get(v, ("?", [], "", ""))
        memo[v] = op not in _STOP and op != "induction" and any(runtime_sized(o) for o in operands)
        return memo[v]

    bad, seen = set(), set()
    todo = list(addptr_offsets)
    while todo:
        v = todo.pop()
        if v in seen or v not in defs:
            continue
        seen.add(v)
        op, operands, typ, loc = defs[v]
        narrow = re.search(r"(?:^|x)i32\b|^i32$", typ.strip().rstrip(">").split("<")[-1]) is not None
        if op == "arith.muli" and narrow and any(runtime_sized(o) for o in operands):
            bad.add(loc)
        todo.extend(operands)
    return sorted(bad)


# ---------------------------------------------------------------- the launches
def ttir(launch, arch: int = 90) -> str:
    """The TTIR of ``launch`` (specialised by Triton's binder for sm_``arch``): the first stage only."""
    from codegen_probe import specialise
    from triton._C.libtriton import ir
    from triton.compiler import ASTSource

    backend, signature, constexprs, attrs, options, _ = specialise(launch, arch)
    src = ASTSource(launch.kernel, signature, constexprs, attrs)
    opts = backend.parse_options(dict(options.__dict__, **src.parse_options()))
    ctx = ir.context()
    ir.load_dialects(ctx)
    backend.load_dialects(ctx)
    mod = src.make_ir(backend.target, opts, backend.get_codegen_implementation(opts), backend.get_module_map(), ctx)
    stages: dict = {}
    backend.add_stages(stages, opts, src.language)
    return str(stages["ttir"](mod, {}))


def logits_launches():
    from codegen_probe import launches

    for kind in ("fwd", "fwd_ent", "bwd", "bwd_ent"):
        for dtype in ("bfloat16", "float16", "float32", "float64"):
            for V in (1000, 32_000, 151_936, 50_257):  # several rows a program; mid; large aligned / not
                for layout in ("contiguous", "sliced"):
                    yield f"{kind} {dtype} V={V} {layout}", launches(kind, dtype, V, layout)


def seq_reduce_launches(N=4, T=100):
    import torch

    from gspo_kernels import _kernels_seq as k

    for dt in (torch.float32, torch.float64):
        for normalize in (False, True):
            for grad_scale in (False, True):
                for tok, lens in ((None, None), (True, None), (None, True), (True, True)):
                    checks = (
                        None
                        if tok is None and lens is None
                        else k.SeqChecks(
                            torch.zeros(N, T, dtype=torch.long) if tok else None,
                            1000,
                            torch.zeros(N, dtype=torch.long) if lens else None,
                        )
                    )
                    out = torch.empty(N, dtype=dt)
                    yield (
                        f"seq_reduce {dt} normalize={normalize} grad_scale={grad_scale} checks={tok, lens}",
                        k.seq_reduce_launch(
                            torch.empty(N, T, dtype=dt),
                            torch.empty(N, T, dtype=dt),
                            normalize,
                            checks,
                            grad_scale,
                            out,
                            torch.empty_like(out),
                            torch.empty(N, dtype=torch.int32),
                        ),
                    )


def slice_width(R: int, V: int, dtype, bn: int) -> int:
    """Vc as ``linear.slice_cols`` sizes it on a GPU with room for its 256 MiB budget."""
    import torch

    cols = (256 << 20) // (max(R, 1) * torch.empty((), dtype=dtype).element_size()) // bn * bn
    return max(bn, min(cols, -(-V // bn) * bn))


def linear_launches(
    dtype, H: int, V: int, R: int, arch: int, on: bool, last_slice: bool = False, transposed: bool = False
):
    """Every launch of one fused forward and backward (first or last vocabulary slice) with the
    switches all on (bias, valid rows, entropy, filtering) or all off; the backward twice: all
    gradients (first slice: no accumulator), and grad_bias without grad_weight with the
    grad_hidden accumulator (a later slice)."""
    import torch

    from gspo_kernels import _launch_linear as kl
    from gspo_kernels import linear

    hid = torch.empty(H, R, dtype=dtype).t() if transposed else torch.empty(R, H, dtype=dtype)
    w = torch.empty(H, V, dtype=dtype).t() if transposed else torch.empty(V, H, dtype=dtype)  # never touched
    b = torch.empty(V, dtype=dtype) if on else None
    y = torch.zeros(R, dtype=torch.long)
    f = torch.zeros(R)
    tiles = kl.tile_set(dtype, torch.device("cpu"), kl.aligned_rows(hid, w), arch)
    span, n = linear.split_span(R, V, tiles, 264)
    fwd, comb = kl.fwd_launches(
        hid,
        w,
        b,
        y,
        torch.ones(R, dtype=torch.bool) if on else None,
        0.7,
        f,
        f.clone(),
        f.clone() if on else None,
        torch.empty(4, R, n),
        span,
        tiles,
    )
    out = {"fwd": fwd, "combine": comb}
    t = tiles["dz"]
    vc = slice_width(R, V, dtype, t.block_n)
    v0 = (V - 1) // vc * vc if last_slice else 0
    ncols = min(vc, V - v0)
    dz = torch.empty(R, vc, dtype=dtype)
    flags = torch.ones(-(-R // t.block_m), -(-vc // t.block_n), dtype=torch.int8)
    ent = f if on else None
    thr = 2.0**-12 if on else None
    for grads in ("all", "bias+hidden"):
        gw = torch.empty_like(w) if grads == "all" else None
        gb = torch.empty(V, dtype=dtype) if b is not None or grads != "all" else None
        acc = torch.empty(R, H) if grads != "all" else None
        dzl, *prods = kl.bwd_launches(
            hid,
            w,
            b if b is not None else (gb if grads != "all" else None),
            y,
            f,
            f,
            ent,
            ent,
            0.7,
            thr,
            dz,
            flags,
            v0,
            ncols,
            torch.empty(R, H, dtype=dtype),
            acc,
            gw,
            gb,
            torch.ones(R, dtype=torch.int8),
            tiles,
        )
        out["dz"] = dzl
        built = [p() for p in prods]
        out[f"grad_weight ({grads})"] = built[0]
        out[f"grad_hidden ({grads})"] = built[1]
    return out


def linear_cases():
    import torch

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for arch in (80, 90):
            for H, V in ((4096, 151_936), (897, 151_655)):
                if dtype == torch.float16 and (arch, H) != (90, 4096):
                    continue  # bf16's code with another element type
                for on in (True, False):
                    for tf32 in (False, True) if dtype == torch.float32 else (False,):
                        torch.backends.cuda.matmul.allow_tf32 = tf32
                        for name, launch in linear_launches(dtype, H, V, 48, arch, on).items():
                            yield f"{name} {dtype} H={H} sm_{arch} switches={on} tf32={tf32}", launch
                        torch.backends.cuda.matmul.allow_tf32 = False
    for name, launch in linear_launches(torch.bfloat16, 4096, 151_936, 48, 90, True, transposed=True).items():
        yield f"{name} bf16 (H, R) and (H, V) storage, transposed", launch
    for name, launch in linear_launches(torch.bfloat16, 4096, 151_936, 48, 90, True, last_slice=True).items():
        yield f"{name} bf16 last slice", launch


def tail_specs():
    """A covering set of the tail's switches: every value of every switch in some spec (twelve
    specs, the i-th taking each switch's (i mod count)-th value), fp32 and fp64, checks on and off."""
    import torch

    from gspo_kernels.losses.tail import launch

    values = dict(level=3, den=3, adv_mode=4, obj=4, kl=6, offpol=3, isr_mode=5, agg=6)
    flags = (
        "has_delta",
        "has_clipc",
        "bias_kl",
        "add_kl",
        "entmask",
        "isr_mask",
        "has_cmin",
        "has_cmax",
        "clip_tok",
        "pass1",
        "has_nib",
        "ent_bonus",
    )
    for i in range(12):
        f = {k: i % n for k, n in values.items()}
        f.update({k: (i + j) % 2 == 0 for j, k in enumerate(flags)})
        acc = torch.float64 if i % 4 == 3 else torch.float32
        wide = torch.float64 if i % 3 == 1 else acc
        yield (
            i,
            launch.TailSpec(
                **f, acc=acc, ps=wide, pr=wide, rd=wide, vd=acc, ld=acc, check=(1 << 8) - 1 if i % 3 != 2 else 0
            ),
        )


def tail_launches(spec, n=64, t=4096):
    """The fused tail's three launches for ``spec`` on (n, t) inputs (real CPU tensors)."""
    import torch

    from gspo_kernels.losses.tail import launch as k
    from gspo_kernels.losses.tail import math as tm

    acc = spec.acc

    def tok(dt=acc):
        return torch.empty(n, t, dtype=dt)

    tensors = dict(
        lp=tok(),
        ent=tok(),
        mask=tok(torch.uint8),
        old=tok(torch.float64),
        ref=tok(),
        samp=tok(),
        isr=tok() if spec.isr_mode == 1 else torch.empty(n, 1, dtype=acc),
        adv=tok() if spec.adv_mode == 1 else torch.empty(n, 1),
        rew=torch.empty(n, dtype=torch.float64),
        sorted=torch.empty(n * t),
        nib=torch.empty(()),
        prm=torch.empty(tm.N_PRM, dtype=torch.float64),
        tok=tok(torch.int64),
        fmask=tok(),
        lens=torch.empty(n, dtype=torch.int64),
        vocab=151_936,
    )
    out = dict(
        part=torch.empty(n, k.K, dtype=spec.ld),
        seqm=torch.empty(3, n, dtype=acc),
        ratio=tok(),
        scal=torch.empty(4, dtype=torch.float64),
        loss=torch.empty((), dtype=spec.ld),
        pl=torch.empty((), dtype=spec.ld),
        met=torch.empty(tm.N_MET, dtype=acc),
        flag=torch.empty((), dtype=torch.int32),
    )
    fwd, red = k.fwd_launches(spec, tensors, out, n, t, 8, n * t)
    bwd = k.bwd_launch(
        spec, tensors, out["part"], out["scal"], torch.empty(()), tok(), tok() if spec.ent_bonus else None, n, t
    )
    return {"fwd": fwd, "reduce": red, "bwd": bwd}


def package_kernels() -> dict:
    """Every kernel (a ``triton.jit`` function named ``*_kernel``) of the package's kernel modules."""
    import importlib

    from triton.runtime.jit import JITFunction

    out = {}
    for mod in (
        "gspo_kernels._kernels",
        "gspo_kernels._kernels_seq",
        "gspo_kernels._kernels_linear",
        "gspo_kernels.losses.tail.kernels",
        "gspo_kernels.losses.tail.kernels_bwd",
    ):
        for name, fn in vars(importlib.import_module(mod)).items():
            if isinstance(fn, JITFunction) and name.endswith("_kernel"):
                out[name] = fn
    return out


def all_launches():
    """(description, Launch) for every kernel and constexpr variant (see the module docstring)."""
    yield from (("logits " + d, launch) for d, launch in logits_launches())
    yield from seq_reduce_launches()
    yield from (("linear " + d, launch) for d, launch in linear_cases())
    for i, spec in tail_specs():
        for kind, launch in tail_launches(spec).items():
            yield f"tail {kind} spec {i}", launch


def _check(item):
    key, launch = item
    return key, launch.kernel.fn.__name__, narrow_products(ttir(launch))


def probe_offsets():
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from codegen_probe import variant_key

    uniq: dict = {}
    for desc, launch in all_launches():
        key = (id(launch.kernel), variant_key(launch))
        uniq.setdefault(key, (desc, launch))
    covered = {id(launch.kernel) for _, launch in uniq.values()}
    names = [name for name, fn in package_kernels().items() if id(fn) in covered]
    # spawn, not fork: the parent has imported torch (threads) already; Launches pickle by value
    # except the kernel, so the workers rebuild them from the descriptions' order.
    with ProcessPoolExecutor(
        max_workers=min(2, os.cpu_count() or 1), mp_context=multiprocessing.get_context("spawn")
    ) as ex:
        rows = list(ex.map(_check_index, range(len(uniq)), chunksize=4))
    return dict(
        kernels=sorted(names),
        all_kernels=sorted(package_kernels()),
        compiled=len(uniq),
        violations={desc: bad for desc, _, bad in rows if bad},
    )


def probe_variants() -> dict:
    """Distinct compiled variants per (kernel, dtype, alignment class) over several row counts,
    hidden widths and vocabularies (and the slices each backward makes), as Triton's kernel
    cache keys them (codegen_probe.variant_key)."""
    import torch
    from codegen_probe import variant_key

    classes = {
        "aligned": ((896, 32_000), (2048, 151_936), (4096, 128_256)),
        "unaligned": ((897, 50_257), (904, 151_655), (1000, 32_001)),
    }  # 904, 1000: 8 mod 16
    out: dict = {}
    for dtype in (torch.bfloat16, torch.float32):
        for cls, shapes in classes.items():
            for H, V in shapes:
                for R in (1, 7, 48, 1000, 4097):
                    for last in (False, True):
                        for name, launch in linear_launches(dtype, H, V, R, 90, True, last_slice=last).items():
                            out.setdefault(f"linear {name} {dtype} {cls}", set()).add(variant_key(launch))
    spec = dict(tail_specs())[0]
    for n, t in ((1, 1), (3, 17), (64, 1000), (5, 4096)):
        for name, launch in tail_launches(spec, n, t).items():
            out.setdefault(f"tail {name}", set()).add(variant_key(launch))
    for n, t in ((1, 1), (3, 17), (64, 1000), (5, 4096)):
        for name, launch in seq_reduce_launches(n, t):
            out.setdefault(name, set()).add(variant_key(launch))
    return {k: len(v) for k, v in out.items()}


_UNIQ = None


def _check_index(i: int):
    """Worker: the i-th distinct launch of ``all_launches`` (rebuilt here: kernels do not pickle)."""
    global _UNIQ
    if _UNIQ is None:
        from codegen_probe import variant_key

        _UNIQ = {}
        for desc, launch in all_launches():
            _UNIQ.setdefault((id(launch.kernel), variant_key(launch)), (desc, launch))
        _UNIQ = list(_UNIQ.values())
    return _check(_UNIQ[i])


# ---------------------------------------------------------------- the tests
# The reader on a piece of TTIR as Triton 3.9 printed it for an int32 ``kk[:, None] * sbk``
# (the weight-gradient product's B offset before it was 64-bit), and its 64-bit form.
_NARROW = """
  tt.func public @k(%Bm: !tt.ptr<bf16> {tt.divisibility = 16 : i32}, %K: i32, %sbk: i32) {
    %ks = tt.make_range {end = 64 : i32, start = 0 : i32} : tensor<64xi32> loc(#loc1)
    %c64_i32 = arith.constant 64 : i32 loc(#loc1)
    %acc:2 = scf.for %j = %c0_i32 to %K step %c1_i32 iter_args(%a = %x, %b = %y) -> (f32, f32)  : i32 {
      %kk = arith.muli %j, %c64_i32 : i32 loc(#loc2)
      %kk_29 = tt.splat %kk : i32 -> tensor<64xi32> loc(#loc2)
      %kk_30 = arith.addi %kk_29, %ks : tensor<64xi32> loc(#loc2)
      %b_61 = tt.expand_dims %kk_30 {axis = 1 : i32} : tensor<64xi32> -> tensor<64x1xi32> loc(#loc3)
      %b_62 = tt.splat %sbk : i32 -> tensor<64x1xi32> loc(#loc3)
      %b_63 = arith.muli %b_61, %b_62 : tensor<64x1xi32> loc(#loc3)
      %b_64 = tt.splat %Bm : !tt.ptr<bf16> -> tensor<64x1x!tt.ptr<bf16>> loc(#loc3)
      %b_65 = tt.addptr %b_64, %b_63 : tensor<64x1x!tt.ptr<bf16>>, tensor<64x1xi32> loc(#loc3)
      scf.yield %a, %b : f32, f32 loc(#loc2)
    } loc(#loc2)
    tt.return loc(#loc1)
  } loc(#loc1)
#loc1 = loc("/x/_kernels_linear.py":340:5)
#loc2 = loc("/x/_kernels_linear.py":364:5)
#loc3 = loc("b"(#loc4))
#loc4 = loc("/x/_kernels_linear.py":370:20)
"""


def test_reader_flags_a_32_bit_stride_product():
    assert narrow_products(_NARROW) == ["_kernels_linear.py:370"]  # not j * 64 (line 364): bounded
    wide = (
        _NARROW.replace(
            "%b_61 = tt.expand_dims %kk_30 {axis = 1 : i32} : tensor<64xi32> -> tensor<64x1xi32>",
            "%b_61 = arith.extsi %kk_30 : tensor<64xi32> to tensor<64x1xi64>",
        )
        .replace(
            "%b_62 = tt.splat %sbk : i32 -> tensor<64x1xi32>", "%b_62 = arith.extsi %sbk : i32 to tensor<64x1xi64>"
        )
        .replace(": tensor<64x1xi32> loc(#loc3)", ": tensor<64x1xi64> loc(#loc3)")
        .replace("tensor<64x1x!tt.ptr<bf16>>, tensor<64x1xi32>", "tensor<64x1x!tt.ptr<bf16>>, tensor<64x1xi64>")
    )
    assert narrow_products(wide) == []


@pytest.fixture(scope="module")
def probe():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), HERE, env.get("PYTHONPATH", "")])
    res = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--probe"], capture_output=True, text=True, env=env, timeout=1800
    )
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_no_32_bit_offsets_in_any_kernel(probe):
    assert probe["kernels"] == probe["all_kernels"], "a kernel of the package is not compiled here"
    assert probe["compiled"] >= 200
    assert probe["violations"] == {}, "32-bit products of a stride or size reach an address (file:line)"


@pytest.mark.slow
def test_one_variant_per_dtype_and_alignment_class(probe):
    # Row counts 1-4,097, three (H, V) per class, first and last vocabulary slice. Aligned:
    # H and V multiples of 16 (every stride and size Triton specialises keeps its class):
    # one variant. Not aligned (H = 897, or 904 and 1,000: 8 mod 16, so not aligned for
    # Triton even in bf16; V not a multiple of 16): one too, but for the backward's products,
    # whose slice width (the dz buffer's, a multiple of 16) differs on the last slice (V - v0):
    # two. The tail and the per-sequence reduction over (N, T) from (1, 1) to (64, 1,000).
    print()
    for key, n in sorted(probe["variants"].items()):
        print(f"{key:<60} {n} variant(s)")
        last_slice = key.startswith("linear grad_") and key.endswith("unaligned")
        assert n == (2 if last_slice else 1), (key, n)


@pytest.mark.slow
def test_offsets_past_2_31(monkeypatch):
    """Rows of hidden and weight 2**30 elements apart in one 4 GiB allocation (fp16; on a CPU
    never touched but for three pages): the products' ``kk * stride`` pass 2**31. Same outputs
    and gradients, bitwise, as their contiguous copies, and both equal the float64 reference.
    In the interpreter on a CPU, and compiled on a GPU (4 GiB of its memory, for the test)."""
    import torch
    from conftest import TOLERANCE

    from gspo_kernels import _ops, linear, linear_token_logprobs
    from reference.linear import naive_linear_token_outputs

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("a CPU runs the Triton kernels only in the interpreter (tests/conftest.py sets it)")
    monkeypatch.setattr(_ops, "CPU_BACKEND", "triton")
    monkeypatch.setattr(linear, "FUSED", True)
    R, H, step = 3, 16, 1 << 30
    big = torch.empty(2 * step + 2 * H, dtype=torch.float16, device=device)  # 4 GiB
    hidden = big.as_strided((R, H), (step, 1), 0)
    weight = big.as_strided((R, H), (step, 1), H)  # V = 3 rows
    g = torch.Generator().manual_seed(0)
    hidden.copy_(torch.randn(R, H, generator=g))
    weight.copy_(torch.randn(R, H, generator=g) / 4)
    tokens = torch.tensor([2, 0, 1], device=device)
    up = torch.randn(2, R, generator=g).to(device)

    def run(h, w):
        h, w = (t.detach().requires_grad_(True) for t in (h, w))
        lp, ent = linear_token_logprobs(h, w, tokens, return_entropy=True)
        return (lp, ent, *torch.autograd.grad((lp, ent), (h, w), (up[0], up[1])))

    far = run(hidden, weight)
    near = run(hidden.contiguous(), weight.contiguous())
    for a, b, name in zip(far, near, ("logp", "entropy", "grad hidden", "grad weight")):
        assert torch.equal(a, b), name
    h64, w64 = (t.detach().double().requires_grad_(True) for t in (hidden, weight))
    lp, ent = naive_linear_token_outputs(h64, w64, tokens, dtype=torch.float64)
    gh, gw = torch.autograd.grad((lp, ent), (h64, w64), (up[0].double(), up[1].double()))
    tol = TOLERANCE[torch.float16]
    torch.testing.assert_close(far[0].double(), lp, **tol["value"])
    torch.testing.assert_close(far[1].double(), ent, **tol["value"])
    # dz is written in fp16 and the gradient rounded once more: two fp16 roundings, relative
    # to max(1, max |reference|) (tests/test_linear_fused.py's TOLERANCE, and its reasons)
    for got, ref in ((far[2], gh), (far[3], gw)):
        torch.testing.assert_close(got.double(), ref, atol=2.0**-9 * max(1.0, ref.abs().max().item()), rtol=0)


if __name__ == "__main__" and sys.argv[1:] == ["--probe"]:
    sys.path.insert(0, HERE)
    print(json.dumps(dict(probe_offsets(), variants=probe_variants())))
