"""Compile the GPU kernels for Hopper (sm_90) WITHOUT a GPU and report their resources.

Triton kernels are compiled ahead of time for a given target (``triton.compile`` with a
GPUTarget), then the cubin's registers, stack (spills), local loads/stores and whether the
tensor-core instructions are Hopper's (HGMMA) are read with the cuobjdump shipped in Triton's
package. The CUDA C++ file is compiled with nvcc -Xptxas -v when nvcc is on the PATH.

    python -m bench.gpu_compile_check [--arch 90] [--quick]

Exit status 1 if a kernel fails to compile. Spills are reported, not fatal.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from bench.common import REPO

GRAM_SIG = {"X": "*fp16", "Y": "*fp32", "IDX": "*i32", "OFF": "*i32", "SHIFT": "*fp32",
            "SX": "*fp64", "XTX": "*fp32", "XTY": "*fp64", "d": "i32", "k": "i32", "F": "i32",
            "n_tm": "i32", "n_tn": "i32", "s_xb": "i64", "s_xr": "i32", "s_xd": "i32",
            "s_yr": "i32", "s_yk": "i32", "BM": "constexpr", "BN": "constexpr",
            "BLOCK_R": "constexpr", "KP": "constexpr", "GATHER": "constexpr",
            "SHIFT_IN": "constexpr", "DIAG_STATS": "constexpr"}
MOM_SIG = {"X": "*fp16", "Y": "*fp32", "IDX": "*i32", "OFF": "*i32", "SHIFT": "*fp32",
           "OUT": "*fp32", "m": "i32", "k": "i32", "F": "i32", "rows_per_split": "i32",
           "s_xb": "i64", "s_xr": "i32", "s_xd": "i32", "s_yr": "i32", "s_yk": "i32",
           "BLOCK_N": "constexpr", "BLOCK_R": "constexpr", "KP": "constexpr",
           "GATHER": "constexpr", "SQUARES": "constexpr", "NS": "constexpr"}

PREP_SIG = {"X": "*fp16", "Y": "*fp32", "IDX": "*i32", "OFF": "*i32", "OFFP": "*i32",
            "SHIFT": "*fp32", "XS": "*fp16", "OUT": "*fp32", "d": "i32", "d_pad": "i32", "k": "i32",
            "F": "i32", "rows_tot": "i32", "rows_per_split": "i32", "s_xb": "i64", "s_xr": "i32",
            "s_xd": "i32", "s_yr": "i32", "s_yk": "i32", "BLOCK_N": "constexpr",
            "BLOCK_R": "constexpr", "KP": "constexpr", "GATHER": "constexpr", "NS": "constexpr"}
PRE_SIG = {"XS": "*fp16", "OFFP": "*i32", "G": "*fp32", "d": "i32", "d_pad": "i32",
           "rows_tot": "i32", "F": "i32", "n_tm": "i32", "n_tn": "i32",
           "BM": "constexpr", "BN": "constexpr", "BLOCK_R": "constexpr", "ACC": "constexpr"}


def tma_sig(bm, bn, br):
    return {"DA": f"tensordesc<fp16[{br}, {bm}]>", "DB": f"tensordesc<fp16[{br}, {bn}]>",
            "OFFP": "*i32", "G": "*fp32", "d": "i32", "rows_tot": "i32", "F": "i32",
            "n_tm": "i32", "n_tn": "i32", "BM": "constexpr", "BN": "constexpr",
            "BLOCK_R": "constexpr", "ACC": "constexpr"}


def raw_tma_sig(bm, bn, br):
    return {"DA": f"tensordesc<fp16[{br}, {bm}]>", "DB": f"tensordesc<fp16[{br}, {bn}]>",
            "TA": f"tensordesc<fp16[1, {br}, {bm}]>", "TB": f"tensordesc<fp16[1, {br}, {bn}]>",
            "G": "*fp32", "d": "i32", "r": "i32", "r0": "i32", "nf": "i32", "F": "i32", "f": "i32",
            "n_tm": "i32", "n_tn": "i32", "BM": "constexpr", "BN": "constexpr",
            "BLOCK_R": "constexpr"}


WGRAM_SIG = {"X": "*fp16", "W": "*fp32", "S": "*fp32", "G": "*fp32", "n": "i32", "d": "i32",
             "M": "i32", "n_tm": "i32", "n_tn": "i32", "s_xb": "i64", "s_xr": "i32",
             "s_xd": "i32", "BM": "constexpr", "BN": "constexpr", "BLOCK_R": "constexpr",
             "SPLIT": "constexpr", "ACC": "constexpr"}


def check_weighted(comp, quick: bool) -> None:
    """The weighted Gram (Newton Hessians) at every tiling the GPU bench tries, float16 X."""
    from probes.kernels.triton import weighted  # deferred: see main()

    for cfg in (weighted.WEIGHTED_CONFIGS[:1] if quick else weighted.WEIGHTED_CONFIGS):
        bm, bn, br, warps, stages = cfg
        comp(weighted._wgram_kernel, WGRAM_SIG,
             {"BM": bm, "BN": bn, "BLOCK_R": br, "SPLIT": True, "ACC": False}, warps, stages,
             f"weighted gram {tuple(cfg)}")


ADD_SIG = {"XTX": "*fp64", "G": "*fp32", "S": "*fp64", "C": "*fp64", "NF": "*fp64", "d": "i32",
           "F": "i32", "BLOCK": "constexpr"}


def cubin_resources(cubin: bytes, cuobjdump: str) -> dict:
    """regs, stack bytes, local loads/stores (spills), tensor-core kind and TMA loads of a
    compiled kernel, read with cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        name = f.name
    try:
        res = subprocess.run([cuobjdump, "-res-usage", name], capture_output=True, text=True).stdout
        sass = subprocess.run([cuobjdump, "-sass", name], capture_output=True, text=True).stdout
    finally:
        os.unlink(name)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
    return {"regs": int(m.group(1)) if m else None, "stack": int(m.group(2)) if m else None,
            "LDL": sass.count("LDL"), "STL": sass.count("STL"),
            "mma": "HGMMA" if "HGMMA" in sass else ("HMMA" if "HMMA" in sass else "no-mma"),
            "UTMALDG": sass.count("UTMALDG"), "LDGSTS": sass.count("LDGSTS"),
            "LDG128": sass.count("LDG.E.128"), "DFMA": sass.count("DFMA")}


def resources_line(r: dict) -> str:
    extra = "".join(f" {name} {r[key]}" for key, name in
                    (("UTMALDG", "UTMALDG"), ("LDGSTS", "LDGSTS"), ("LDG128", "LDG.128")) if r[key])
    return f"regs {r['regs']} stack {r['stack']}B LDL {r['LDL']} STL {r['STL']} {r['mma']}{extra}"


# what a real launch specialises (Triton marks integers divisible by 16 and pointers aligned to
# 16 bytes, and turns an integer equal to 1 into a constant): without it, loads along a
# runtime stride are not vectorised and the report misleads
LAUNCH_DIV16 = ("d", "m", "d_pad", "s_xb", "s_xr", "rows_per_split", "rows_tot")
LAUNCH_ONES = ("s_xd",)


def compile_for(fn, sig, consts, warps, stages, arch: int = 90, **options):
    """triton.compile of one kernel for sm_<arch> without a GPU, specialised as a launch on a
    contiguous d = 4096 chunk would be; returns (kernel, resources)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    names = fn.arg_names
    sig, consts = dict(sig), dict(consts)
    for n in LAUNCH_ONES:
        if n in sig:
            sig[n], consts[n] = "constexpr", 1
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n, t in sig.items()
             if t.startswith("*") or (n in LAUNCH_DIV16 and t.startswith("i"))}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": warps, "num_stages": stages, **options})
    return k, cubin_resources(k.asm["cubin"], cuobjdump)


class _Report:
    """Compiles kernels one by one, prints one line each, counts the failures."""

    def __init__(self, arch: int):
        self.arch, self.failed = arch, 0

    def __call__(self, fn, sig, consts, warps, stages, label, **options):
        t0 = time.time()
        try:
            k, r = compile_for(fn, sig, consts, warps, stages, self.arch, **options)
            print(f"{label:48s} smem {k.metadata.shared:6d}  {resources_line(r)}"
                  f"  ({time.time() - t0:.1f}s)", flush=True)
        except Exception as exc:  # noqa: BLE001 - report every failure
            self.failed += 1
            print(f"{label:48s} FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)


def check_preshift(comp, tk, quick: bool) -> None:
    """preshift mode (the default): the pre-shift pass + plain / TMA Gram on the padded copy;
    rawtma: the raw chunk through TMA, then the float64 re-centring add."""
    from probes.kernels.triton import preshift, rawtma  # deferred: see main()

    for cfg in (tk.preshift_configs()[:2] if quick else tk.preshift_configs()):
        bm, bn, br, warps, stages, tma = cfg
        consts = {"BM": bm, "BN": bn, "BLOCK_R": br, "ACC": False}
        if tma:
            comp(preshift._gram_tma_kernel, tma_sig(bm, bn, br), consts, warps, stages,
                 f"gram preshift {tuple(cfg)} tma")
        else:
            comp(preshift._gram_pre_kernel, PRE_SIG, consts, warps, stages,
                 f"gram preshift {tuple(cfg)} ptr")
    for cfg in (tk.rawtma_configs()[:2] if quick else tk.rawtma_configs()):
        bm, bn, br, warps, stages = cfg[:5]
        comp(rawtma._gram_raw_tma_kernel, raw_tma_sig(bm, bn, br),
             {"BM": bm, "BN": bn, "BLOCK_R": br}, warps, stages, f"gram rawtma {tuple(cfg[:5])}")
    comp(rawtma._add_centred_kernel, ADD_SIG, {"BLOCK": rawtma.ADD_BLOCK}, 4, 1, "add_centred",
         enable_fp_fusion=False)
    for gather in (False, True):
        for kp in (1, 2, 4, 8, 16):
            pbn, pbr, pw = 128, max(1, min(16, 64 // kp)), 4   # as preshift.prep_tiling on a GPU
            comp(preshift._prep_kernel, PREP_SIG,
                 {"BLOCK_N": pbn, "BLOCK_R": pbr, "KP": kp, "GATHER": gather, "NS": 1}, pw, 1,
                 f"prep {pbn}x{pbr} w{pw} KP={kp} gather={gather}")
    for t in tk.prep_tilings():
        pbn, pbr, pw, _, pns = t
        comp(preshift._prep_kernel, PREP_SIG,
             {"BLOCK_N": pbn, "BLOCK_R": pbr, "KP": 2, "GATHER": False, "NS": pns}, pw, 1,
             f"prep tiling {tuple(t)} KP=2")


def check_older(comp, tk, quick: bool) -> None:
    """The older shift-in / raw Gram kernel at every tiling, and the moments kernel."""
    from probes.kernels.triton import column_moments, shiftin  # deferred: see main()

    for cfg in (tk.gram_configs()[:2] if quick else tk.gram_configs()):
        bm, bn, br, warps, stages, fused = cfg
        for sik in (True, False):
            for gather in (False, True):
                if gather and quick:
                    continue
                comp(shiftin._gram_kernel, GRAM_SIG,
                     {"BM": bm, "BN": bn, "BLOCK_R": br, "KP": 16, "GATHER": gather,
                      "SHIFT_IN": sik, "DIAG_STATS": fused},
                     warps, stages, f"gram {tuple(cfg)} shift_in={sik} gather={gather}")
    for t in tk.moments_tilings():
        bn, br, w, ns = t
        comp(column_moments._moments_kernel, MOM_SIG,
             {"BLOCK_N": bn, "BLOCK_R": br, "KP": 2, "GATHER": False, "SQUARES": True, "NS": ns},
             w, 3, f"moments {tuple(t)}")


def check_cuda(arch: int) -> int:
    """nvcc -Xptxas -v of the CUDA C++ kernels: registers and spills per kernel; 1 if it fails."""
    nvcc = shutil.which("nvcc")
    src = REPO / "csrc" / "probes" / "cuda" / "stats_kernels.cu"
    if not (nvcc and src.exists()):
        print("nvcc not found: CUDA C++ not checked")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([nvcc, "-std=c++17", "-O3", f"-arch=sm_{arch}", "-Xptxas", "-v",
                            "-c", str(src), "-o", os.path.join(tmp, "k.o")],
                           capture_output=True, text=True)
    if r.returncode:
        print("nvcc FAILED\n" + r.stderr[-2000:])
        return 1
    names = re.findall(r"Compiling entry function '(\w+)'", r.stderr)
    usage = re.findall(r"Used (\d+) registers.*", r.stderr)
    spills = re.findall(r"(\d+) bytes spill stores", r.stderr)
    for n, u, sp in zip(names, usage, spills):
        short = re.sub(r"_ZN11probes_cuda\w*?(wgram_kernel|gram_kernel|moments_kernel)"
                       r"(ILb?i?(\w+?)E)?.*",
                       r"\1<\3>", n)
        print(f"cuda {short:43s} regs {u} spill stores {sp}B")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--quick", action="store_true", help="first two Gram configs only")
    p.add_argument("--preshift-only", action="store_true", help="only the preshift-mode kernels")
    args = p.parse_args(argv)
    # compiled for the target, not interpreted: triton.jit reads TRITON_INTERPRET when the
    # kernels are defined, so the kernel package is imported only after this
    os.environ.pop("TRITON_INTERPRET", None)
    from probes.kernels import triton as tk  # deferred: see above

    comp = _Report(args.arch)
    check_preshift(comp, tk, args.quick)
    if args.preshift_only:
        return 1 if comp.failed else 0
    check_older(comp, tk, args.quick)
    check_weighted(comp, args.quick)
    return 1 if comp.failed + check_cuda(args.arch) else 0


if __name__ == "__main__":
    sys.exit(main())
