// bf16 linear layers on AVX-512 BF16 CPUs: y[M,N] = x[M,K] @ W[N,K]^T (+ bias), fp32 accumulation.
//
// W is packed once into tiles of 16 output columns, each tile [K/2][16][2]: a k-pair of 16 columns is one
// zmm, the operand layout of vdpbf16ps. A tile is read front to back, prefetched a few KB ahead, so the
// weight stream from memory overlaps the dot products (oneDNN's packed kernel leaves most of it exposed
// at 1-16 rows). x is first rearranged into k-pairs of 16 rows, so one 64-byte line feeds 16 dot products.
// The loops: tiles in parallel (OpenMP), then blocks of K small enough for L1, then chunks of 16 rows,
// each a 16x16 block of accumulators in registers.
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <vector>

namespace {

constexpr int64_t kTile = 16;        // output columns per tile: one zmm of fp32
constexpr int64_t kRows = 16;        // rows per chunk: 16 accumulators
constexpr int64_t kBlockPairs = 256; // k-pairs per K block: 16 KB of weights and 16 KB of x
constexpr int64_t kPrefetch = 128;   // k-pairs ahead (8 KB), into L2

template <int M>
inline void block(const int32_t* xt, const uint16_t* w, int64_t pairs, __m512* acc) {
    for (int64_t k = 0; k < pairs; ++k) {
        const __m512bh wv = (__m512bh)_mm512_loadu_si512((const void*)(w + k * 2 * kTile));
        _mm_prefetch((const char*)(w + (k + kPrefetch) * 2 * kTile), _MM_HINT_T1);
        const int32_t* xk = xt + k * kRows;
#pragma GCC unroll 16
        for (int m = 0; m < M; ++m) acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)_mm512_set1_epi32(xk[m]), wv);
    }
}

// One chunk of up to 16 rows over one K block of one tile: accumulators start from the bias (first block)
// or the partial sums, and end in y as bf16 (last block) or back in the partial sums.
template <int M>
void chunk(const int32_t* xt, const uint16_t* w, int64_t pairs, bool first, bool last, const float* bias,
           float* part, uint16_t* y, int64_t ldy, __mmask16 cols) {
    __m512 acc[M];
    for (int m = 0; m < M; ++m)
        acc[m] = !first ? _mm512_loadu_ps(part + m * kTile) : bias ? _mm512_maskz_loadu_ps(cols, bias) : _mm512_setzero_ps();
    block<M>(xt, w, pairs, acc);
    for (int m = 0; m < M; ++m) {
        if (last)
            _mm256_mask_storeu_epi16(y + m * ldy, cols, (__m256i)_mm512_cvtneps_pbh(acc[m]));
        else
            _mm512_storeu_ps(part + m * kTile, acc[m]);
    }
}

using chunk_fn = void (*)(const int32_t*, const uint16_t*, int64_t, bool, bool, const float*, float*, uint16_t*,
                          int64_t, __mmask16);
const chunk_fn kChunks[kRows + 1] = {nullptr,    chunk<1>,  chunk<2>,  chunk<3>,  chunk<4>,  chunk<5>,
                                     chunk<6>,   chunk<7>,  chunk<8>,  chunk<9>,  chunk<10>, chunk<11>,
                                     chunk<12>,  chunk<13>, chunk<14>, chunk<15>, chunk<16>};

}  // namespace

extern "C" {

// Packed size in bf16 elements: N rounded up to 16 columns, K up to an even count.
int64_t tandem_gemm_packed_numel(int64_t n, int64_t k) { return (n + kTile - 1) / kTile * kTile * ((k + 1) / 2 * 2); }

void tandem_gemm_pack(const uint16_t* w, int64_t n, int64_t k, uint16_t* out) {
    const int64_t tiles = (n + kTile - 1) / kTile, pairs = (k + 1) / 2;
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
        uint16_t* dst = out + t * pairs * 2 * kTile;
        for (int64_t p = 0; p < pairs; ++p)
            for (int64_t c = 0; c < kTile; ++c)
                for (int64_t j = 0; j < 2; ++j) {
                    const int64_t row = t * kTile + c, col = 2 * p + j;
                    dst[(p * kTile + c) * 2 + j] = row < n && col < k ? w[row * k + col] : 0;
                }
    }
}

// x: [M, K] bf16, rows `ldx` apart; y: [M, N] bf16, contiguous; bias: N fp32 or null.
void tandem_gemm(const uint16_t* x, int64_t ldx, int64_t m, int64_t k, const uint16_t* w, int64_t n,
                 const float* bias, uint16_t* y, int threads) {
    const int64_t tiles = (n + kTile - 1) / kTile, pairs = (k + 1) / 2, chunks = (m + kRows - 1) / kRows;
    thread_local std::vector<int32_t> xt_buf;
    xt_buf.assign(chunks * pairs * kRows, 0);
    int32_t* xt = xt_buf.data();
    for (int64_t r = 0; r < m; ++r) {
        const uint16_t* row = x + r * ldx;
        int32_t* dst = xt + (r / kRows) * pairs * kRows + r % kRows;
        for (int64_t p = 0; p < k / 2; ++p) memcpy(dst + p * kRows, row + 2 * p, 4);
        if (k % 2) dst[(pairs - 1) * kRows] = row[k - 1];
    }
    const int64_t blocks = (pairs + kBlockPairs - 1) / kBlockPairs;
#pragma omp parallel num_threads(threads)
    {
        std::vector<float> part(blocks > 1 ? chunks * kRows * kTile : 0);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles; ++t) {
            const int64_t c0 = t * kTile;
            const __mmask16 cols = n - c0 >= kTile ? 0xFFFF : (__mmask16)((1u << (n - c0)) - 1);
            const uint16_t* wt = w + t * pairs * 2 * kTile;
            for (int64_t b = 0; b < blocks; ++b) {
                const int64_t p0 = b * kBlockPairs, np = pairs - p0 < kBlockPairs ? pairs - p0 : kBlockPairs;
                for (int64_t c = 0; c < chunks; ++c) {
                    const int64_t rows = m - c * kRows < kRows ? m - c * kRows : kRows;
                    kChunks[rows](xt + (c * pairs + p0) * kRows, wt + p0 * 2 * kTile, np, b == 0, b == blocks - 1,
                                  bias ? bias + c0 : nullptr, part.data() + c * kRows * kTile,
                                  y + c * kRows * n + c0, n, cols);
                }
            }
        }
    }
}

}  // extern "C"
