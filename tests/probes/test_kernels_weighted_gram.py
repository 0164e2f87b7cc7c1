"""The weighted Gram G[b, m] = Σ_i w[m, i] x_{b,i} x_{b,i}ᵀ (probes.kernels.weighted_gram) on
every backend against a numpy float64 einsum / the torch float64 reference.

Bounds (relative Frobenius norm vs float64): reference 1e-12; cpu (float32 matmuls, float64
totals) 1e-5; Triton under TRITON_INTERPRET=1 and CUDA on a GPU (x·w split into 16-bit hi + lo,
float32 accumulation) 1e-5 with float16 X, 1e-4 with bfloat16 (GPU only: the interpreter's
bfloat16 dot is wrong), 1e-5 with float32. Every result exactly symmetric.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from probes.errors import StatsError
from probes.kernels import available_backends, reference, weighted_gram
from probes.kernels import cpu as cpu_backend
from probes.kernels import cuda as ck

gpu = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[2]
# (B, n, d, M): odd, not multiples of any tile, d > n, one row, one layer
SHAPES = [(2, 37, 19, 3), (1, 5, 33, 2), (3, 70, 17, 1), (1, 1, 7, 4)]


def make(B, n, d, M, seed, dtype=torch.float16, negative=True):
    g = torch.Generator().manual_seed(seed)
    X = (torch.randn(B, n, d, generator=g) * 2 + torch.randn(B, 1, d, generator=g)).to(dtype)
    w = torch.rand(M, n, generator=g, dtype=torch.float64) * 40
    if negative:
        w -= 10
    return X, w


def numpy_gram(X, w):
    x = X.double().cpu().numpy()
    return np.einsum("mi,bid,bie->bmde", np.asarray(w.cpu(), dtype=np.float64), x, x)


def rel(a, b):
    a = torch.as_tensor(np.asarray(a.cpu()) if isinstance(a, torch.Tensor) else a).double()
    b = torch.as_tensor(np.asarray(b.cpu()) if isinstance(b, torch.Tensor) else b).double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def symmetric(G):
    return bool(torch.equal(G, G.transpose(-1, -2)))


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_equals_numpy_einsum(shape):
    X, w = make(*shape, seed=sum(shape))
    out = torch.zeros(shape[0], shape[3], shape[2], shape[2], dtype=torch.float64)
    G = reference.weighted_gram(X, w, out=out)
    assert G is out and rel(G, numpy_gram(X, w)) < 1e-12 and symmetric(G)
    G32 = weighted_gram(X, w, backend="torch")
    assert G32.dtype == torch.float32 and G32.shape == out.shape and symmetric(G32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES + [(2, 3000, 40, 3)])
def test_cpu_matches_reference(shape, dtype):
    if "cpu" not in available_backends():
        pytest.skip("probes._C is not built")
    X, w = make(*shape, seed=7, dtype=dtype)
    want = reference.weighted_gram(X, w, out=torch.zeros(
        shape[0], shape[3], shape[2], shape[2], dtype=torch.float64))
    G = weighted_gram(X, w, backend="cpu")
    assert G.dtype == torch.float32 and symmetric(G)
    assert rel(G, want) < 1e-5
    # small row blocks: the float32 block sums add into the float64 totals
    assert rel(cpu_backend.weighted_gram(X, w, block_rows=16), want) < 1e-5


def test_chunked_accumulation_into_out_equals_one_call():
    B, n, d, M = 2, 101, 13, 3
    X, w = make(B, n, d, M, seed=3)
    for backend in ["torch"] + (["cpu"] if "cpu" in available_backends() else []):
        out = torch.zeros(B, M, d, d, dtype=torch.float64)
        for r0 in range(0, n, 40):
            weighted_gram(X[:, r0:r0 + 40], w[:, r0:r0 + 40], backend=backend, out=out)
        assert rel(out, numpy_gram(X, w)) < 1e-6 and symmetric(out), backend


def test_one_weight_vector_numpy_inputs_and_zero_weights():
    X, w = make(2, 20, 6, 1, seed=4)
    G = weighted_gram(X.numpy(), w[0].numpy(), backend="torch")   # (n,) weights: M = 1
    assert G.shape == (2, 1, 6, 6) and rel(G, numpy_gram(X, w)) < 1e-7
    Z = weighted_gram(X, torch.zeros(2, 20), backend="torch")
    assert not bool(Z.any())


@pytest.mark.parametrize("bad, match", [
    (lambda X, w: (X[0], w), "X must be"),
    (lambda X, w: (X, w[:, :-1]), "w must be"),
    (lambda X, w: (X, torch.where(w > 0, w, torch.nan)), "NaN"),
])
def test_bad_input_raises(bad, match):
    X, w = make(2, 10, 4, 2, seed=1)
    with pytest.raises(StatsError, match=match):
        weighted_gram(*bad(X, w), backend="torch")
    with pytest.raises(StatsError, match="out must be"):
        weighted_gram(X, w, backend="torch", out=torch.zeros(2, 2, 4, 5))


_TRITON = r"""
import json, sys, torch
from probes.kernels import weighted_gram
from probes.kernels.triton import weighted
shapes = json.loads(sys.argv[1])
res = []
for B, n, d, M, dt in shapes:
    g = torch.Generator().manual_seed(n + d)
    X = (torch.randn(B, n, d, generator=g) * 2 + 1).to(getattr(torch, dt))
    w = torch.rand(M, n, generator=g, dtype=torch.float64) * 40 - 10
    want = weighted_gram(X, w, backend="torch", out=torch.zeros(B, M, d, d, dtype=torch.float64))
    G = weighted_gram(X, w, backend="triton")
    out = torch.ones(B, M, d, d, dtype=torch.float64)
    weighted.weighted_gram(X[:, 1:], w[:, 1:], out=out)
    weighted.weighted_gram(X[:, :1], w[:, :1], out=out)
    e = lambda a, b: float((a.double() - b).norm() / b.norm())
    res.append([e(G, want), e(out - 1, want), bool(torch.equal(G, G.mT)),
                bool(torch.equal(out, out.mT)), G.dtype == torch.float32])
print(json.dumps(res))
"""


def test_triton_interpreter_matches_reference():
    pytest.importorskip("triton")
    # a subprocess: TRITON_INTERPRET is read when the kernels are defined (as in the other
    # Triton tests' modules), and the compile tests need this process without it
    shapes = [[2, 37, 19, 3, "float16"], [1, 5, 33, 2, "float16"], [2, 23, 18, 2, "float32"],
              [1, 1, 7, 4, "float16"]]
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", _TRITON, json.dumps(shapes)], capture_output=True,
                       text=True, env=env, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    for shape, (e_one, e_acc, sym, sym_acc, f32) in zip(shapes, results):
        assert e_one < 1e-5 and e_acc < 1e-5 and sym and sym_acc and f32, (shape, e_one, e_acc)


def test_cuda_module_has_weighted_gram_where_built():
    if shutil.which("nvcc") is None and ck._ext is None:
        pytest.skip("no nvcc on this machine: the CUDA module is not built here")
    if ck._ext is None:
        pytest.skip(f"probes._C_cuda is not built in this environment: {ck._IMPORT_ERROR}")
    assert "weighted_gram" not in ck.missing_ops()


def test_cuda_kernel_compiles_for_hopper():
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("no nvcc on this machine")
    src = REPO / "csrc" / "probes" / "cuda" / "stats_kernels.cu"
    r = subprocess.run([nvcc, "-std=c++17", "-O3", "-arch=sm_90", "-Xptxas", "-v",
                        "--use_fast_math", "-c", str(src), "-o", os.devnull],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "wgram_kernel" in r.stderr and " 0 bytes spill stores" in r.stderr


_COMPILE = r"""
import json
from bench.gpu_compile_check import WGRAM_SIG, compile_for
from probes.kernels.triton import weighted
out = {}
for xt, cfg, split in (("fp16", weighted.WEIGHTED_CONFIGS[0], True),
                       ("bf16", weighted.WEIGHTED_CONFIGS[0], True),
                       ("fp32", weighted.F32_CONFIG, False)):
    bm, bn, br, warps, stages = cfg
    out[xt] = compile_for(weighted._wgram_kernel, dict(WGRAM_SIG, X="*" + xt),
                          {"BM": bm, "BN": bn, "BLOCK_R": br, "SPLIT": split, "ACC": False},
                          warps, stages)[1]
print(json.dumps(out))
"""


def test_triton_kernel_compiles_for_hopper_tensor_cores_without_spills():
    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("this Triton wheel has no cuobjdump to read the compiled kernels")
    # compiled for sm_90 ahead of time, in a process without TRITON_INTERPRET
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _COMPILE], capture_output=True, text=True,
                       env=env, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    for xt in ("fp16", "bf16"):
        assert res[xt]["mma"] == "HGMMA", (xt, res[xt])
    for xt, rr in res.items():
        assert rr["LDL"] == 0 and rr["STL"] == 0 and rr["stack"] == 0, f"{xt} spills: {rr}"


@gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_matches_reference(dtype, backend):
    if backend == "cuda" and dtype != torch.float16:
        pytest.skip("the cuda backend takes float16 activations")
    # odd d (scalar loads), d % 8 == 0 (16-byte loads), d > n, several tiles; few shapes, as
    # each Triton specialisation compiles once
    for shape in [(2, 37, 19, 3), (2, 1000, 300, 5), (1, 777, 129, 3), (1, 300, 1024, 2)]:
        _check_gpu(shape, dtype, backend)


def _check_gpu(shape, dtype, backend):
    X, w = make(*shape, seed=sum(shape))
    X = X.float().to(dtype)
    want = reference.weighted_gram(X, w, out=torch.zeros(
        shape[0], shape[3], shape[2], shape[2], dtype=torch.float64))
    G = weighted_gram(X.cuda(), w.cuda(), backend=backend)
    assert G.dtype == torch.float32 and G.is_cuda and symmetric(G)
    assert rel(G, want) < (1e-4 if dtype == torch.bfloat16 else 1e-5), shape
    out = torch.ones_like(want).cuda()
    Xc, wc = X.cuda(), w.cuda()                # strided rows, added into a float64 out
    weighted_gram(Xc[:, ::2], wc[:, ::2], backend=backend, out=out)
    weighted_gram(Xc[:, 1::2], wc[:, 1::2], backend=backend, out=out)
    assert rel(out - 1, want) < 1e-4 and symmetric(out), shape


@gpu
def test_gpu_auto_picks_a_gpu_backend_and_huge_weights_do_not_overflow():
    X, w = make(2, 500, 64, 2, seed=2)
    w[0] *= 1e6          # x·w far beyond float16's range before the power-of-two scaling
    want = reference.weighted_gram(X, w, out=torch.zeros(2, 2, 64, 64, dtype=torch.float64))
    G = weighted_gram(X.cuda(), w.cuda())
    assert torch.isfinite(G).all() and rel(G, want) < 1e-5


def test_cpu_on_place_features_with_irls_weights():
    """Real rows (world_place.csv): lat/lon, log page views and entity-type indicators,
    randomly projected to d = 48 per layer plus noise, in float16; the weight sets are the
    IRLS weights p(1 - p) of a logistic model and the balanced class weights of "is in the
    United States" (the integrator's two kinds of row weights)."""
    pd = pytest.importorskip("pandas")
    path = Path("/work/shared/datasets/paper/world_place.csv")
    if not path.exists():
        pytest.skip(f"{path} is not on this machine")
    df = pd.read_csv(path, nrows=3000)
    num = np.c_[df["latitude"], df["longitude"], np.log1p(df["page_views"].fillna(0))]
    feats = np.c_[num, pd.get_dummies(df["entity_type"]).to_numpy(float)]
    rng = np.random.default_rng(0)
    X = np.stack([feats @ rng.normal(size=(feats.shape[1], 48)) / 10
                  + rng.normal(size=(len(df), 48)) for _ in range(2)]).astype(np.float16)
    y = (df["country"] == "United_States").to_numpy()
    p = 1 / (1 + np.exp(-(X[0].astype(np.float64) @ rng.normal(size=48) / 20)))
    balanced = np.where(y, len(y) / (2 * y.sum()), len(y) / (2 * (~y).sum()))
    w = np.stack([p * (1 - p), balanced])
    want = numpy_gram(torch.from_numpy(X), torch.from_numpy(w))
    assert rel(weighted_gram(X, w, backend="torch"), want) < 1e-7
    if "cpu" in available_backends():
        G = weighted_gram(X, w, backend="cpu")
        assert rel(G, want) < 1e-5 and symmetric(G)
