"""The Triton kernels at their default tilings compile for Hopper (sm_90) without a GPU, use
Hopper's tensor-core instructions (HGMMA) and TMA loads where they should, and do not spill
registers (a spill in the Gram main loop costs a large share of its speed).

Compiled ahead of time with triton.compile for a GPUTarget (bench.gpu_compile_check), in a
subprocess: other test modules run the kernels under TRITON_INTERPRET=1, which changes what
``triton.jit`` builds in this process. The GPU machine's Triton may be older than this one;
this checks the code, bench/gpu_check.sh checks the card.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
REPO = Path(__file__).resolve().parents[2]
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"

SCRIPT = r"""
import json
from bench.gpu_compile_check import compile_for, raw_tma_sig, tma_sig, ADD_SIG, PREP_SIG, MOM_SIG
from probes.kernels import triton as tk
from probes.kernels.triton import column_moments, preshift, rawtma

out = {}
bm, bn, br, w, st, _ = tk.preshift_configs()[0]
c = {"BM": bm, "BN": bn, "BLOCK_R": br}
out["gram preshift tma"] = compile_for(preshift._gram_tma_kernel, tma_sig(bm, bn, br),
                                       dict(c, ACC=False), w, st)[1]
bm, bn, br, w, st, _ = tk.rawtma_configs()[0]
out["gram rawtma"] = compile_for(rawtma._gram_raw_tma_kernel, raw_tma_sig(bm, bn, br),
                                 {"BM": bm, "BN": bn, "BLOCK_R": br}, w, st)[1]
out["add_centred"] = compile_for(rawtma._add_centred_kernel, ADD_SIG,
                                 {"BLOCK": rawtma.ADD_BLOCK}, 4, 1, enable_fp_fusion=False)[1]
for t in tk.prep_tilings():
    out[f"prep {tuple(t)}"] = compile_for(preshift._prep_kernel, PREP_SIG, {
        "BLOCK_N": t[0], "BLOCK_R": t[1], "KP": 2, "GATHER": True, "NS": t[4]}, t[2], 1)[1]
for t in tk.moments_tilings():
    out[f"moments {tuple(t)}"] = compile_for(column_moments._moments_kernel, MOM_SIG, {
        "BLOCK_N": t[0], "BLOCK_R": t[1], "KP": 2, "GATHER": False, "SQUARES": True,
        "NS": t[3]}, t[2], 3)[1]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled():
    if not CUOBJDUMP.exists():
        pytest.skip(f"this Triton wheel has no {CUOBJDUMP} to read the compiled kernels")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # run from the repository root, where ``bench`` is importable as a package
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env,
                       cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["gram preshift tma", "gram rawtma"])
def test_gram_kernels_use_hopper_tensor_cores_and_tma_without_spills(compiled, name):
    r = compiled[name]
    assert r["mma"] == "HGMMA" and r["UTMALDG"] > 0, r
    assert r["LDL"] == 0 and r["STL"] == 0 and r["stack"] == 0, f"{name} spills: {r}"


def test_centred_add_has_no_fused_multiply_add(compiled):
    # fma would round (i, j) and (j, i) differently: the float64 totals must stay symmetric
    assert compiled["add_centred"]["DFMA"] == 0, compiled["add_centred"]


def test_bandwidth_kernels_do_not_spill(compiled):
    # the float64 add, and every pre-shift and moments tiling the GPU bench tries
    names = [n for n in compiled if n.startswith(("add_centred", "prep", "moments"))]
    assert len(names) >= 3
    spills = {n: compiled[n] for n in names if compiled[n]["LDL"] or compiled[n]["STL"]}
    assert not spills, f"these spill registers on sm_90: {spills}"
