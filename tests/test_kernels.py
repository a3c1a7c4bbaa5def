"""Each Triton kernel against its plain-torch reference (Triton's interpreter on CPU; bf16 runs on the GPU)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from tandem_kernels import reference as ref  # noqa: E402
from tandem_kernels.triton_decode import decode_attention  # noqa: E402
from tandem_kernels.triton_extend import extend_attention  # noqa: E402
from tandem_kernels.triton_act import ACTS, act_mul  # noqa: E402
from tandem_kernels.triton_kv import rope_store_kv, store_kv  # noqa: E402
from tandem_kernels.triton_norm_rope import add_rmsnorm, rotary_  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])
TOL = {torch.float32: 2e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}
PAGE = 16


def _paged_cache(lengths, kv_heads, d, dtype, seed=0):
    """Random K/V caches with each sequence's pages scattered over the pool in shuffled order."""
    g = torch.Generator().manual_seed(seed)
    pages = [-(-n // PAGE) for n in lengths]
    total = sum(pages) + 3
    order = torch.randperm(total, generator=g).tolist()
    tables = torch.zeros((len(lengths), max(pages)), dtype=torch.int32)
    for i, p in enumerate(pages):
        tables[i, :p] = torch.tensor([order.pop() for _ in range(p)], dtype=torch.int32)
    k = torch.randn(total, PAGE, kv_heads, d, generator=g).to(dtype)
    v = torch.randn(total, PAGE, kv_heads, d, generator=g).to(dtype)
    return k.to(DEV), v.to(DEV), tables.to(DEV)


CASES = [  # (lengths, kv_heads, group, head_dim)
    ([1, 15, 16, 17, 40], 2, 1, 64),
    ([33, 5], 2, 2, 128),
    ([64, 1, 31], 1, 4, 64),
    ([20, 48], 2, 7, 64),
    ([17, 9], 1, 2, 256),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lengths,kv_heads,group,d", CASES)
@pytest.mark.parametrize("splits", [1, 3])
def test_decode_attention(dtype, lengths, kv_heads, group, d, splits):
    k, v, tables = _paged_cache(lengths, kv_heads, d, dtype)
    q = torch.randn(len(lengths), kv_heads * group, d).to(dtype).to(DEV)
    lens = torch.tensor(lengths, dtype=torch.int32, device=DEV)
    out = decode_attention(q, k, v, tables, lens, d**-0.5, num_splits=splits)
    want = ref.decode_attention_ref(q, k, v, tables, lens, d**-0.5)
    torch.testing.assert_close(out.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("splits", [4, 64])
def test_decode_long_sequences_many_splits(dtype, splits):
    """Splits of at least a tile: a short sequence leaves most of them empty."""
    lengths = [7, 150, 300, 700]
    k, v, tables = _paged_cache(lengths, 2, 64, dtype, seed=3)
    q = torch.randn(4, 8, 64).to(dtype).to(DEV)
    lens = torch.tensor(lengths, dtype=torch.int32, device=DEV)
    out = decode_attention(q, k, v, tables, lens, 0.125, num_splits=splits)
    want = ref.decode_attention_ref(q, k, v, tables, lens, 0.125)
    torch.testing.assert_close(out.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES[:2], ids=str)
@pytest.mark.parametrize("window", [1, 8, 20])
def test_decode_attention_sliding_window(dtype, window):
    lengths = [1, 16, 37]
    k, v, tables = _paged_cache(lengths, 2, 64, dtype, seed=1)
    q = torch.randn(3, 4, 64).to(dtype).to(DEV)
    lens = torch.tensor(lengths, dtype=torch.int32, device=DEV)
    out = decode_attention(q, k, v, tables, lens, 0.125, window=window, num_splits=2)
    want = ref.decode_attention_ref(q, k, v, tables, lens, 0.125, window=window)
    torch.testing.assert_close(out.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])


def test_decode_position_tags_and_fully_masked_rows_give_zeros():
    lengths = [20, 20]
    k, v, tables = _paged_cache(lengths, 2, 64, torch.float32, seed=2)
    kv_pos = torch.arange(k.shape[0] * PAGE, dtype=torch.int32, device=DEV).reshape(k.shape[0], PAGE) % 7
    kv_pos[tables[1].long()] = 1000
    q = torch.randn(2, 4, 64, device=DEV)
    lens = torch.tensor(lengths, dtype=torch.int32, device=DEV)
    out = decode_attention(q, k, v, tables, lens, 0.125, num_splits=2, kv_pos=kv_pos)
    want = ref.decode_attention_ref(q, k, v, tables, lens, 0.125, kv_pos=kv_pos)
    assert not out.isnan().any()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(out, want, atol=2e-4, rtol=2e-4)


EXTEND_CASES = [  # (context lengths, new-token counts, kv_heads, group, head_dim)
    ([16, 40, 5], [16, 7, 5], 2, 1, 64),
    ([33, 17], [33, 1], 2, 2, 128),
    ([70], [70], 1, 4, 64),
    ([24, 50], [3, 19], 2, 7, 64),
    ([18], [18], 1, 2, 256),
    ([150, 90], [130, 90], 2, 2, 128),    # past 64 new tokens: the GPU's long-prefill tiles, in each dtype
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lengths,new,kv_heads,group,d", EXTEND_CASES)
def test_extend_attention(dtype, lengths, new, kv_heads, group, d):
    k, v, tables = _paged_cache(lengths, kv_heads, d, dtype, seed=3)
    cu = torch.tensor([0] + torch.tensor(new).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    q = torch.randn(sum(new), kv_heads * group, d).to(dtype).to(DEV)
    lens = torch.tensor(lengths, dtype=torch.int32, device=DEV)
    out = extend_attention(q, k, v, tables, cu, lens, max(new), d**-0.5)
    want = ref.extend_attention_ref(q, k, v, tables, cu, lens, d**-0.5)
    torch.testing.assert_close(out.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("window", [4, 16])
def test_extend_attention_sliding_window_and_position_tags(window):
    lengths = [40, 21]
    k, v, tables = _paged_cache(lengths, 2, 64, torch.float32, seed=4)
    cu = torch.tensor([0, 40, 46], dtype=torch.int32, device=DEV)
    q = torch.randn(46, 4, 64, device=DEV)
    lens = torch.tensor(lengths, dtype=torch.int32, device=DEV)
    out = extend_attention(q, k, v, tables, cu, lens, 40, 0.125, window=window)
    torch.testing.assert_close(out, ref.extend_attention_ref(q, k, v, tables, cu, lens, 0.125, window=window),
                               atol=2e-4, rtol=2e-4)
    kv_pos = torch.randint(0, 45, (k.shape[0], PAGE), dtype=torch.int32, device=DEV)
    out = extend_attention(q, k, v, tables, cu, lens, 40, 0.125, kv_pos=kv_pos)
    want = ref.extend_attention_ref(q, k, v, tables, cu, lens, 0.125, kv_pos=kv_pos)
    assert not out.isnan().any()
    torch.testing.assert_close(out, want, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kv_heads,d", [(2, 64), (1, 256), (7, 128)])
def test_store_kv_with_padding_slots(dtype, kv_heads, d):
    kc = torch.zeros(4, PAGE, kv_heads, d, dtype=dtype, device=DEV)
    vc = torch.zeros_like(kc)
    fused = torch.randn(6, 3 * kv_heads * d).to(dtype).to(DEV)
    k = fused[:, : kv_heads * d].view(6, kv_heads, d)
    v = fused[:, kv_heads * d : 2 * kv_heads * d].view(6, kv_heads, d)
    slots = torch.tensor([3, 17, -1, 63, 0, 40], device=DEV)
    store_kv(kc, vc, k, v, slots)
    kr, vr = torch.zeros_like(kc), torch.zeros_like(vc)
    ref.store_kv_ref(kr, vr, k, v, slots)
    assert torch.equal(kc, kr) and torch.equal(vc, vr)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("offset", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rmsnorm(dtype, offset, with_residual):
    x = torch.randn(5, 96).to(dtype).to(DEV)
    res = torch.randn(5, 96).to(dtype).to(DEV) if with_residual else None
    w = torch.randn(96).to(dtype).to(DEV)
    res_ref = res.clone() if res is not None else None
    y, r = add_rmsnorm(x, res, w, 1e-6, offset)
    y_ref, r_ref = ref.add_rmsnorm_ref(x.clone(), res_ref, w, 1e-6, offset)
    torch.testing.assert_close(y.float(), y_ref.float(), atol=TOL[dtype] * 5, rtol=TOL[dtype] * 5)
    torch.testing.assert_close(r, r_ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [64, 128, 256])
def test_rotary(dtype, d):
    from workers.models.spec import rope_cache

    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    cos, sin = (t.to(dtype).to(DEV) for t in rope_cache(inv, 1.0, 64))
    x = torch.randn(7, 3, d).to(dtype).to(DEV)
    pos = torch.tensor([0, 1, 5, 63, 2, 2, 30], device=DEV)
    got = rotary_(x.clone(), cos, sin, pos)
    want = ref.rotary_ref(x.clone(), cos, sin, pos)
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype] * 5, rtol=TOL[dtype] * 5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads,kv_heads,d", [(2, 2, 64), (4, 2, 128), (7, 1, 256), (14, 2, 64)])
def test_rope_store_kv_is_rotary_then_store(dtype, heads, kv_heads, d):
    from workers.models.spec import rope_cache

    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    cos, sin = (t.to(dtype).to(DEV) for t in rope_cache(inv, 1.0, 80))
    fused = torch.randn(5, (heads + 2 * kv_heads) * d).to(dtype).to(DEV)       # strided rows, as after qkv_proj
    q, k, v = (x.view(5, -1, d) for x in fused.split([heads * d, kv_heads * d, kv_heads * d], dim=-1))
    pos = torch.tensor([0, 17, 79, 3, 3], device=DEV)
    slots = torch.tensor([5, 33, -1, 0, 47], device=DEV)
    kc = torch.zeros(3, PAGE, kv_heads, d, dtype=dtype, device=DEV)
    vc = torch.zeros_like(kc)
    want = [x.clone() for x in (q, k, v, kc, vc)]
    ref.rope_store_kv_ref(*want[:3], cos, sin, pos, want[3], want[4], slots)
    rope_store_kv(q, k, v, cos, sin, pos, kc, vc, slots)
    for got, exp in zip((q, k, v, kc, vc), want):
        torch.testing.assert_close(got.float(), exp.float(), atol=TOL[dtype] * 5, rtol=TOL[dtype] * 5)
    assert torch.equal(vc, want[4])                            # V is copied, never rounded


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", list(ACTS))
@pytest.mark.parametrize("rows,inner", [(1, 96), (3, 1100)])
def test_act_mul(dtype, activation, rows, inner):
    x = (2 * torch.randn(rows, 2 * inner)).to(dtype).to(DEV)
    got = act_mul(x, activation)
    want = ref.act_mul_ref(x, activation)
    assert got.shape == (rows, inner)
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype] * 5, rtol=TOL[dtype] * 5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,k,bias", [(1, 64, False), (37, 96, True), (300, 1100, True), (9, 4864, False)])
def test_gemv_is_linear(dtype, n, k, bias):
    from tandem_kernels.triton_gemv import gemv

    w = (torch.randn(n, k) / k**0.5).to(dtype).to(DEV)
    b = torch.randn(n).to(dtype).to(DEV) if bias else None
    x = torch.randn(1, k).to(dtype).to(DEV)
    got = gemv(x, w, b)
    want = torch.nn.functional.linear(x.float(), w.float(), b.float() if bias else None)
    torch.testing.assert_close(got.float(), want, atol=TOL[dtype] * 10, rtol=TOL[dtype] * 10)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,k,bias,offset,with_residual", [(37, 96, True, False, True), (37, 96, False, True, False),
                                                           (300, 1100, False, False, True), (4100, 896, True, True, True)])
def test_norm_gemv_is_add_rmsnorm_then_linear(dtype, n, k, bias, offset, with_residual):
    from tandem_kernels.triton_gemv import norm_gemv

    w = (torch.randn(n, k) / k**0.5).to(dtype).to(DEV)
    b = torch.randn(n).to(dtype).to(DEV) if bias else None
    nw = (1 + 0.1 * torch.randn(k)).to(dtype).to(DEV)
    x = torch.randn(1, k).to(dtype).to(DEV)
    res = torch.randn(1, k).to(dtype).to(DEV) if with_residual else None
    res_before = res.clone() if with_residual else None
    got, got_res = norm_gemv(x, res, nw, 1e-6, offset, w, b)
    h, want_res = ref.add_rmsnorm_ref(x.clone(), res.clone() if with_residual else None, nw, 1e-6, offset)
    want = torch.nn.functional.linear(h.float(), w.float(), b.float() if bias else None)
    torch.testing.assert_close(got.float(), want, atol=TOL[dtype] * 10, rtol=TOL[dtype] * 10)
    torch.testing.assert_close(got_res, want_res)
    if with_residual:
        assert torch.equal(res, res_before)                      # read only: other programs still read it


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation,n,k,norm", [(a, 37, 96, False) for a in ACTS] + [("silu", 700, 1100, True)])
def test_gated_gemv_is_linear_then_act_mul(dtype, activation, n, k, norm):
    from tandem_kernels.triton_gemv import gemv, norm_gemv

    w = (torch.randn(2 * n, k) / k**0.5).to(dtype).to(DEV)
    x = torch.randn(1, k).to(dtype).to(DEV)
    nw = (1 + 0.1 * torch.randn(k)).to(dtype).to(DEV)
    got = norm_gemv(x, None, nw, 1e-6, False, w, gated=activation)[0] if norm else gemv(x, w, gated=activation)
    h = ref.add_rmsnorm_ref(x.clone(), None, nw, 1e-6)[0] if norm else x
    want = ref.act_mul_ref(torch.nn.functional.linear(h.float(), w.float()).to(dtype), activation)
    assert got.shape == (1, n)
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype] * 10, rtol=TOL[dtype] * 10)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,n,k,chunk", [(3, 1000, 16, 64), (2, 50, 8, 64), (1, 300, 32, 64), (4, 129, 1, 128),
                                            (0, 200, 4, 64)])
def test_top_values_is_topk(dtype, rows, n, k, chunk):
    """Exact, whatever the number of rounds: one chunk (n ≤ chunk) up to three (1000 → 256 → 64 → k)."""
    from tandem_kernels.triton_topk import top_values

    x = torch.randn(rows, n).to(dtype)
    if rows:
        x[0, : n // 2] = torch.randint(-3, 3, (n // 2,)).to(dtype)   # ties
    x = x.to(DEV)
    got = top_values(x, k, chunk=chunk)
    assert got.shape == (rows, k) and got.dtype == torch.float32
    assert torch.equal(got, ref.top_values_ref(x, k))


def test_top_values_reads_a_row_stride():
    from tandem_kernels.triton_topk import top_values

    x = torch.randn(3, 400).to(DEV)[:, :300]
    assert torch.equal(top_values(x, 10, chunk=64), ref.top_values_ref(x, 10))


def test_pdl_is_off_where_the_device_lacks_it():
    from tandem_kernels import pdl

    assert not pdl.use_pdl(torch.zeros(1)) and not pdl.use_pdl(torch.zeros(1), True)
    assert pdl.pdl_launch(False) == {} and pdl.pdl_launch(True) == {"launch_pdl": True}


@pytest.mark.skipif(DEV != "cuda" or torch.cuda.get_device_capability()[0] < 9, reason="PDL needs compute capability 9.0")
def test_pdl_chain_in_a_graph_equals_ordinary_launches(monkeypatch):
    """Each kernel reads the one before it (norm -> GEMV -> rotary + KV store -> decode attention, 6 times):
    a launch that ran ahead of its input would show here."""
    from tandem_kernels import pdl
    from tandem_kernels.triton_gemv import gemv

    heads, kv_heads, d, lengths = 8, 2, 64, [300]
    k, v, tables = _paged_cache(lengths, kv_heads, d, torch.float16, seed=5)
    g = torch.Generator().manual_seed(6)
    w = (torch.randn((heads + 2 * kv_heads) * d, heads * d, generator=g) * 0.05).half().to(DEV)
    norm_w = torch.rand(heads * d, generator=g).half().to(DEV)
    cos, sin = (torch.rand(512, d, generator=g).half().to(DEV) for _ in range(2))
    lens, pos = torch.tensor(lengths, dtype=torch.int32, device=DEV), torch.tensor([299], device=DEV)
    slots = (tables[0, 299 // PAGE].long() * PAGE + 299 % PAGE).view(1)
    x0 = torch.randn(1, heads * d, generator=g).half().to(DEV)

    def body(kc, vc, x):
        for _ in range(6):
            h, _ = add_rmsnorm(x, None, norm_w, 1e-6)
            qkv = gemv(h, w).view(1, heads + 2 * kv_heads, d)
            q, kk, vv = qkv.split([heads, kv_heads, kv_heads], 1)
            rope_store_kv(q, kk, vv, cos, sin, pos, kc, vc, slots)
            x = decode_attention(q, kc, vc, tables, lens, d**-0.5, num_splits=4).reshape(1, heads * d)
        return x

    def chain(enabled):
        monkeypatch.setattr(pdl, "ENABLED", enabled)
        body(k.clone(), v.clone(), x0.clone())   # compiles outside the capture
        kc, vc = k.clone(), v.clone()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            x = body(kc, vc, x0)
        graph.replay()
        torch.cuda.synchronize()
        return x.clone(), kc

    assert all(torch.equal(a, b) for a, b in zip(chain(False), chain(True)))
