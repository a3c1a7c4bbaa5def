"""The bf16 CPU GEMM (tandem_kernels/cpu_gemm.cpp) against its reference, F.linear, and a float64 product:
both must be within bf16 rounding of the exact result, on the shapes that hit its edges (rows 1-16 and
beyond a chunk, columns off the 16-wide tile, odd K, K over one block, strided rows, bias)."""
from __future__ import annotations

import pytest
import torch

from tandem_kernels import cpu_gemm

pytestmark = pytest.mark.skipif(not cpu_gemm.available(), reason="no AVX-512 BF16 CPU or no C++ compiler here")


def _exact(x, w, b):
    y = x.double() @ w.double().T
    return y if b is None else y + b.double()


def _within_bf16_rounding(got: torch.Tensor, exact: torch.Tensor) -> bool:
    # bf16 keeps 8 significant bits: rounding is off by at most half an ulp, 2^-8 relative; fp32 sums may
    # move a value across a rounding boundary, so allow one ulp, plus fp32's own error near zero.
    slack = 2.0**-7 * exact.abs() + 1e-5 * exact.abs().max()
    return bool(((got.double() - exact).abs() <= slack).all())


@pytest.mark.parametrize("rows", [1, 2, 7, 16, 17, 40])
@pytest.mark.parametrize("n,k", [(64, 64), (1000, 96), (35, 33), (48, 1030)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemm_within_bf16_rounding_of_exact(rows, n, k, bias):
    torch.manual_seed(rows * 1000 + n + k)
    w = torch.randn(n, k, dtype=torch.bfloat16)
    x = torch.randn(rows, k, dtype=torch.bfloat16)
    b = torch.randn(n, dtype=torch.bfloat16) if bias else None
    got = cpu_gemm.linear(x, cpu_gemm.pack(w), n, None if b is None else b.float())
    exact = _exact(x, w, b)
    assert got.shape == (rows, n) and got.dtype == torch.bfloat16
    assert _within_bf16_rounding(got, exact)
    assert _within_bf16_rounding(cpu_gemm.linear_ref(x, w, b), exact)
    # and it is F.linear to the last bit nearly everywhere
    assert (got != cpu_gemm.linear_ref(x, w, b)).float().mean() < 0.02


def test_strided_rows_leading_dims_and_empty():
    torch.manual_seed(1)
    w = torch.randn(80, 64, dtype=torch.bfloat16)
    packed = cpu_gemm.pack(w)
    wide = torch.randn(3, 5, 128, dtype=torch.bfloat16)
    x = wide[..., 32:96]                       # rows 128 apart, not contiguous
    got = cpu_gemm.linear(x, packed, 80)
    assert got.shape == (3, 5, 80)
    assert torch.equal(got, cpu_gemm.linear(x.contiguous(), packed, 80))
    assert _within_bf16_rounding(got, _exact(x, w, None))
    assert cpu_gemm.linear(torch.empty(0, 64, dtype=torch.bfloat16), packed, 80).shape == (0, 80)


def test_pack_into_by_row_chunks_equals_whole():
    torch.manual_seed(2)
    w = torch.randn(100, 48, dtype=torch.bfloat16)
    whole = cpu_gemm.pack(w)
    chunked = torch.full_like(whole, 7.0)
    for start in (0, 32, 64, 96):
        cpu_gemm.pack_into(w[start:start + 32], chunked, start)
    assert torch.equal(whole, chunked)


def test_threads_follow_torch(monkeypatch):
    torch.manual_seed(3)
    w = torch.randn(512, 256, dtype=torch.bfloat16)
    x = torch.randn(16, 256, dtype=torch.bfloat16)
    packed = cpu_gemm.pack(w)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_gemm.linear(x, packed, 512)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, cpu_gemm.linear(x, packed, 512))


def _probe(env: dict) -> str:
    import os
    import subprocess
    import sys

    code = ("import torch, logging; logging.basicConfig(); from workers.models.packed_linear import PackedLinear;"
            "print(PackedLinear.from_linear(torch.nn.Linear(32, 48, dtype=torch.bfloat16), shared=True).kernel)")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip() + "|" + out.stderr


def test_switched_off_or_unbuildable_falls_back_to_onednn(tmp_path):
    assert _probe({"TANDEM_CPU_GEMM": "0"}).startswith("onednn|")
    failed = _probe({"CXX": "false", "TANDEM_HOME": str(tmp_path)})     # a compiler that always fails
    assert failed.startswith("onednn|") and "did not build" in failed
    assert _probe({"TANDEM_HOME": str(tmp_path)}).startswith("tiles|")
    assert list((tmp_path / "build").glob("cpu_gemm-*.so"))
