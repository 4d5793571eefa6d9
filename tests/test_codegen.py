"""Generated code of the kernels, checked without a GPU, and compile counts.

``codegen_probe.py`` (run in a subprocess, outside the interpreter) compiles
every kernel the public log-prob ops launch, specialised by Triton's own
binder from the launchers' real arguments, for sm_80, sm_90 and sm_100, and
reports global accesses by width, registers and local memory. Asserted here:

- aligned rows (V = 151,936 and 128,256: row starts and V multiples of 16
  elements, contiguous or ``[:, :-1]``-sliced; bf16/fp16/fp32): the logits are
  streamed only with 16-byte vector loads (and the gradient written only with
  16-byte vector stores); the only scalar global loads are the per-row
  scalars (token id, and the sampled token's logit in forward; upstream
  gradients and saved statistics in backward); no local memory (no spills).
- unaligned rows (V = 50,257 and 151,655): Triton cannot prove 16-byte
  alignment, so the same kernels stream with narrower (scalar) accesses, with
  the same values: their correctness is tested in ``test_logprobs.py`` and
  ``test_entropy.py`` at those V in the interpreter.
- a bounded number of compiled variants over many (N, T) and V of one alignment class.
- the hidden-state kernels (``_kernels_linear``: forward, split combine, dz,
  grad_weight, grad_hidden, the products also as filtering runs them), compiled through their launchers with the tiles
  each arch gets, bf16 and fp32, H = 4,096 and V = 151,936 (and odd H = 897,
  V = 151,655 on sm_90): every kernel that multiplies uses the target's
  tensor-core instruction (sm_80 ``mma.sync``, sm_90 ``wgmma.mma_async``,
  sm_100 ``tcgen05.mma``), none uses local memory or a stack frame (no spills);
  registers are printed.
- every kernel (also fp64 logits and the per-sequence reduction) at most
  ``MAX_REGS`` registers a thread on sm_80/90/100: headroom under ptxas's 255
  (the table is printed in the run's terminal summary).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
# Per-row scalar loads that are not logits: fwd: token id (+ the sampled logit);
# bwd: g, lse, token id (+ h, H with the entropy gradient).
SCALAR_LOADS = {"fwd": 2, "fwd_ent": 2, "bwd": 3, "bwd_ent": 5}
SUMMARY: list[str] = []  # registers and accesses per kernel, shown in the run's terminal summary


@pytest.fixture(scope="module")
def probe():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    res = subprocess.run(
        [sys.executable, os.path.join(HERE, "codegen_probe.py")], capture_output=True, text=True, env=env, timeout=1800
    )
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout)


def test_aligned_rows_use_16_byte_accesses(probe):
    aligned = [c for c in probe["cases"] if c["V"] in (151_936, 128_256)]
    assert len(aligned) == 3 * 4 * 3 * 2 * 2  # archs x kernels x dtypes x V x layouts
    SUMMARY.append("kernel   dtype     arch  V        layout      regs  v4 loads  scalar loads  v4 stores")
    for c in aligned:
        line = (
            f"{c['kind']:<8} {c['dtype']:<9} sm{c['arch']:<3} {c['V']:<8} {c['layout']:<11} {c['regs']:<5} "
            f"{c['loads_v4']:<9} {c['loads_scalar']:<13} {c['stores_v4']}"
        )
        print(line)
        if c["arch"] == 90 and c["V"] == 151_936 and c["layout"] == "sliced":
            SUMMARY.append(line)  # printed at the end of the run by tests/conftest.py
        what = f"{c['kind']} {c['dtype']} V={c['V']} {c['layout']} sm_{c['arch']}"
        assert c["loads_v4"] >= 1, what
        assert c["loads_v2"] == 0 and c["loads_scalar"] == SCALAR_LOADS[c["kind"]], what
        if c["kind"].startswith("bwd"):
            assert c["stores_v4"] >= 1 and c["stores_v2"] == 0 and c["stores_scalar"] == 0, what
        assert c["local"] == 0 and c["stack"] == 0 and c["local_ptx"] == 0, what  # no spills
        assert c["regs"] <= 128, what


def test_unaligned_rows_compile_without_spills(probe):
    # V = 50,257 / 151,655: narrower accesses (reported), still no local memory.
    unaligned = [c for c in probe["cases"] if c["V"] in (50_257, 151_655)]
    assert unaligned
    for c in unaligned:
        assert c["loads_v4"] == 0 and c["loads_scalar"] > SCALAR_LOADS[c["kind"]]
        assert c["local"] == 0 and c["local_ptx"] == 0


def test_bounded_variants_per_shape(probe):
    # 20 (N, T) x up to 4 V x 2 layouts per class. Aligned: every stride is a
    # multiple of V, so one variant per (kernel, dtype). Unaligned V: each of
    # the three row strides may or may not be a multiple of 16 (T + 1 = 1024
    # makes (T + 1) * 50,257 one), so at most 2**3 variants, whatever the shapes.
    print()
    for key, n in sorted(probe["variants"].items()):
        print(f"{key:<28} {n} variant(s)")
        assert n == 1 if key.endswith("/aligned") else 1 <= n <= 8, (key, n)


def test_linear_kernels_use_tensor_cores_without_spills(probe):
    lin = probe["linear"]
    # archs x kernels x dtypes, + the unaligned shape on sm_90 (less what this Triton cannot compile)
    assert len(lin) == 3 * 10 * 2 + 10 - len(probe["skipped"])
    if probe["skipped"]:
        SUMMARY.append(f"not compiled by this Triton (see codegen_probe.triton_skips): {probe['skipped']}")
    SUMMARY.append("hidden-state kernels, H = 4,096, V = 151,936 (tile = BLOCK_M x BLOCK_N x BLOCK_K):")
    SUMMARY.append("kernel         dtype     arch  tile         warps  stages  regs  tensor-core instr  smem KB")
    print()
    for c in lin:
        line = (
            f"{c['kind']:<14} {c['dtype']:<9} sm{c['arch']:<3} {c['tile']:<12} {c['num_warps']:<6} "
            f"{c['num_stages']:<7} {c['regs']:<5} {c['tensor_core']:<18} {c['shared'] // 1024} {c['shape']}"
        )
        print(line)
        if c["arch"] == 90 and c["shape"] == "aligned":
            SUMMARY.append(line)
        what = f"{c['kind']} {c['dtype']} {c['shape']} sm_{c['arch']}"
        if c["kind"] != "lin_combine":
            assert c["tensor_core"] >= 1, what
        assert c["local"] == 0 and c["stack"] == 0 and c["local_ptx"] == 0, what  # no spills


# ptxas's limit is 255 registers a thread: a kernel at it spills under the next Triton or
# ptxas that needs one more. Every kernel keeps at least 15 spare.
MAX_REGS = 240


def test_every_kernel_leaves_register_headroom(probe):
    rows = [(f"logits {c['kind']}", c) for c in probe["cases"]]
    rows += [(c["kind"], c) for c in probe["linear"]]
    rows += [(c["kind"] if c["kind"] == "seq_reduce" else f"logits {c['kind']}", c) for c in probe["headroom"]]
    assert len(probe["headroom"]) == 3 * (4 * 3 + 2)
    worst: dict = {}
    for name, c in rows:
        key = (name, c["arch"])
        worst[key] = max(worst.get(key, 0), c["regs"])
        what = f"{name} {c['dtype']} {c.get('V', c.get('shape'))} sm_{c['arch']}: {c['regs']} registers"
        assert c["regs"] <= MAX_REGS, what
        assert c["local"] == 0 and c["stack"] == 0 and c["local_ptx"] == 0, what
    SUMMARY.append("registers a thread, the most over dtypes and shapes (fp64 included), per kernel and arch:")
    SUMMARY.append("kernel               sm80  sm90  sm100")
    for name in sorted({k[0] for k in worst}):
        SUMMARY.append(f"{name:<20} " + "  ".join(f"{worst.get((name, a), '-'):<4}" for a in (80, 90, 100)))


# GPU-only complement of test_bounded_variants_per_shape (which runs everywhere): the same
# bound, counted in Triton's real kernel cache, which only fills where kernels are compiled.
@pytest.mark.skipif(not torch.cuda.is_available(), reason="counts real compilations: needs a CUDA GPU")
def test_compiled_kernel_cache_is_bounded_on_gpu():  # pragma: no cover - GPU only
    from gspo_kernels import _kernels, token_logprobs

    def cached(k):
        return sum(len(c[0]) for c in k.device_caches.values())

    before = cached(_kernels._logprob_fwd_kernel), cached(_kernels._logprob_bwd_kernel)
    for V in (32_000, 128_256, 151_936):
        for N, T in ((1, 3), (2, 17), (3, 64), (4, 100)):
            x = torch.randn(N, T + 1, V, device="cuda", dtype=torch.bfloat16)[:, :-1]
            x = x.detach().requires_grad_(True)
            y = torch.randint(0, V, (N, T), device="cuda")
            token_logprobs(x, y).sum().backward()
    after = cached(_kernels._logprob_fwd_kernel), cached(_kernels._logprob_bwd_kernel)
    assert after[0] - before[0] <= 1 and after[1] - before[1] <= 1
