// Sparse weight times dense activations on the CPU: Y[T, out] = X[T, in] W^T + b.
//
// Every weight layout (CSR, BSR, n:m, n:m:g) is packed into one kernel
// format, "panel CSR": the input dimension is cut into panels of 128 columns
// and, panel by panel, each output row lists its non-zeros as (uint8 column
// offset inside the panel, fp32 value). Indices cost one byte per non-zero
// and a panel of activations stays in L1 while every row streams its values.
//
// Many tokens: each tile of 64 tokens is packed transposed by the thread that
// works on it; a block of 128 rows, panel by panel (128 x 64 floats = 32 KB of
// activations, L1-resident), two rows at a time, broadcasts each non-zero and
// multiplies it into 2 x 4 vector accumulators (vectorised along tokens). Few
// tokens: the panel's activations are held in registers and picked for each 16
// non-zeros with permutes; n:m weights have their own few-token kernel
// (sp_nm_matvec_f32) that selects activations with in-register permutes.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#include <unistd.h>
#include "pool.h"
#include "vec.h"

namespace {

constexpr int64_t KP = 128;  // panel width (uint8 offsets)
constexpr int64_t TB = 64;   // token tile

#if defined(__AVX512F__)
// In-register transpose of a 16 x 16 block: r[i][c] -> r[c][i].
inline void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 8; ++i) {  // per 128-bit lane l: rows 2i, 2i+1 interleaved at columns 4l..4l+3
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; ++i) {  // s[4i + j], lane l: column 4l + j of rows 4i..4i+3
        r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int j = 0; j < 4; ++j) {  // 4 x 4 transpose of 128-bit lanes
        const __m512 p = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88), q = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xdd);
        const __m512 u = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88),
                     v = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xdd);
        t[j] = _mm512_shuffle_f32x4(p, u, 0x88);       // column j
        t[8 + j] = _mm512_shuffle_f32x4(p, u, 0xdd);   // column 8 + j
        t[4 + j] = _mm512_shuffle_f32x4(q, v, 0x88);   // column 4 + j
        t[12 + j] = _mm512_shuffle_f32x4(q, v, 0xdd);  // column 12 + j
    }
    for (int c = 0; c < 16; ++c) r[c] = t[c];
}
#endif

#if defined(__AVX2__) && !defined(__AVX512F__)
// In-register transpose of an 8 x 8 block: r[i][c] -> r[c][i].
inline void transpose8(__m256 r[8]) {
    __m256 t[8], u[8];
    for (int i = 0; i < 4; ++i) {  // per 128-bit lane: rows 2i, 2i+1 interleaved
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; ++i) {  // per lane l: column 4l + j of rows 4i..4i+3 in u[4i + j]
        u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int j = 0; j < 4; ++j) {  // join the lanes: column j from the low lanes, 4 + j from the high ones
        r[j] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x20);
        r[4 + j] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x31);
    }
}

// RW rows x 16 tokens of one BSR tile (AVX2 many-token kernel): 2 RW accumulators, 2 activation vectors and a
// broadcast per step, BLIS's Haswell sgemm shape (6 x 16 fills 15 of the 16 ymm registers). tv: the tile's
// first row (row stride bc); xc: the tile's packed activations [bc][64] at this token group; o: the rows'
// outputs (row stride 64, L1) at this token group. One tile per call: a loop over several tiles inside (the
// AVX-512 kernel's grouping) ran 5-17% slower (Xeon, avx2 build, 768 <-> 3072, 128 / 1024 tokens).
template <int RW>
inline void bsr_rows16(const float* tv, int64_t bc, const float* xc, float* o, bool first) {
    __m256 c[RW][2];
#pragma GCC unroll 8
    for (int q = 0; q < RW; ++q)
        for (int h = 0; h < 2; ++h) c[q][h] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(o + q * TB + 8 * h);
    for (int64_t k = 0; k < bc; ++k) {
        const __m256 x0 = _mm256_loadu_ps(xc + k * TB), x1 = _mm256_loadu_ps(xc + k * TB + 8);
#pragma GCC unroll 8
        for (int q = 0; q < RW; ++q) {
            const __m256 v = _mm256_broadcast_ss(tv + q * bc + k);
            c[q][0] = _mm256_fmadd_ps(v, x0, c[q][0]);
            c[q][1] = _mm256_fmadd_ps(v, x1, c[q][1]);
        }
    }
#pragma GCC unroll 8
    for (int q = 0; q < RW; ++q)
        for (int h = 0; h < 2; ++h) _mm256_storeu_ps(o + q * TB + 8 * h, c[q][h]);
}
#endif

#if defined(__AVX512F__)
// RW rows x 64 tokens of nb consecutive tiles of one BSR block row (many-token kernel): the RW x 4
// outputs in registers across the tiles' bc steps each, each step 4 activation vectors, RW broadcasts,
// 4 RW multiply-adds. val, col: the weight's tiles [nnzb, br, bc] and block columns; b: the first tile;
// r0: the first row inside the tiles; xtile: the packed token tile [columns][64] from block column c0;
// o: the rows' outputs [RW][64] (L1), set (first) or added to.
// Measured on a 2-core Xeon (Emerald Rapids), in L1: four rows 73-99 GFLOP/s, six 94-102, eight rows
// x 48 tokens 96-117, twelve x 32 54-60: broadcasts cost more than vector loads here.
template <int RW>
inline void bsr_rows64(const float* val, const int32_t* col, int64_t b, int64_t nb, int64_t br, int64_t bc,
                       int64_t r0, const float* xtile, int64_t c0, float* o, bool first) {
    __m512 c[RW][4];
#pragma GCC unroll 8
    for (int q = 0; q < RW; ++q)
        for (int h = 0; h < 4; ++h) c[q][h] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(o + q * TB + 16 * h);
    for (int64_t j = b; j < b + nb; ++j) {
        const float* tv = val + j * br * bc + r0 * bc;
        const float* xc = xtile + ((int64_t)col[j] - c0) * bc * TB;
        for (int64_t k = 0; k < bc; ++k) {
            const float* xp = xc + k * TB;
            const __m512 x0 = _mm512_loadu_ps(xp), x1 = _mm512_loadu_ps(xp + 16), x2 = _mm512_loadu_ps(xp + 32),
                         x3 = _mm512_loadu_ps(xp + 48);
#pragma GCC unroll 8
            for (int q = 0; q < RW; ++q) {
                const __m512 v = _mm512_set1_ps(tv[q * bc + k]);
                c[q][0] = _mm512_fmadd_ps(v, x0, c[q][0]);
                c[q][1] = _mm512_fmadd_ps(v, x1, c[q][1]);
                c[q][2] = _mm512_fmadd_ps(v, x2, c[q][2]);
                c[q][3] = _mm512_fmadd_ps(v, x3, c[q][3]);
            }
        }
    }
#pragma GCC unroll 8
    for (int q = 0; q < RW; ++q)
        for (int h = 0; h < 4; ++h) _mm512_storeu_ps(o + q * TB + 16 * h, c[q][h]);
}
#endif

// The L2 cache's size (sysconf's, 512 KB when it does not say), read once.
inline int64_t l2_bytes() {
    static const int64_t l2 = [] {
        const long v = sysconf(_SC_LEVEL2_CACHE_SIZE);
        return v > 0 ? (int64_t)v : (int64_t)512 << 10;
    }();
    return l2;
}

#if defined(__AVX512F__) || defined(__AVX2__)
// The L1 data cache's size (sysconf's, 32 KB when it does not say), read once.
inline int64_t l1d_bytes() {
    static const int64_t l1d = [] {
        const long v = sysconf(_SC_LEVEL1_DCACHE_SIZE);
        return v > 0 ? (int64_t)v : (int64_t)32 << 10;
    }();
    return l1d;
}

int g_tile_group = 0;  // sp_bsr_set_tile_group: tiles per pass of bsr_rows64 and bsrt_rows (0: automatic)
int g_output_prefetch = -1;  // sp_bsr_set_output_prefetch: bsrt_rows' output prefetch (-1: automatic)

// Tiles per pass of bsrt_rows (g_tile_group overrides it: tests, A/B): as many 16-row tile slices (16 x bc
// floats) as fill a third of the L1 data cache (16 of 16 x 16 on the Xeon's 48 KB), kept there for the token
// groups after the first. Measured (768 <-> 3072, 128 / 1024 tokens): AVX-512 8 and 16 tiles within noise of
// each other, 32 3-8% slower; AVX2 16 tiles the fastest of 2 / 4 / 8 / 16 at 50% (2: 10-17% slower).
inline int64_t bsrt_tile_chunk(int64_t bc) {
    if (g_tile_group > 0) return g_tile_group;
    return std::max<int64_t>(1, l1d_bytes() / 3 / (16 * bc * (int64_t)sizeof(float)));
}

// Block rows per work item of the few-token BSR kernels (sp_bsr_matvec_f32, sp_bsrt_matvec_f32): runs of
// consecutive block rows, so each thread streams long runs of contiguous tiles, which the hardware prefetchers
// follow (an item per block row started a new stream every few KB). Xeon EMR, 768->3072, 1 token: 0.90 ->
// 1.05x dense at 50%, 1.48 -> 1.95x at 90%.
inline int64_t block_row_run(int64_t R, int threads) { return std::max<int64_t>(1, R / (8 * std::max(1, threads))); }

#endif

#if defined(__AVX512F__)
// Column-major BSR tiles (AVX-512 many-token kernel): up to 16 rows r0.. of one block row (rm: the rows
// that exist) for TT tokens, outputs along the vector lanes, tokens broadcast from the packed tile, the
// accumulators stored straight into Y (row stride n_out) with no L1 buffer and no transpose. wt: tiles
// [nnzb, bc, br] (a tile's column k is br contiguous floats); tiles b0..b1-1 of the block row; xt: the
// packed activations of these tokens' group [columns][xs] (pack_block_groups: xs = 24 or 16, from block
// column c0), at the first of these tokens; acc_in: the outputs
// start from Y's values (a later chunk of tiles), else from the bias (null: zero); nt: real tokens (<= TT;
// the pack zero-pads the rest, which are computed and not stored). Per column step one weight vector and TT
// broadcast multiply-adds; the next tile's activations are prefetched a line per step, w_ahead: the weights
// of the tile two ahead too, y_ahead: the output lines (for writing).
// Measured on the Xeon (avx512, `kernel_ab bsr`, 768 <-> 3072, 128 / 1024 tokens, 50 / 75 / 90%) against the
// row-major kernel (bsr_rows64: rows broadcast, tokens along the lanes, outputs through an L1 buffer and
// bsr_write_back's transposes): 1024 tokens 768->3072 1.37 / 2.75 / 5.31x -> 1.58 / 3.09-3.14 / 6.00-6.26x
// dense, 3072->768 1.53 / 2.79 / 5.76x -> 1.53-1.56 / 2.91-3.01 / 6.02-6.10x; 128 tokens 768->3072 +6-12%,
// 3072->768 50% +7-10%, 75 / 90% 4-9% slower. Without the prefetch 3072->768 lost 5-15% at 50%. 16 tokens
// per call ran 5-10% slower than 24 (16 + 1 vector loads per 16 multiply-adds), 28 and 31 no faster than 24.
// In L1 this loop runs at ~138 GFLOP/s per core against ~156 for bsr_rows64's (one broadcast load per
// multiply-add against ten loads per 24): the orientation trades some arithmetic rate for the write back.
// Tiles of fewer than 16 rows leave lanes empty (8 x 8, 1024 tokens: 0.77x dense against the row-major
// kernel's 1.31x) and 32-row ones lost at one token, so the layout holds 16-row tiles by columns
// (spmm.bsr_tiles_by_columns); any br computes right. AVX2 (bsrt_rows below, 6 tokens x 2 vectors), same
// comparison with AVX2-capped torch, chunks of 16 tiles: 50% within -3 / +4% (1.65-1.78x rows, 1.63-1.73x
// columns at 1024 tokens), 90% +1-17% (1024 tokens 768->3072 5.99 -> 6.82x).
// Where the time beyond the L1 rate went (AVX-512, 768->3072, 1024 tokens, 75%, variants in one process): every
// tile's weights from the same address -11%, activations -16%, no output stores -15%. Prefetching the tile two
// ahead in the first token group and, for outputs larger than L2, the output lines for writing (one per column
// step, so their reads for ownership overlap the multiply-adds; non-temporal stores instead gained as much at
// 75 / 90% but lost 5-13% at 50% and leave the next layer's input out of every cache): 30 rounds, 768->3072 /
// 3072->768, 50 / 75 / 90%: 16 tokens 2.37 / 3.85 / 6.08x -> 2.63 / 4.24 / 6.41x and 2.58 / 3.18 / 6.24x ->
// 3.06 / 4.02 / 6.72x, 1024 tokens 1.50 / 2.77 / 6.15x -> 1.60 / 3.04 / 6.92x and 1.48 / 2.83 / 5.79x -> 1.62 /
// 2.98 / 6.31x; 128 tokens within -1 / +7%. The activations by token groups (pack_block_groups) instead of
// [column][64] (where a call's 24 tokens of a column took two lines of four, the 16 columns of a tile 4 KB
// apart): 16 / 128 / 1024 tokens faster in 16 of 18 configurations (1024 tokens at 50%: 1.77 -> 1.90x and 1.76
// -> 1.90x dense, 75%: 3.42 -> 3.68x and 3.26 -> 3.43x), a second run 10 of 12 (1024 tokens at 50%: 1.62 ->
// 1.65x, 1.51 -> 1.59x).
// BR, BC, XS: the tile's rows, columns and the pack's tokens per column where known when compiling (16, 16,
// 24 / 16: the layout's tiles), 0 for the call's br / bc / xs; WA: w_ahead. Known, a tile's 16 column steps
// unroll into 16 x TT multiply-adds with constant offsets and no branch, so the ports the multiply-adds issue
// on run no loop counter, stride arithmetic or flag tests between them (the runtime loop ran ~20 such uops
// per 24 multiply-adds, some on ports 0 and 5, and reloaded three strides from the stack). The prefetches are
// asm statements: GCC hoisted the intrinsics' 40 prefetches of an unrolled tile into one burst at its start.
// Measured on the Xeon (`kernel_ab bsr`, avx512, 15 rounds, one process, against the runtime loop): faster in
// 22 of 24 configurations (768 <-> 3072, 16 / 128 / 1024 tokens, 0 / 50 / 75 / 90%); every tile kept at 1024
// tokens 0.73 -> 0.86x and 0.88 -> 0.87x dense, 50% 1.48 -> 1.63x and 1.78 -> 1.98x, 75% 2.90 -> 3.21x and
// 2.80 -> 3.12x; with the intrinsics' burst instead: 2.90x and 1.80x at 75% / 50%.
template <int TT, int BR, int BC, int XS, bool WA>
inline void bsrt_rows(const float* wt, const int32_t* col, int64_t b0, int64_t b1, int64_t br, int64_t bc,
                      int64_t r0, __mmask16 rm, const float* xt, int64_t c0, const float* bias, float* y,
                      int64_t n_out, int64_t nt, bool acc_in, bool y_ahead, int64_t xs) {
    const int64_t BRv = BR ? BR : br, BCv = BC ? BC : bc, XSv = XS ? XS : xs;
    __m512 c[TT];
    const __m512 bv = bias ? _mm512_maskz_loadu_ps(rm, bias) : _mm512_setzero_ps();
#pragma GCC unroll 32
    for (int t = 0; t < TT; ++t)
        c[t] = !acc_in ? bv : t < nt ? _mm512_maskz_loadu_ps(rm, y + t * n_out) : _mm512_setzero_ps();
    // One column step: the weight vector, this step's share of the next tile's activation lines (the lines
    // starting in its XS floats) and, WA, of the weight lines of the tile two ahead.
    auto col_step = [&](const float* w, const float* xk, const char* xn, int64_t k) {
        const __m512 wv = _mm512_maskz_loadu_ps(rm, w + k * BRv);
        for (int64_t l = (k * XSv * 4 + 63) / 64; l < ((k + 1) * XSv * 4 + 63) / 64; ++l)
            asm volatile("prefetcht0 %0" ::"m"(*(xn + 64 * l)));
        // The tile two ahead, a line per step (past the block row's last tile: the next block row's, stored
        // after it): the first token group reads the chunk from L2 / L3, the later ones from L1.
        if (WA) asm volatile("prefetcht0 %0" ::"m"(*(const char*)(w + 2 * BRv * BCv + k * BRv)));
#pragma GCC unroll 32
        for (int t = 0; t < TT; ++t) c[t] = _mm512_fmadd_ps(wv, _mm512_set1_ps(xk[t]), c[t]);
    };
    for (int64_t j = b0; j < b1; ++j) {
        const float* w = wt + j * BRv * BCv + r0;
        const float* xc = xt + ((int64_t)col[j] - c0) * BCv * XSv;
        const char* xn = (const char*)(xt + ((int64_t)col[j + 1 < b1 ? j + 1 : j] - c0) * BCv * XSv);
        const int64_t s0 = (j - b0) * BCv;  // column steps before this tile
        if (y_ahead && s0 < nt) {
            // The output lines this call stores, one per step, for writing: their reads for ownership
            // overlap the multiply-adds instead of queueing behind the last one.
            for (int64_t k = 0; k < BCv; ++k) {
                if (s0 + k < nt) asm volatile("prefetchw (%0)" ::"r"(y + (s0 + k) * n_out));
                col_step(w, xc + k * XSv, xn, k);
            }
            continue;
        }
#pragma GCC unroll 16
        for (int64_t k = 0; k < BCv; ++k) col_step(w, xc + k * XSv, xn, k);
    }
#pragma GCC unroll 32
    for (int t = 0; t < TT; ++t)
        if (t < nt) _mm512_mask_storeu_ps(y + t * n_out, rm, c[t]);
}

// bsrt_rows for the call's tile shape: compiled constants for the layout's 16 x 16 tiles.
template <int TT>
inline void bsrt_rows_any(const float* wt, const int32_t* col, int64_t b0, int64_t b1, int64_t br, int64_t bc,
                          int64_t r0, __mmask16 rm, const float* xt, int64_t c0, const float* bias, float* y,
                          int64_t n_out, int64_t nt, bool acc_in, bool w_ahead, bool y_ahead, int64_t xs) {
#define SP_BSRT(BR_, BC_, XS_, WA_) \
    bsrt_rows<TT, BR_, BC_, XS_, WA_>(wt, col, b0, b1, br, bc, r0, rm, xt, c0, bias, y, n_out, nt, acc_in, y_ahead, xs)
    if (br == 16 && bc == 16 && xs == 24) w_ahead ? SP_BSRT(16, 16, 24, true) : SP_BSRT(16, 16, 24, false);
    else if (br == 16 && bc == 16 && xs == 16) w_ahead ? SP_BSRT(16, 16, 16, true) : SP_BSRT(16, 16, 16, false);
    else w_ahead ? SP_BSRT(0, 0, 0, true) : SP_BSRT(0, 0, 0, false);
#undef SP_BSRT
}

// NT tokens (x: the first one's activations, row stride n_in) times up to 16 rows r0.. (rm) of column-major
// tiles b0..b1-1 of one block row, into y (row stride n_out), plus the bias (null: none): each weight vector
// loaded once for all NT tokens, P partial sums per token (independent chains for few tokens), no
// horizontal sums.
template <int NT>
inline void bsrt_vec(const float* wt, const int32_t* col, int64_t b0, int64_t b1, int64_t br, int64_t bc,
                     int64_t r0, __mmask16 rm, const float* x, int64_t n_in, const float* bias, float* y,
                     int64_t n_out) {
    constexpr int P = NT >= 4 ? 1 : NT >= 2 ? 2 : 4;
    __m512 c[NT][P];
    for (int t = 0; t < NT; ++t)
        for (int p = 0; p < P; ++p) c[t][p] = _mm512_setzero_ps();
    for (int64_t j = b0; j < b1; ++j) {
        const int64_t k0 = (int64_t)col[j] * bc, kn = std::min(bc, n_in - k0);  // the last block column: partial
        const float* w = wt + j * br * bc + r0;
        int64_t k = 0;
        for (; k + P <= kn; k += P)
#pragma GCC unroll 4
            for (int p = 0; p < P; ++p) {
                const __m512 wv = _mm512_maskz_loadu_ps(rm, w + (k + p) * br);
#pragma GCC unroll 8
                for (int t = 0; t < NT; ++t)
                    c[t][p] = _mm512_fmadd_ps(wv, _mm512_set1_ps(x[t * n_in + k0 + k + p]), c[t][p]);
            }
        for (; k < kn; ++k) {
            const __m512 wv = _mm512_maskz_loadu_ps(rm, w + k * br);
            for (int t = 0; t < NT; ++t) c[t][0] = _mm512_fmadd_ps(wv, _mm512_set1_ps(x[t * n_in + k0 + k]), c[t][0]);
        }
    }
    const __m512 bv = bias ? _mm512_maskz_loadu_ps(rm, bias) : _mm512_setzero_ps();
    for (int t = 0; t < NT; ++t) {
        __m512 s = bv;
        for (int p = 0; p < P; ++p) s = _mm512_add_ps(s, c[t][p]);
        _mm512_mask_storeu_ps(y + t * n_out, rm, s);
    }
}
#endif

#if defined(__AVX2__) && !defined(__AVX512F__)
// The rows r0..r0+nr-1 (nr <= 16) of a 16-row slice as two 8-float vectors: whole loads where FULL (nr 16).
template <bool FULL>
inline void load16(const float* p, int64_t nr, __m256& a, __m256& b) {
    if (FULL) {
        a = _mm256_loadu_ps(p), b = _mm256_loadu_ps(p + 8);
    } else {
        a = _mm256_maskload_ps(p, sp::mask8(std::min<int64_t>(8, nr)));
        b = _mm256_maskload_ps(p + 8, sp::mask8(std::max<int64_t>(0, nr - 8)));
    }
}
template <bool FULL>
inline void store16(float* p, int64_t nr, __m256 a, __m256 b) {
    if (FULL) {
        _mm256_storeu_ps(p, a), _mm256_storeu_ps(p + 8, b);
    } else {
        _mm256_maskstore_ps(p, sp::mask8(std::min<int64_t>(8, nr)), a);
        _mm256_maskstore_ps(p + 8, sp::mask8(std::max<int64_t>(0, nr - 8)), b);
    }
}

// bsrt_rows for AVX2: up to 16 rows (nr; FULL: 16) x TT tokens in 2 TT accumulators, per column step two
// weight vectors and TT broadcasts (6 tokens: 12 accumulators, BLIS's Haswell sgemm shape turned around).
// BR, BC: the tile's rows and columns where known when compiling (16 x 16: the layout's tiles), 0 for the
// call's br / bc. Known, four column steps unroll with constant offsets (as the AVX-512 kernel's 16; here all
// 16 spilled accumulators, 16 ymm registers: 0.69 -> 0.54x dense with every tile kept), the prefetch an asm
// statement (kept in its step). Measured (`kernel_ab bsr --isa avx2`, AVX2-capped torch, 25 rounds, against
// the runtime loop), 1024 tokens, 768->3072 / 3072->768: 50% 1.63 -> 1.86x and 1.66 -> 1.85x, 75% 2.96 -> 3.31x
// and 3.07 -> 3.47x dense; not unrolled 1.78 / 1.72 / 3.13 / 3.14x, two steps 1.69 / 1.76 / 3.28 / 3.45x.
template <int TT, bool FULL, int BR, int BC>
inline void bsrt_rows(const float* wt, const int32_t* col, int64_t b0, int64_t b1, int64_t br, int64_t bc,
                      int64_t r0, int64_t nr, const float* xt, int64_t c0, const float* bias, float* y,
                      int64_t n_out, int64_t nt, bool acc_in) {
    const int64_t BRv = BR ? BR : br, BCv = BC ? BC : bc;
    __m256 c[TT][2];
    __m256 b0v = _mm256_setzero_ps(), b1v = _mm256_setzero_ps();
    if (bias) load16<FULL>(bias, nr, b0v, b1v);
#pragma GCC unroll 8
    for (int t = 0; t < TT; ++t) {
        c[t][0] = b0v, c[t][1] = b1v;
        if (acc_in) {
            if (t < nt) load16<FULL>(y + t * n_out, nr, c[t][0], c[t][1]);
            else c[t][0] = c[t][1] = _mm256_setzero_ps();
        }
    }
    for (int64_t j = b0; j < b1; ++j) {
        const float* w = wt + j * BRv * BCv + r0;
        const float* xc = xt + ((int64_t)col[j] - c0) * BCv * TB;
        const float* xn = xt + ((int64_t)col[j + 1 < b1 ? j + 1 : j] - c0) * BCv * TB;
#pragma GCC unroll 4
        for (int64_t k = 0; k < BCv; ++k) {
            __m256 w0, w1;
            load16<FULL>(w + k * BRv, nr, w0, w1);
            const float* xk = xc + k * TB;
            asm volatile("prefetcht0 %0" ::"m"(*(const char*)(xn + k * TB)));
#pragma GCC unroll 8
            for (int t = 0; t < TT; ++t) {
                const __m256 xb = _mm256_broadcast_ss(xk + t);
                c[t][0] = _mm256_fmadd_ps(w0, xb, c[t][0]);
                c[t][1] = _mm256_fmadd_ps(w1, xb, c[t][1]);
            }
        }
    }
#pragma GCC unroll 8
    for (int t = 0; t < TT; ++t)
        if (t < nt) store16<FULL>(y + t * n_out, nr, c[t][0], c[t][1]);
}

// bsrt_vec for AVX2: NT (<= 6) tokens x up to 16 rows, P partial sums per token for few tokens.
template <int NT, bool FULL>
inline void bsrt_vec(const float* wt, const int32_t* col, int64_t b0, int64_t b1, int64_t br, int64_t bc,
                     int64_t r0, int64_t nr, const float* x, int64_t n_in, const float* bias, float* y,
                     int64_t n_out) {
    constexpr int P = NT >= 3 ? 1 : NT == 2 ? 2 : 4;
    __m256 c[NT][P][2];
    for (int t = 0; t < NT; ++t)
        for (int p = 0; p < P; ++p) c[t][p][0] = c[t][p][1] = _mm256_setzero_ps();
    for (int64_t j = b0; j < b1; ++j) {
        const int64_t k0 = (int64_t)col[j] * bc, kn = std::min(bc, n_in - k0);  // the last block column: partial
        const float* w = wt + j * br * bc + r0;
        int64_t k = 0;
        for (; k + P <= kn; k += P)
#pragma GCC unroll 4
            for (int p = 0; p < P; ++p) {
                __m256 w0, w1;
                load16<FULL>(w + (k + p) * br, nr, w0, w1);
#pragma GCC unroll 8
                for (int t = 0; t < NT; ++t) {
                    const __m256 xb = _mm256_broadcast_ss(x + t * n_in + k0 + k + p);
                    c[t][p][0] = _mm256_fmadd_ps(w0, xb, c[t][p][0]);
                    c[t][p][1] = _mm256_fmadd_ps(w1, xb, c[t][p][1]);
                }
            }
        for (; k < kn; ++k) {
            __m256 w0, w1;
            load16<FULL>(w + k * br, nr, w0, w1);
            for (int t = 0; t < NT; ++t) {
                const __m256 xb = _mm256_broadcast_ss(x + t * n_in + k0 + k);
                c[t][0][0] = _mm256_fmadd_ps(w0, xb, c[t][0][0]);
                c[t][0][1] = _mm256_fmadd_ps(w1, xb, c[t][0][1]);
            }
        }
    }
    __m256 b0v = _mm256_setzero_ps(), b1v = _mm256_setzero_ps();
    if (bias) load16<FULL>(bias, nr, b0v, b1v);
    for (int t = 0; t < NT; ++t) {
        __m256 s0 = b0v, s1 = b1v;
        for (int p = 0; p < P; ++p) s0 = _mm256_add_ps(s0, c[t][p][0]), s1 = _mm256_add_ps(s1, c[t][p][1]);
        store16<FULL>(y + t * n_out, nr, s0, s1);
    }
}
#endif

// Work items of the many-token kernels: whole token tiles (1 part each) when every thread gets whole ones
// (four tiles per thread, or an even split of full tiles), else each tile's `blocks` row blocks cut into parts,
// about four items per thread in all.
inline int64_t tile_parts(int64_t T, int64_t n_tiles, int64_t blocks, int threads) {
    if (n_tiles >= 4 * threads || (T % TB == 0 && n_tiles % threads == 0)) return 1;
    return std::min(blocks, (4 * threads + n_tiles - 1) / n_tiles);
}

// Which token tile (and input chunk) a thread's pack buffer holds, and for which call (next_call(): one id
// per kernel call): a thread packs only when its item needs another one.
struct HeldPack {
    uint64_t call = 0;
    int64_t tile = -1, chunk = -1;
    // True when the buffer must be packed for (call c, tile t, chunk j); records it as packed.
    bool repack(uint64_t c, int64_t t, int64_t j) {
        if (call == c && tile == t && chunk == j) return false;
        call = c, tile = t, chunk = j;
        return true;
    }
};
inline uint64_t next_call() {
    static std::atomic<uint64_t> calls{0};
    return ++calls;
}

// Columns k0..k0+15 of token tile `tile` of X into dst [16][64] (transposed, zero-padded). Blocks of 16
// columns x 64 tokens read whole cache lines of X and write a 4 KB block, both cache-friendly. With
// `whole` false, a partial last tile is packed only to its tokens rounded up to 16 (what the BSR kernel
// reads of it): 12 tokens of a 3072-wide X wrote 786 KB, mostly zeros, one float at a time.
inline void pack_block(const float* X, int64_t T, int64_t n_in, int64_t tile, int64_t k0, float* dst,
                       bool whole = true) {
    const int64_t t_end = whole ? TB : std::min<int64_t>(TB, (T - tile * TB + 15) / 16 * 16);
    const int64_t kn = std::max<int64_t>(0, std::min<int64_t>(16, n_in - k0));
    int64_t t = 0;
#if defined(__AVX512F__)
    // Full 16 x 16 blocks: 16 row loads, an in-register transpose, 16 stores
    // (the scalar loop below does 256 loads and 256 strided stores).
    if (kn == 16)
        for (; t + 16 <= TB && tile * TB + t + 16 <= T; t += 16) {
            __m512 r[16];
            for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(X + (tile * TB + t + i) * n_in + k0);
            transpose16(r);
            for (int k = 0; k < 16; ++k) _mm512_storeu_ps(dst + k * TB + t, r[k]);
        }
#elif defined(__AVX2__)
    if (kn == 16)  // two 8 x 8 blocks per 8 tokens, as above
        for (; t + 8 <= TB && tile * TB + t + 8 <= T; t += 8)
            for (int half = 0; half < 2; ++half) {
                __m256 r[8];
                for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(X + (tile * TB + t + i) * n_in + k0 + 8 * half);
                transpose8(r);
                for (int k = 0; k < 8; ++k) _mm256_storeu_ps(dst + (8 * half + k) * TB + t, r[k]);
            }
#endif
    for (; t < t_end; ++t) {
        const int64_t tt = tile * TB + t;
        const float* src = X + tt * n_in + k0;
        const int64_t kr = tt < T ? kn : 0;
        for (int64_t k = 0; k < kr; ++k) dst[k * TB + t] = src[k];
        for (int64_t k = kr; k < 16; ++k) dst[k * TB + t] = 0.0f;
    }
}

#if defined(__AVX512F__)
// The column-tile kernel's token groups (bsrt_rows: 24 + 24 + 16 = 64 tokens): token t of a packed tile is
// in group t / 24 (the last one from 48), at offset t - 24 x group.
constexpr int64_t kGroupTokens[3] = {24, 24, 16};
inline int64_t token_group(int64_t t) { return std::min<int64_t>(t / 24, 2); }
// Token t of such a pack (buf, x_cols columns) in column 0 of its group; column k is k x kGroupTokens[group]
// floats on.
template <class F>
inline F* group_token(F* buf, int64_t x_cols, int64_t t) {
    const int64_t g = token_group(t);
    return buf + 24 * g * x_cols + (t - 24 * g);
}

// pack_block's columns k0..k0+15 of token tile `tile` (at column kb of a buffer of x_cols columns) laid out
// by token groups instead of [column][64]: group g holds [x_cols][its tokens] from buf + 24 x g x x_cols,
// so the 24 (16) activations a bsrt_rows call broadcasts per column are contiguous and one tile's are one
// contiguous 1.5 KB (1 KB) run (measured: see bsrt_rows). `whole`: as for pack_block. The AVX2 kernel keeps
// [column][64]: groups of its 6 tokens (10 x 6 + 4) measured within -6 / +10% of it (`kernel_ab bsr --isa
// avx2`, 16 / 128 / 1024 tokens), and 25% slower when the next tile's 7 lines were prefetched in the first 7
// column steps instead of one line per step.
inline void pack_block_groups(const float* X, int64_t T, int64_t n_in, int64_t tile, int64_t k0, int64_t kb,
                              float* buf, int64_t x_cols, bool whole) {
    const int64_t t_end = whole ? TB : std::min<int64_t>(TB, (T - tile * TB + 15) / 16 * 16);
    const int64_t kn = std::max<int64_t>(0, std::min<int64_t>(16, n_in - k0));
    auto at = [&](int64_t k, int64_t t) {  // where column kb + k, token t goes
        return group_token(buf, x_cols, t) + (kb + k) * kGroupTokens[token_group(t)];
    };
    int64_t t = 0;
    if (kn == 16)  // 16 x 16 blocks transposed in registers; the block at token 16 straddles groups 0 and 1
        for (; t + 16 <= TB && tile * TB + t + 16 <= T; t += 16) {
            __m512 r[16];
            for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(X + (tile * TB + t + i) * n_in + k0);
            transpose16(r);
            for (int k = 0; k < 16; ++k) {
                if (t == 16) {
                    _mm256_storeu_ps(at(k, 16), _mm512_castps512_ps256(r[k]));
                    _mm256_storeu_ps(at(k, 24), _mm512_extractf32x8_ps(r[k], 1));
                } else {
                    _mm512_storeu_ps(at(k, t), r[k]);
                }
            }
        }
    for (; t < t_end; ++t) {
        const int64_t tt = tile * TB + t;
        const float* src = X + tt * n_in + k0;
        const int64_t kr = tt < T ? kn : 0;
        for (int64_t k = 0; k < kr; ++k) *at(k, t) = src[k];
        for (int64_t k = kr; k < 16; ++k) *at(k, t) = 0.0f;
    }
}
#endif

#if defined(__AVX512F__) || defined(__AVX2__)
#if defined(__AVX512F__)
// Tiles of a block row each register block runs through at once (bsr_block_row, AVX-512): as many as keep
// their activations (bc x 64 floats each) in two thirds of the L1 data cache (sysconf's size, 32 KB when it
// does not say), the rest left to the weights and the outputs. Measured on the Xeon (48 KB L1d: 8 tiles of
// 16 x 16) against one tile at a time, 768 <-> 3072 at 50 / 75 / 90%, 128 and 1024 tokens, one process:
// +4-9% in 10 of 12 configurations (1024 tokens at 50%: 1.52 -> 1.66x dense), 16 tiles (64 KB of
// activations) lost most of it. g_tile_group overrides it (tests, A/B).
inline int64_t bsr_tile_group(int64_t bc) {
    if (g_tile_group > 0) return g_tile_group;
    return std::max<int64_t>(1, l1d_bytes() * 2 / 3 / (bc * TB * (int64_t)sizeof(float)));
}
#endif

// The packed activations of one token tile the many-token kernels keep per thread: half the L2 cache.
// Wider inputs go in chunks of columns.
inline int64_t tile_budget_bytes() { return l2_bytes() / 2; }
// g_k_chunk overrides the chunk (tests, A/B): block columns for BSR, panels for panel CSR.
int64_t g_k_chunk = 0;
// Block columns per chunk of sp_bsr_matmul_f32: the budget's worth, a multiple of 16 (chunks start on
// pack_block's 16-column blocks).
inline int64_t bsr_k_chunk(int64_t bc) {
    if (g_k_chunk > 0) return std::max<int64_t>(16, g_k_chunk / 16 * 16);
    return std::max<int64_t>(16, tile_budget_bytes() / (bc * TB * (int64_t)sizeof(float)) / 16 * 16);
}
// Panels (KP columns) per chunk of sp_pcsr_matmul_f32's many-token path: the budget's worth.
inline int64_t pcsr_panel_chunk() {
    if (g_k_chunk > 0) return g_k_chunk;
    return std::max<int64_t>(1, tile_budget_bytes() / (KP * TB * (int64_t)sizeof(float)));
}

// Block row rb of a BSR weight (its tiles b0..b1-1: values val [nnzb, br, bc], block columns col) times one
// packed token tile xtile [columns][64] (from block column c0) holding tb real tokens, into out [br][64]
// (L1). The first tile sets the outputs (no zero fill); a block row without tiles is zero. Register blocks:
// six rows while the rest stays a multiple of four (rows [0, six_rows)), then four; AVX-512 64 tokens per
// block (bsr_rows64), AVX2 16 (bsr_rows16). AVX-512: each register block runs over bsr_tile_group tiles at
// a time with its accumulators in registers (loaded and stored once per group instead of once per tile);
// the group's activations (group x bc x 64 floats) stay in L1 for the block's other register blocks.
inline void bsr_block_row(const float* val, const int32_t* col, int64_t b0, int64_t b1, int64_t br, int64_t bc,
                          int64_t six_rows, const float* xtile, int64_t c0, int64_t tb, float* out) {
    if (b0 == b1) {
        std::fill(out, out + br * TB, 0.0f);
        return;
    }
#if defined(__AVX512F__)
    const int64_t group = bsr_tile_group(bc);
    for (int64_t b = b0; b < b1; b += group) {
        const int64_t nb = std::min(group, b1 - b);
        const bool first = b == b0;
        for (int64_t r0 = 0; r0 < br;) {
            float* o = out + r0 * TB;
            if (tb == TB) {
                const bool six = r0 < six_rows;
                if (six)
                    bsr_rows64<6>(val, col, b, nb, br, bc, r0, xtile, c0, o, first);
                else
                    bsr_rows64<4>(val, col, b, nb, br, bc, r0, xtile, c0, o, first);
                r0 += six ? 6 : 4;
                continue;
            }
            // the last, partial token tile: four rows, only the vectors holding tokens
            for (int64_t h = 0; h < (tb + 15) / 16; ++h) {
                __m512 c[4];
                for (int q = 0; q < 4; ++q) c[q] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(o + q * TB + 16 * h);
                for (int64_t j = b; j < b + nb; ++j) {
                    const float* tv = val + j * br * bc + r0 * bc;
                    const float* xc = xtile + ((int64_t)col[j] - c0) * bc * TB + 16 * h;
                    for (int64_t k = 0; k < bc; ++k) {
                        const __m512 x0 = _mm512_loadu_ps(xc + k * TB);
                        for (int q = 0; q < 4; ++q) c[q] = _mm512_fmadd_ps(_mm512_set1_ps(tv[q * bc + k]), x0, c[q]);
                    }
                }
                for (int q = 0; q < 4; ++q) _mm512_storeu_ps(o + q * TB + 16 * h, c[q]);
            }
            r0 += 4;
        }
    }
#else
    for (int64_t b = b0; b < b1; ++b) {
        const float* xc = xtile + ((int64_t)col[b] - c0) * bc * TB;
        const bool first = b == b0;
        for (int64_t r0 = 0; r0 < br;) {
            const float* tv = val + b * br * bc + r0 * bc;  // rows r0.. of this tile
            float* o = out + r0 * TB;
            const bool six = r0 < six_rows;
            for (int64_t g = 0; g < (tb + 15) / 16; ++g) {  // token groups holding real tokens (the pack zero-pads)
                if (six)
                    bsr_rows16<6>(tv, bc, xc + 16 * g, o + 16 * g, first);
                else
                    bsr_rows16<4>(tv, bc, xc + 16 * g, o + 16 * g, first);
            }
            r0 += six ? 6 : 4;
        }
    }
#endif
}

// out [rows][64] (tb real tokens; rows: one or more block rows) plus bias (at the first row's output, or null)
// into y, the first row's output of the tile's first token (row stride n_out), or added to y's values (add):
// token-major through in-register transposes of 16 x 16 (AVX-512) or 8 x 8 (AVX2) blocks (one float at a
// time cost as much as the tiles' multiply-adds at 90% sparsity).
inline void bsr_write_back(const float* out, int64_t rows, int64_t tb, const float* bias, float* y, int64_t n_out,
                           bool add = false) {
    int64_t r = 0;
#if defined(__AVX512F__)
    for (; r + 16 <= rows; r += 16) {
        const __m512 bv = bias ? _mm512_loadu_ps(bias + r) : _mm512_setzero_ps();
        for (int64_t h = 0; h < tb; h += 16) {
            __m512 v[16];
            for (int i = 0; i < 16; ++i) v[i] = _mm512_loadu_ps(out + (r + i) * TB + h);
            transpose16(v);
            const int64_t nt = std::min<int64_t>(16, tb - h);
            for (int64_t i = 0; i < nt; ++i) {
                float* p = y + (h + i) * n_out + r;
                _mm512_storeu_ps(p, _mm512_add_ps(v[i], add ? _mm512_loadu_ps(p) : bv));
            }
        }
    }
#else
    for (; r + 8 <= rows; r += 8) {
        const __m256 bv = bias ? _mm256_loadu_ps(bias + r) : _mm256_setzero_ps();
        for (int64_t h = 0; h < tb; h += 8) {
            __m256 v[8];
            for (int i = 0; i < 8; ++i) v[i] = _mm256_loadu_ps(out + (r + i) * TB + h);
            transpose8(v);
            const int64_t nt = std::min<int64_t>(8, tb - h);
            for (int64_t i = 0; i < nt; ++i) {
                float* p = y + (h + i) * n_out + r;
                _mm256_storeu_ps(p, _mm256_add_ps(v[i], add ? _mm256_loadu_ps(p) : bv));
            }
        }
    }
#endif
    for (int64_t t = 0; r < rows && t < tb; ++t)
        for (int64_t q = r; q < rows; ++q)
            y[t * n_out + q] = out[q * TB + t] + (add ? y[t * n_out + q] : bias ? bias[q] : 0.0f);
}
#endif

}  // namespace

extern "C" {

// rowptr: [n_panels, out + 1] int64 offsets into off/val (absolute); off has
// 16 bytes of padding at its end (vector loads of the last indices).
int sp_pcsr_matmul_f32(const float* X, int64_t T, int64_t n_in, int64_t n_out,
                       const int64_t* rowptr, const uint8_t* off, const float* val,
                       const float* bias, float* Y, int threads) {
    threads = std::max(1, threads);
    const int64_t n_panels = (n_in + KP - 1) / KP;
    // Below this many tokens, the per-token path (each token re-reads the weight) beats the 64-token tiles.
    // Measured on a 2-core Xeon, 768 <-> 3072 at 50 / 90%: AVX-512 at 12 tokens the tiles 0.44-1.77x dense
    // vs 0.40-1.12x (at 8, two of four cases still per token); AVX2 (scalar activation picks) at 6 tokens
    // the tiles 0.27-0.91x vs 0.28-0.74x, at 8-12 tokens 0.26-1.13x vs 0.16-0.62x.
#if defined(__AVX512F__)
    constexpr int64_t kFewTokens = 12;
#elif defined(__AVX2__)
    constexpr int64_t kFewTokens = 6;
#else
    constexpr int64_t kFewTokens = 16;
#endif
    if (T < kFewTokens) {
        // Few tokens: blocks of rows taken dynamically; per token and panel the
        // 128 activations sit in 8 vector registers and each group of 16
        // non-zeros picks its activations with permutes (no gathers).
        const int64_t n_blocks = (n_out + 63) / 64;
        sp::Pool::get().run(n_blocks, threads, [&](int64_t blk, int) {
            const int64_t lo = blk * 64, hi = std::min(n_out, lo + 64);
#if defined(__AVX512F__)
            __m512 acc[64];
            for (int64_t t = 0; t < T; ++t) {
                const float* x = X + t * n_in;
                for (int64_t o = lo; o < hi; ++o) acc[o - lo] = _mm512_setzero_ps();
                for (int64_t p = 0; p < n_panels; ++p) {
                    const int64_t c0 = p * KP, kp = std::min(KP, n_in - c0);
                    __m512 xv[8];
                    for (int q = 0; q < 8; ++q) {
                        const int64_t rem = std::max<int64_t>(0, std::min<int64_t>(16, kp - 16 * q));
                        xv[q] = _mm512_maskz_loadu_ps((__mmask16)((1u << rem) - 1u), x + c0 + 16 * q);
                    }
                    const int64_t* rp = rowptr + p * (n_out + 1);
                    for (int64_t o = lo; o < hi; ++o) {
                        const int64_t b = rp[o], e = rp[o + 1];
                        if (b == e) continue;
                        __m512 a = acc[o - lo];
                        for (int64_t k = b; k < e; k += 16) {
                            const __mmask16 m = (__mmask16)(e - k >= 16 ? 0xffffu : (1u << (e - k)) - 1u);
                            const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(off + k)));
                            const __m512 s01 = _mm512_permutex2var_ps(xv[0], idx, xv[1]);
                            const __m512 s23 = _mm512_permutex2var_ps(xv[2], idx, xv[3]);
                            const __m512 s45 = _mm512_permutex2var_ps(xv[4], idx, xv[5]);
                            const __m512 s67 = _mm512_permutex2var_ps(xv[6], idx, xv[7]);
                            const __mmask16 b5 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(32));
                            const __mmask16 b6 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(64));
                            const __m512 sel = _mm512_mask_mov_ps(_mm512_mask_mov_ps(s01, b5, s23), b6,
                                                                  _mm512_mask_mov_ps(s45, b5, s67));
                            a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, val + k), sel, a);
                        }
                        acc[o - lo] = a;
                    }
                }
                for (int64_t o = lo; o < hi; ++o)
                    Y[t * n_out + o] = _mm512_reduce_add_ps(acc[o - lo]) + (bias ? bias[o] : 0.0f);
            }
#elif defined(__AVX2__)
            // AVX2 has no two-table permute: each group of 8 non-zeros collects its
            // activations from the panel (L1-resident) with scalar loads, which
            // measured faster than vgatherdps on Zen 3; two accumulators per row.
            __m256 acc[64];
            for (int64_t t = 0; t < T; ++t) {
                const float* x = X + t * n_in;
                for (int64_t o = lo; o < hi; ++o) acc[o - lo] = _mm256_setzero_ps();
                for (int64_t p = 0; p < n_panels; ++p) {
                    const float* xp = x + p * KP;
                    const int64_t* rp = rowptr + p * (n_out + 1);
                    for (int64_t o = lo; o < hi; ++o) {
                        const int64_t b = rp[o], e = rp[o + 1];
                        if (b == e) continue;
                        __m256 a0 = acc[o - lo], a1 = _mm256_setzero_ps();
                        int64_t k = b;
                        for (; k + 16 <= e; k += 16) {
                            const uint8_t* f = off + k;
                            const __m256 g0 = _mm256_setr_ps(xp[f[0]], xp[f[1]], xp[f[2]], xp[f[3]], xp[f[4]],
                                                             xp[f[5]], xp[f[6]], xp[f[7]]);
                            const __m256 g1 = _mm256_setr_ps(xp[f[8]], xp[f[9]], xp[f[10]], xp[f[11]], xp[f[12]],
                                                             xp[f[13]], xp[f[14]], xp[f[15]]);
                            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(val + k), g0, a0);
                            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(val + k + 8), g1, a1);
                        }
                        if (k + 8 <= e) {
                            const uint8_t* f = off + k;
                            const __m256 g0 = _mm256_setr_ps(xp[f[0]], xp[f[1]], xp[f[2]], xp[f[3]], xp[f[4]],
                                                             xp[f[5]], xp[f[6]], xp[f[7]]);
                            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(val + k), g0, a0);
                            k += 8;
                        }
                        float r = 0.0f;
                        for (; k < e; ++k) r += val[k] * xp[off[k]];
                        acc[o - lo] = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_setr_ps(r, 0, 0, 0, 0, 0, 0, 0));
                    }
                }
                for (int64_t o = lo; o < hi; ++o)
                    Y[t * n_out + o] = sp::hsum(acc[o - lo]) + (bias ? bias[o] : 0.0f);
            }
#else
            for (int64_t t = 0; t < T; ++t) {
                const float* x = X + t * n_in;
                for (int64_t o = lo; o < hi; ++o) {
                    float s = bias ? bias[o] : 0.0f;
                    for (int64_t p = 0; p < n_panels; ++p) {
                        const int64_t* rp = rowptr + p * (n_out + 1);
                        for (int64_t i = rp[o]; i < rp[o + 1]; ++i) s += val[i] * x[p * KP + off[i]];
                    }
                    Y[t * n_out + o] = s;
                }
            }
#endif
        });
        return 0;
    }
    // Many tokens: as sp_bsr_matmul_f32 shares them. With enough token tiles each thread packs whole tiles
    // into its own buffer (transposed, [panel columns][64]) and runs them through every block of RB rows;
    // fewer tiles are cut into parts of row blocks, a thread packing a tile for itself unless its last item
    // left it packed. Inputs wider than half the L2's worth of a tile go a chunk of panels at a time (the
    // outputs of later chunks added to Y). Each row block's outputs collect in an L1 buffer [RB][64] written
    // back token-major through bsr_write_back's transposes. Measured on the Xeon (avx512, `kernel_ab csr`,
    // 200 and 1024 tokens, 50 / 90%, three runs) against a shared pack of every tile (items of one tile x RB
    // rows) and a write back one float at a time: 3072->768 faster in every run (1024 tokens at 90%: 1.61-2.06x
    // -> 2.52-3.52x dense), 768->3072 from 10% slower to 25% faster (the old kernel's times there moved by
    // 1.8x from run to run).
    const int64_t n_tiles = (T + TB - 1) / TB;
    constexpr int64_t RB = 128;  // rows per block
    // Row blocks written back together: each token's row of Y gets 256 contiguous floats per write (the
    // BSR kernel's 64 KB write groups); against one row block per write, 3072->768 at 200 / 1024 tokens
    // 0.77 / 0.93x -> 0.81 / 1.22x dense at 50%, 2.09 / 2.95x -> 2.40 / 3.52x at 90% (avx512, one run's
    // minimums), 768->3072 within noise; four row blocks measured slower.
    constexpr int64_t WG_RB = 2;
    const int64_t n_rb = (n_out + RB - 1) / RB;
#if defined(__AVX512F__) || defined(__AVX2__)
    const int64_t pk = pcsr_panel_chunk();  // panels per chunk
#else
    const int64_t pk = n_panels;
#endif
    const int64_t n_pc = (n_panels + pk - 1) / pk;
    const int64_t n_parts = tile_parts(T, n_tiles, n_rb, threads);
    const uint64_t call = next_call();
    sp::Pool::get().run(n_tiles * n_parts, threads, [&](int64_t item, int) {
      const int64_t tile = item / n_parts, part = item % n_parts;
      const int64_t t0 = tile * TB, tb = std::min(TB, T - t0);
      thread_local std::vector<float> xbuf, acc_buf;
      thread_local HeldPack held;
      const int64_t x_cols = std::min(n_panels, pk) * KP;
      if (xbuf.size() < (size_t)(x_cols * TB)) xbuf.resize((size_t)(x_cols * TB));
      if (acc_buf.size() < (size_t)(WG_RB * RB * TB)) acc_buf.resize((size_t)(WG_RB * RB * TB));
      for (int64_t j = 0; j < n_pc; ++j) {
        const int64_t p_lo = j * pk, p_hi = std::min(n_panels, p_lo + pk);
        if (held.repack(call, tile, j))
            for (int64_t k0 = p_lo * KP; k0 < p_hi * KP; k0 += 16)
                pack_block(X, T, n_in, tile, k0, xbuf.data() + (k0 - p_lo * KP) * TB);
        const int64_t rb_lo = part * n_rb / n_parts, rb_hi = (part + 1) * n_rb / n_parts;
        for (int64_t rbi = rb_lo; rbi < rb_hi; ++rbi) {
            const int64_t lo = rbi * RB;
            const int64_t rows = std::min(RB, n_out - lo);
            float* acc = acc_buf.data() + (rbi - rb_lo) % WG_RB * RB * TB;  // [RB, TB]: the row block's outputs
            for (int64_t r = 0; r < rows; ++r)
                for (int64_t t = 0; t < TB; ++t) acc[r * TB + t] = bias && j == 0 ? bias[lo + r] : 0.0f;
            for (int64_t p = p_lo; p < p_hi; ++p) {
                const float* xp = xbuf.data() + (p - p_lo) * KP * TB;
                const int64_t* rp = rowptr + p * (n_out + 1);
                int64_t r = 0;
#if defined(__AVX512F__)
                for (; r + 2 <= rows; r += 2) {
                    const int64_t o = lo + r;
                    float* a0 = acc + r * TB;
                    float* a1 = a0 + TB;
                    __m512 x00 = _mm512_loadu_ps(a0), x01 = _mm512_loadu_ps(a0 + 16),
                           x02 = _mm512_loadu_ps(a0 + 32), x03 = _mm512_loadu_ps(a0 + 48);
                    __m512 x10 = _mm512_loadu_ps(a1), x11 = _mm512_loadu_ps(a1 + 16),
                           x12 = _mm512_loadu_ps(a1 + 32), x13 = _mm512_loadu_ps(a1 + 48);
                    int64_t i = rp[o], e0 = rp[o + 1], j = rp[o + 1], e1 = rp[o + 2];
                    for (; i < e0 && j < e1; ++i, ++j) {
                        const float* p0 = xp + (int64_t)off[i] * TB;
                        const float* p1 = xp + (int64_t)off[j] * TB;
                        __m512 v0 = _mm512_set1_ps(val[i]), v1 = _mm512_set1_ps(val[j]);
                        x00 = _mm512_fmadd_ps(v0, _mm512_loadu_ps(p0), x00);
                        x10 = _mm512_fmadd_ps(v1, _mm512_loadu_ps(p1), x10);
                        x01 = _mm512_fmadd_ps(v0, _mm512_loadu_ps(p0 + 16), x01);
                        x11 = _mm512_fmadd_ps(v1, _mm512_loadu_ps(p1 + 16), x11);
                        x02 = _mm512_fmadd_ps(v0, _mm512_loadu_ps(p0 + 32), x02);
                        x12 = _mm512_fmadd_ps(v1, _mm512_loadu_ps(p1 + 32), x12);
                        x03 = _mm512_fmadd_ps(v0, _mm512_loadu_ps(p0 + 48), x03);
                        x13 = _mm512_fmadd_ps(v1, _mm512_loadu_ps(p1 + 48), x13);
                    }
                    for (; i < e0; ++i) {
                        const float* p0 = xp + (int64_t)off[i] * TB;
                        __m512 v0 = _mm512_set1_ps(val[i]);
                        x00 = _mm512_fmadd_ps(v0, _mm512_loadu_ps(p0), x00);
                        x01 = _mm512_fmadd_ps(v0, _mm512_loadu_ps(p0 + 16), x01);
                        x02 = _mm512_fmadd_ps(v0, _mm512_loadu_ps(p0 + 32), x02);
                        x03 = _mm512_fmadd_ps(v0, _mm512_loadu_ps(p0 + 48), x03);
                    }
                    for (; j < e1; ++j) {
                        const float* p1 = xp + (int64_t)off[j] * TB;
                        __m512 v1 = _mm512_set1_ps(val[j]);
                        x10 = _mm512_fmadd_ps(v1, _mm512_loadu_ps(p1), x10);
                        x11 = _mm512_fmadd_ps(v1, _mm512_loadu_ps(p1 + 16), x11);
                        x12 = _mm512_fmadd_ps(v1, _mm512_loadu_ps(p1 + 32), x12);
                        x13 = _mm512_fmadd_ps(v1, _mm512_loadu_ps(p1 + 48), x13);
                    }
                    _mm512_storeu_ps(a0, x00); _mm512_storeu_ps(a0 + 16, x01);
                    _mm512_storeu_ps(a0 + 32, x02); _mm512_storeu_ps(a0 + 48, x03);
                    _mm512_storeu_ps(a1, x10); _mm512_storeu_ps(a1 + 16, x11);
                    _mm512_storeu_ps(a1 + 32, x12); _mm512_storeu_ps(a1 + 48, x13);
                }
#elif defined(__AVX2__)
                // 16 ymm registers: one row at a time, its 64 outputs in 8
                // accumulators (enough independent chains to cover FMA latency).
                for (; r < rows; ++r) {
                    const int64_t o = lo + r;
                    float* a = acc + r * TB;
                    __m256 c[8];
                    for (int h = 0; h < 8; ++h) c[h] = _mm256_loadu_ps(a + 8 * h);
                    for (int64_t i = rp[o]; i < rp[o + 1]; ++i) {
                        const float* p0 = xp + (int64_t)off[i] * TB;
                        const __m256 v = _mm256_broadcast_ss(val + i);
                        for (int h = 0; h < 8; ++h) c[h] = _mm256_fmadd_ps(v, _mm256_loadu_ps(p0 + 8 * h), c[h]);
                    }
                    for (int h = 0; h < 8; ++h) _mm256_storeu_ps(a + 8 * h, c[h]);
                }
#endif
                for (; r < rows; ++r) {  // portable path (and the odd last row)
                    const int64_t o = lo + r;
                    float* a = acc + r * TB;
                    for (int64_t i = rp[o]; i < rp[o + 1]; ++i)
                        sp::axpy(a, val[i], xp + (int64_t)off[i] * TB, TB);
                }
            }
#if defined(__AVX512F__) || defined(__AVX2__)
            if ((rbi - rb_lo) % WG_RB == WG_RB - 1 || rbi == rb_hi - 1) {
                const int64_t g_lo = (rbi - (rbi - rb_lo) % WG_RB) * RB;
                bsr_write_back(acc_buf.data(), lo + rows - g_lo, tb, nullptr, Y + t0 * n_out + g_lo, n_out, j > 0);
            }
#else
            for (int64_t t = 0; t < tb; ++t)  // write the row block back token-major
                for (int64_t r = 0; r < rows; ++r) Y[(t0 + t) * n_out + lo + r] = acc[r * TB + t];
#endif
        }
      }
    });
    return 0;
}

// n:m weights, few tokens. Each row's non-zeros come in groups of 16 that
// cover a window of W = 16 m / n inputs (16/n blocks of m); pos[k] is the
// position of non-zero k inside its window (uint8, W <= 256). The 16
// activations a group needs are picked from the window with in-register
// permutes (one vpermt2ps per 32 inputs), so the inner loop reads only the
// weight stream: 5 bytes per non-zero. val/pos are [n_out, n_groups * 16]
// (zero-padded); xpad is each token's input padded to n_groups * W + 32.
int sp_nm_matvec_f32(const float* xpad, int64_t T, int64_t x_stride, int64_t n_out, int64_t n_groups,
                     int64_t W, const float* val, const uint8_t* pos, const float* bias, float* Y,
                     int threads) {
#if defined(__AVX512F__)
    const int nch = (int)((W + 31) / 32);
    const int64_t row_len = n_groups * 16;
    const int64_t n_blocks = (n_out + 31) / 32;
    sp::Pool::get().run(n_blocks, threads, [&](int64_t blk, int) {
        for (int64_t o = blk * 32; o < std::min(n_out, blk * 32 + 32); ++o) {
            const float* v = val + o * row_len;
            const uint8_t* ps = pos + o * row_len;
            for (int64_t t0 = 0; t0 < T; t0 += 4) {
                const int tn = (int)std::min<int64_t>(4, T - t0);
                __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
                for (int64_t gi = 0; gi < n_groups; ++gi) {
                    const __m512 vv = _mm512_loadu_ps(v + gi * 16);
                    const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(ps + gi * 16)));
                    for (int t = 0; t < tn; ++t) {
                        const float* base = xpad + (t0 + t) * x_stride + gi * W;
                        __m512 sel = _mm512_permutex2var_ps(_mm512_loadu_ps(base), idx, _mm512_loadu_ps(base + 16));
                        for (int c = 1; c < nch; ++c) {
                            __m512 part = _mm512_permutex2var_ps(_mm512_loadu_ps(base + 32 * c), idx,
                                                                 _mm512_loadu_ps(base + 32 * c + 16));
                            __mmask16 in_c = _mm512_cmpeq_epi32_mask(_mm512_srli_epi32(idx, 5), _mm512_set1_epi32(c));
                            sel = _mm512_mask_mov_ps(sel, in_c, part);
                        }
                        acc[t] = _mm512_fmadd_ps(vv, sel, acc[t]);
                    }
                }
                for (int t = 0; t < tn; ++t)
                    Y[(t0 + t) * n_out + o] = _mm512_reduce_add_ps(acc[t]) + (bias ? bias[o] : 0.0f);
            }
        }
    });
    return 0;
#else
    (void)xpad; (void)T; (void)x_stride; (void)n_out; (void)n_groups; (void)W; (void)val; (void)pos;
    (void)bias; (void)Y; (void)threads;
    return 2;  // needs AVX-512: callers use the panel kernel
#endif
}

// Block-sparse weights (tiles of br x bc, br a multiple of 4), many tokens (AVX-512 or AVX2).
// Activations are packed transposed in tiles of 64 tokens; a block row's outputs for one token tile are
// computed in an L1 buffer (bsr_block_row: each weight tile's bc x 64 activations, 4 KB, reused from L1 by
// every register block of rows) and written back token-major (bsr_write_back). crow [R+1] (int64), col
// [nnzb] (int32), val [nnzb, br, bc]. Work items: with enough token tiles to keep every thread busy (four
// per thread, or an even split of full tiles), a whole token tile, which its thread packs into its own
// buffer (L2-resident, n_in x 64 floats; wider inputs a chunk of block columns at a time, bsr_k_chunk) and
// runs through every block row; fewer tiles are cut into parts of consecutive block rows (about four items
// per thread in all), each thread packing a tile for itself unless its last item left it packed.
// Measured on the Xeon: a shared pack of every tile followed by runs of R / (8 threads) block rows (the
// previous few-tile path) read the other core's packed activations from L3: own packs were faster in 49 of
// 56 configurations (768 <-> 3072 and 11008->4096, 16-320 tokens, 50 / 90%, both builds; 3072->768, 200
// tokens, 90%: 2.90 -> 4.65x dense avx512, 4.64 -> 6.66x avx2), the rest within 7%. The own tiles replaced
// a shared pack that wrote then re-read all of X's transposed copy through memory: 2.7 of 8.3 ms at
// 3072->768, 1024 tokens, 90% sparse (avx2 build).
// Keeping a row group's accumulators across all its tiles instead (each tile's activations read from L2
// once per row group) and writing the outputs one float at a time ran at 0.91x dense torch (AVX-512, 768->3072
// at 50%, 128 tokens). The AVX2 register blocks replaced 4 x 16 blocks, one block row per item, a zero fill
// and a scalar write back: 0.91-3.12x -> 1.40-4.61x dense against AVX2-capped torch (768 <-> 3072 at 50 / 75
// / 90%, 128 and 1024 tokens).
// cols: val holds column-major tiles [nnzb, bc, br] (bsrt_rows), any br; else row-major tiles [nnzb, br, bc],
// br a multiple of 4.
static int bsr_many_tokens(const float* X, int64_t T, int64_t n_in, int64_t n_out, int64_t br, int64_t bc,
                           const int64_t* crow, const int32_t* col, const float* val, const float* bias, float* Y,
                           int threads, bool cols) {
#if defined(__AVX512F__) || defined(__AVX2__)
    if (!cols && br % 4 != 0) return 2;
    threads = std::max(1, threads);
    const int64_t R = (n_out + br - 1) / br;
    const int64_t n_pad = ((n_in + bc - 1) / bc) * bc + 16;
    const int64_t n_pad16 = (n_pad + 15) / 16 * 16;
    const int64_t n_tiles = (T + TB - 1) / TB;
    int64_t six_rows = 0;  // rows [0, six_rows) go six at a time: the most groups of 6 leaving a multiple of 4
    for (int64_t k6 = br / 6; k6 >= 0; --k6)
        if ((br - 6 * k6) % 4 == 0) {
            six_rows = 6 * k6;
            break;
        }
    // Block rows rb0..rb1-1 of one token tile into out (one [br][64] buffer per block row), then one write
    // back. Up to kWriteGroup bytes of outputs are written at once: each token's row of Y then gets
    // kWriteGroup / (64 x 4) contiguous floats instead of one block row's br (one cache line apart from the
    // rest, mostly missing). Measured on the Xeon, 768 <-> 3072 at 50 / 75 / 90%, 128 and 1024 tokens,
    // against one block row per write back: AVX-512 faster in 21 of 30 configurations over four runs, by
    // 0-20% (768->3072, 1024 tokens at 50%: 1.43-1.54 -> 1.56-1.65x dense), AVX2 in 9 of 12 (1024 tokens:
    // all six, +2-11%); the others within 6%.
    constexpr int64_t kWriteGroup = 64 << 10;
    const int64_t RG = std::max<int64_t>(1, kWriteGroup / (br * TB * (int64_t)sizeof(float)));
    // Block rows rb0..rb1-1 of one token tile, their tiles [first(rb), last(rb)) (block columns from c0,
    // packed in xtile), into Y (add: onto Y's values).
    auto block_rows = [&](int64_t rb0, int64_t rb1, int64_t tile, const float* xtile, int64_t c0, float* out,
                          const int64_t* first, const int64_t* last, bool add) {
        const int64_t t0 = tile * TB, tb = std::min(TB, T - t0), o0 = rb0 * br;
        for (int64_t rb = rb0; rb < rb1; ++rb)
            bsr_block_row(val, col, first[rb], last[rb], br, bc, six_rows, xtile, c0, tb, out + (rb - rb0) * br * TB);
        bsr_write_back(out, std::min(n_out, rb1 * br) - o0, tb, bias ? bias + o0 : nullptr, Y + t0 * n_out + o0,
                       n_out, add);
    };
    // Inputs wider than half the L2 cache's worth of one token tile (11008 x 64 floats is 2.8 MB) go in
    // chunks of kc block columns: each chunk packed and run through every block row (the outputs of later
    // chunks added to Y), so a tile's activations come from L2, not from L3 or memory. Needs each block
    // row's columns ascending (the BSR layouts store them so); otherwise one chunk.
    const int64_t C = (n_in + bc - 1) / bc;
    int64_t kc = bsr_k_chunk(bc);
    std::vector<int64_t> starts;  // [chunk][R + 1]: the first tile of block row rb at or past the chunk
    if (kc < C) {
        for (int64_t rb = 0; rb < R && kc < C; ++rb)
            for (int64_t b = crow[rb] + 1; b < crow[rb + 1]; ++b)
                if (col[b] <= col[b - 1]) {
                    kc = C;
                    break;
                }
    }
    const int64_t n_kc = kc < C ? (C + kc - 1) / kc : 1;
    if (n_kc > 1) {
        starts.resize((size_t)((n_kc + 1) * R));
        for (int64_t rb = 0; rb < R; ++rb) {
            int64_t b = crow[rb];
            for (int64_t j = 0; j < n_kc; ++j) {
                while (b < crow[rb + 1] && col[b] < j * kc) ++b;
                starts[(size_t)(j * R + rb)] = b;
            }
            starts[(size_t)(n_kc * R + rb)] = crow[rb + 1];
        }
    }
    // one chunk: the packed width as before; chunks: kc x bc columns (a multiple of 16) plus a spare 16
    const int64_t x_cols = n_kc > 1 ? kc * bc + 16 : n_pad16;
    // Column-major tiles: each 16-row slice of a block row, a chunk of its tiles at a time, straight into Y
    // for the tile's tokens 24 at a time (AVX-512; the rest 16, 8 or 4 at a time: 64 = 24 + 24 + 16) or 6 at
    // a time (AVX2: 64 = 10 x 6 + 4).
    const int64_t tchunk = bsrt_tile_chunk(bc);
#if defined(__AVX512F__)
    // Outputs larger than the L2 cache: the lines each call stores come from L3 or memory, and bsrt_rows
    // prefetches them for writing while it computes (the AVX2 kernel's calls, 6 tokens, ran 2-10% slower
    // with these prefetches and the weight prefetch: measured on the Xeon with `kernel_ab bsr --isa avx2`).
    const bool y_ahead = g_output_prefetch >= 0 ? g_output_prefetch > 0
                                                : T * n_out * (int64_t)sizeof(float) > l2_bytes();
#endif
    auto block_rows_cols = [&](int64_t rb0, int64_t rb1, int64_t tile, const float* xtile, int64_t c0,
                               const int64_t* first, const int64_t* last, bool add) {
        const int64_t t0 = tile * TB, tb = std::min(TB, T - t0);
        for (int64_t rb = rb0; rb < rb1; ++rb) {
            const int64_t f = first[rb], l = last[rb];
            if (f == l && add) continue;  // no tile in this chunk: Y already holds the row's sums
            for (int64_t r0 = 0; r0 < br && rb * br + r0 < n_out; r0 += 16) {
                const int64_t nr = std::min<int64_t>({16, br - r0, n_out - rb * br - r0});
                float* y = Y + t0 * n_out + rb * br + r0;
                for (int64_t g0 = f; g0 < l || g0 == f; g0 += tchunk) {
                    const int64_t g1 = std::min(l, g0 + tchunk);
                    const bool acc_in = add || g0 > f;
                    const float* bb = bias && !acc_in ? bias + rb * br + r0 : nullptr;
                    int64_t h = 0;
                    auto run = [&](auto tt) {
                        constexpr int K = decltype(tt)::value;
                        const int64_t nt = std::min<int64_t>(K, tb - h);
#if defined(__AVX512F__)
                        const int64_t gi = token_group(h);  // a call's tokens never straddle two groups
                        bsrt_rows_any<K>(val, col, g0, g1, br, bc, r0, (__mmask16)((1u << nr) - 1u),
                                     group_token(xtile, x_cols, h), c0, bb, y + h * n_out, n_out, nt, acc_in,
                                     h == 0, y_ahead, kGroupTokens[gi]);
#else
                        if (nr == 16 && br == 16 && bc == 16)
                            bsrt_rows<K, true, 16, 16>(val, col, g0, g1, br, bc, r0, nr, xtile + h, c0, bb,
                                                       y + h * n_out, n_out, nt, acc_in);
                        else if (nr == 16)
                            bsrt_rows<K, true, 0, 0>(val, col, g0, g1, br, bc, r0, nr, xtile + h, c0, bb,
                                                     y + h * n_out, n_out, nt, acc_in);
                        else
                            bsrt_rows<K, false, 0, 0>(val, col, g0, g1, br, bc, r0, nr, xtile + h, c0, bb,
                                                      y + h * n_out, n_out, nt, acc_in);
#endif
                        h += K;
                    };
#if defined(__AVX512F__)
                    while (h + 24 <= tb) run(std::integral_constant<int, 24>{});
                    while (h + 16 <= tb) run(std::integral_constant<int, 16>{});
                    if (tb - h > 8) run(std::integral_constant<int, 16>{});
                    else if (tb - h > 4) run(std::integral_constant<int, 8>{});
                    else if (tb - h > 0) run(std::integral_constant<int, 4>{});
#else
                    while (h + 6 <= tb) run(std::integral_constant<int, 6>{});
                    if (tb - h > 4) run(std::integral_constant<int, 6>{});
                    else if (tb - h > 0) run(std::integral_constant<int, 4>{});
#endif
                    if (g1 == l) break;
                }
            }
        }
    };
    // Whole token tiles per thread, or each tile's block rows in parts (tile_parts), a thread packing the
    // tile (chunk) for itself unless it holds it already from its last item.
    const int64_t n_parts = tile_parts(T, n_tiles, R, threads);
    const uint64_t call = next_call();
    sp::Pool::get().run(n_tiles * n_parts, threads, [&](int64_t item, int) {
        const int64_t tile = item / n_parts, part = item % n_parts;
        const int64_t r_lo = part * R / n_parts, r_hi = (part + 1) * R / n_parts;
        thread_local std::vector<float> xbuf, out;
        thread_local HeldPack held;
        if (xbuf.size() < (size_t)(x_cols * TB)) xbuf.resize((size_t)(x_cols * TB));
        if (!cols && out.size() < (size_t)(RG * br * TB)) out.resize((size_t)(RG * br * TB));
        for (int64_t j = 0; j < n_kc; ++j) {
            const int64_t k_lo = n_kc > 1 ? j * kc * bc : 0;
            const int64_t k_hi = n_kc > 1 ? std::min(n_pad16, k_lo + kc * bc) : n_pad16;
            if (held.repack(call, tile, j))
                for (int64_t k0 = k_lo; k0 < k_hi; k0 += 16) {
#if defined(__AVX512F__)
                    if (cols) {
                        pack_block_groups(X, T, n_in, tile, k0, k0 - k_lo, xbuf.data(), x_cols, false);
                        continue;
                    }
#endif
                    pack_block(X, T, n_in, tile, k0, xbuf.data() + (k0 - k_lo) * TB, false);
                }
            const int64_t* first = n_kc > 1 ? starts.data() + j * R : crow;
            const int64_t* last = n_kc > 1 ? starts.data() + (j + 1) * R : crow + 1;
            for (int64_t rb = r_lo; rb < r_hi; rb += RG) {
                if (cols) {
                    block_rows_cols(rb, std::min(r_hi, rb + RG), tile, xbuf.data(), k_lo / bc, first, last, j > 0);
                    continue;
                }
                block_rows(rb, std::min(r_hi, rb + RG), tile, xbuf.data(), k_lo / bc, out.data(), first, last,
                           j > 0);
            }
        }
    });
    return 0;
#else
    (void)X; (void)T; (void)n_in; (void)n_out; (void)br; (void)bc; (void)crow; (void)col; (void)val;
    (void)bias; (void)Y; (void)threads; (void)cols;
    return 2;  // needs AVX2 or AVX-512: callers use the panel kernel
#endif
}

int sp_bsr_matmul_f32(const float* X, int64_t T, int64_t n_in, int64_t n_out, int64_t br, int64_t bc,
                      const int64_t* crow, const int32_t* col, const float* val, const float* bias, float* Y,
                      int threads) {
    return bsr_many_tokens(X, T, n_in, n_out, br, bc, crow, col, val, bias, Y, threads, false);
}

int sp_bsrt_matvec_f32(const float* X, int64_t T, int64_t n_in, int64_t n_out, int64_t br, int64_t bc,
                       const int64_t* crow, const int32_t* col, const float* val, const float* bias, float* Y,
                       int threads);

// sp_bsr_matmul_f32 over column-major tiles val [nnzb, bc, br] (any br): AVX-512 and AVX2 builds; 2 elsewhere.
// AVX2 below 16 tokens hands the call to sp_bsrt_matvec_f32, which measured ahead there (Xeon, avx2 build,
// 16 x 16 tiles: 3072->768 at 8-15 tokens 2.10-2.51x -> 2.38-2.78x dense at 50%, 6.60-8.21x -> 9.79-10.89x at
// 90%; 768->3072 within 10% either way); on AVX-512 this kernel leads from 8 tokens at 768->3072 (2.87-3.08x
// -> 3.52-4.45x at 50%) and the matvec at 3072->768 (at 90%: 9.81-11.64x against 6.42-9.39x), so 8 stays.
int sp_bsrt_matmul_f32(const float* X, int64_t T, int64_t n_in, int64_t n_out, int64_t br, int64_t bc,
                       const int64_t* crow, const int32_t* col, const float* val, const float* bias, float* Y,
                       int threads) {
#if defined(__AVX2__) && !defined(__AVX512F__)
    if (T < 16) return sp_bsrt_matvec_f32(X, T, n_in, n_out, br, bc, crow, col, val, bias, Y, threads);
#endif
    return bsr_many_tokens(X, T, n_in, n_out, br, bc, crow, col, val, bias, Y, threads, true);
}

// Few tokens over column-major tiles val [nnzb, bc, br] (AVX-512 and AVX2 builds; 2 elsewhere): items of
// consecutive block rows as sp_bsr_matvec_f32; each 16-row slice of a block row runs its tiles once for up to
// 8 tokens (AVX2: 6). Against sp_bsr_matvec_f32 (row-major, once per token, horizontal sums), 768 <-> 3072,
// 16 x 16: 4 tokens 1.51-2.31x -> 2.69-3.87x dense at 50-75% (AVX-512), 1.07-1.19x -> 2.77-3.38x at 50%
// (AVX2); 1 token 1.24-1.96x -> 1.55-2.60x (AVX-512), 1.50x -> 1.68-1.70x (AVX2).
int sp_bsrt_matvec_f32(const float* X, int64_t T, int64_t n_in, int64_t n_out, int64_t br, int64_t bc,
                       const int64_t* crow, const int32_t* col, const float* val, const float* bias, float* Y,
                       int threads) {
#if defined(__AVX512F__)
    const int64_t R = (n_out + br - 1) / br;
    const int64_t CH = block_row_run(R, threads);
    sp::Pool::get().run((R + CH - 1) / CH, std::max(1, threads), [&](int64_t item, int) {
        for (int64_t rb = item * CH; rb < std::min(R, (item + 1) * CH); ++rb)
            for (int64_t r0 = 0; r0 < br && rb * br + r0 < n_out; r0 += 16) {
                const int64_t o = rb * br + r0, nr = std::min<int64_t>({16, br - r0, n_out - o});
                const __mmask16 rm = (__mmask16)((1u << nr) - 1u);
                const float* bb = bias ? bias + o : nullptr;
                for (int64_t t = 0; t < T; t += 8) {
                    const float* x = X + t * n_in;
                    float* y = Y + t * n_out + o;
                    const int64_t b0 = crow[rb], b1 = crow[rb + 1];
                    switch (std::min<int64_t>(8, T - t)) {
                        case 1: bsrt_vec<1>(val, col, b0, b1, br, bc, r0, rm, x, n_in, bb, y, n_out); break;
                        case 2: bsrt_vec<2>(val, col, b0, b1, br, bc, r0, rm, x, n_in, bb, y, n_out); break;
                        case 3: bsrt_vec<3>(val, col, b0, b1, br, bc, r0, rm, x, n_in, bb, y, n_out); break;
                        case 4: bsrt_vec<4>(val, col, b0, b1, br, bc, r0, rm, x, n_in, bb, y, n_out); break;
                        case 5: bsrt_vec<5>(val, col, b0, b1, br, bc, r0, rm, x, n_in, bb, y, n_out); break;
                        case 6: bsrt_vec<6>(val, col, b0, b1, br, bc, r0, rm, x, n_in, bb, y, n_out); break;
                        case 7: bsrt_vec<7>(val, col, b0, b1, br, bc, r0, rm, x, n_in, bb, y, n_out); break;
                        default: bsrt_vec<8>(val, col, b0, b1, br, bc, r0, rm, x, n_in, bb, y, n_out); break;
                    }
                }
            }
    });
    return 0;
#elif defined(__AVX2__)
    const int64_t R = (n_out + br - 1) / br;
    const int64_t CH = block_row_run(R, threads);
    sp::Pool::get().run((R + CH - 1) / CH, std::max(1, threads), [&](int64_t item, int) {
        for (int64_t rb = item * CH; rb < std::min(R, (item + 1) * CH); ++rb)
            for (int64_t r0 = 0; r0 < br && rb * br + r0 < n_out; r0 += 16) {
                const int64_t o = rb * br + r0, nr = std::min<int64_t>({16, br - r0, n_out - o});
                const float* bb = bias ? bias + o : nullptr;
                for (int64_t t = 0; t < T; t += 6) {
                    const float* x = X + t * n_in;
                    float* y = Y + t * n_out + o;
                    const int64_t b0 = crow[rb], b1 = crow[rb + 1];
                    auto go = [&](auto full) {
                        constexpr bool F = decltype(full)::value;
                        switch (std::min<int64_t>(6, T - t)) {
                            case 1: bsrt_vec<1, F>(val, col, b0, b1, br, bc, r0, nr, x, n_in, bb, y, n_out); break;
                            case 2: bsrt_vec<2, F>(val, col, b0, b1, br, bc, r0, nr, x, n_in, bb, y, n_out); break;
                            case 3: bsrt_vec<3, F>(val, col, b0, b1, br, bc, r0, nr, x, n_in, bb, y, n_out); break;
                            case 4: bsrt_vec<4, F>(val, col, b0, b1, br, bc, r0, nr, x, n_in, bb, y, n_out); break;
                            case 5: bsrt_vec<5, F>(val, col, b0, b1, br, bc, r0, nr, x, n_in, bb, y, n_out); break;
                            default: bsrt_vec<6, F>(val, col, b0, b1, br, bc, r0, nr, x, n_in, bb, y, n_out); break;
                        }
                    };
                    if (nr == 16) go(std::true_type{});
                    else go(std::false_type{});
                }
            }
    });
    return 0;
#else
    (void)X; (void)T; (void)n_in; (void)n_out; (void)br; (void)bc; (void)crow; (void)col; (void)val;
    (void)bias; (void)Y; (void)threads;
    return 2;
#endif
}

// 1 where this build has the column-major tile kernels (sp_bsrt_*: AVX-512 and AVX2), else 0.
int sp_bsr_tile_columns() {
#if defined(__AVX512F__) || defined(__AVX2__)
    return 1;
#else
    return 0;
#endif
}

// Columns per chunk of the many-token kernels, sp_bsr_matmul_f32 in block columns (rounded down to a multiple
// of 16), sp_pcsr_matmul_f32 in panels of 128 (0: half the L2 cache's worth, the default); returns the
// previous setting. For tests and A/Bs.
int sp_set_input_chunk(int columns) {
#if defined(__AVX512F__) || defined(__AVX2__)
    const int prev = (int)g_k_chunk;
    g_k_chunk = std::max(0, columns);
    return prev;
#else
    (void)columns;
    return 0;
#endif
}

// The tiles per register-block pass of sp_bsr_matmul_f32's AVX-512 kernel, and per pass of sp_bsrt_matmul_f32
// (0: from the L1 data cache's size, the default; the AVX2 row-major kernel takes one tile at a time); returns the
// previous setting. For tests and A/Bs: every group size gives the same sums in the same order, only grouped
// differently.
int sp_bsr_set_tile_group(int group) {
#if defined(__AVX512F__) || defined(__AVX2__)
    const int prev = g_tile_group;
    g_tile_group = std::max(0, group);
    return prev;
#else
    (void)group;
    return 0;
#endif
}

// Whether the AVX-512 column-tile kernel prefetches the output lines it stores (1), not (0), or only where
// the output is larger than the L2 cache (-1, the default); returns the previous setting. For tests and A/Bs:
// a prefetch changes no result.
int sp_bsr_set_output_prefetch(int mode) {
#if defined(__AVX512F__) || defined(__AVX2__)
    const int prev = g_output_prefetch;
    g_output_prefetch = mode < 0 ? -1 : mode > 0;
    return prev;
#else
    (void)mode;
    return -1;
#endif
}

// Block-sparse weights, few tokens (< 16). A work item is one block row; for
// up to 16 of its rows at a time, one vector accumulator per row collects
// tile-row x activation-segment products over every tile of the block row,
// and is summed horizontally once at the end: the tiles stream contiguously,
// 16 multiply-adds per loaded activation segment.
int sp_bsr_matvec_f32(const float* X, int64_t T, int64_t n_in, int64_t n_out, int64_t br, int64_t bc,
                      const int64_t* crow, const int32_t* col, const float* val, const float* bias, float* Y,
                      int threads) {
    const int64_t R = (n_out + br - 1) / br;
#if defined(__AVX512F__)
    const int64_t CH = block_row_run(R, threads);
    sp::Pool::get().run((R + CH - 1) / CH, std::max(1, threads), [&](int64_t item, int) {
      for (int64_t rb = item * CH; rb < std::min(R, (item + 1) * CH); ++rb) {
        for (int64_t t = 0; t < T; ++t) {
            const float* x = X + t * n_in;
            for (int64_t r0 = 0; r0 < br; r0 += 16) {
                const int64_t nr = std::min<int64_t>(16, br - r0);
                __m512 acc[16];
                for (int q = 0; q < 16; ++q) acc[q] = _mm512_setzero_ps();
                for (int64_t b = crow[rb]; b < crow[rb + 1]; ++b) {
                    const int64_t c0 = (int64_t)col[b] * bc;
                    const float* tile = val + b * br * bc + r0 * bc;
                    for (int64_t s0 = 0; s0 < bc; s0 += 16) {
                        const int64_t w = std::min<int64_t>(16, bc - s0);
                        const int64_t in_x = std::max<int64_t>(0, std::min<int64_t>(w, n_in - c0 - s0));
                        const __m512 xs = _mm512_maskz_loadu_ps((__mmask16)((1u << in_x) - 1u), x + c0 + s0);
                        const __mmask16 mw = (__mmask16)((1u << w) - 1u);
                        for (int64_t q = 0; q < nr; ++q)
                            acc[q] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mw, tile + q * bc + s0), xs, acc[q]);
                    }
                }
                for (int64_t q = 0; q < nr; ++q) {
                    const int64_t o = rb * br + r0 + q;
                    if (o < n_out) Y[t * n_out + o] = _mm512_reduce_add_ps(acc[q]) + (bias ? bias[o] : 0.0f);
                }
            }
        }
      }
    });
    return 0;
#elif defined(__AVX2__)
    const int64_t CH = block_row_run(R, threads);
    if (br % 8 == 0 && br <= 64) {
        // Tiles streamed once, in storage order: per tile and 8 rows, 8 partial
        // vectors (tile row x activation segment) are reduced to one vector of 8
        // row sums (hadd tree) and added to that row group's accumulator. (The
        // AVX-512 layout, one accumulator per row across all tiles, needs 16+
        // registers; two passes of 8 rows each re-walk the tiles half-read, which
        // the hardware prefetcher serves badly.)
        sp::Pool::get().run((R + CH - 1) / CH, std::max(1, threads), [&](int64_t item, int) {
      for (int64_t rb = item * CH; rb < std::min(R, (item + 1) * CH); ++rb) {
            const int64_t ng = br / 8;
            for (int64_t t = 0; t < T; ++t) {
                const float* x = X + t * n_in;
                __m256 yacc[8];
                for (int64_t gq = 0; gq < ng; ++gq) yacc[gq] = _mm256_setzero_ps();
                for (int64_t b = crow[rb]; b < crow[rb + 1]; ++b) {
                    const int64_t c0 = (int64_t)col[b] * bc;
                    const float* tile = val + b * br * bc;
                    if (b + 1 < crow[rb + 1])
                        for (int64_t k = 0; k < br * bc; k += 16) __builtin_prefetch(tile + br * bc + k, 0, 3);
                    for (int64_t gq = 0; gq < ng; ++gq) {
                        __m256 a[8];
                        for (int q = 0; q < 8; ++q) a[q] = _mm256_setzero_ps();
                        const float* tg = tile + gq * 8 * bc;
                        for (int64_t s0 = 0; s0 < bc; s0 += 8) {
                            const int64_t w = std::min<int64_t>(8, bc - s0);
                            const int64_t in_x = std::max<int64_t>(0, std::min<int64_t>(w, n_in - c0 - s0));
                            const __m256 xs = in_x == 8 ? _mm256_loadu_ps(x + c0 + s0)
                                                        : _mm256_maskload_ps(x + c0 + s0, sp::mask8(in_x));
                            if (w == 8) {
                                for (int q = 0; q < 8; ++q)
                                    a[q] = _mm256_fmadd_ps(_mm256_loadu_ps(tg + q * bc + s0), xs, a[q]);
                            } else {
                                const __m256i mw = sp::mask8(w);
                                for (int q = 0; q < 8; ++q)
                                    a[q] = _mm256_fmadd_ps(_mm256_maskload_ps(tg + q * bc + s0, mw), xs, a[q]);
                            }
                        }
                        // a[q] -> lane q of one vector: row sums of the 8 rows
                        const __m256 h01 = _mm256_hadd_ps(a[0], a[1]), h23 = _mm256_hadd_ps(a[2], a[3]);
                        const __m256 h45 = _mm256_hadd_ps(a[4], a[5]), h67 = _mm256_hadd_ps(a[6], a[7]);
                        const __m256 h0123 = _mm256_hadd_ps(h01, h23), h4567 = _mm256_hadd_ps(h45, h67);
                        const __m256 lo = _mm256_permute2f128_ps(h0123, h4567, 0x20);
                        const __m256 hi = _mm256_permute2f128_ps(h0123, h4567, 0x31);
                        yacc[gq] = _mm256_add_ps(yacc[gq], _mm256_add_ps(lo, hi));
                    }
                }
                for (int64_t gq = 0; gq < ng; ++gq) {
                    float r[8];
                    _mm256_storeu_ps(r, yacc[gq]);
                    for (int q = 0; q < 8; ++q) {
                        const int64_t o = rb * br + gq * 8 + q;
                        if (o < n_out) Y[t * n_out + o] = r[q] + (bias ? bias[o] : 0.0f);
                    }
                }
            }
          }
        });
        return 0;
    }
    // Other tile heights: eight rows at a time, one accumulator per row.
    sp::Pool::get().run((R + CH - 1) / CH, std::max(1, threads), [&](int64_t item, int) {
      for (int64_t rb = item * CH; rb < std::min(R, (item + 1) * CH); ++rb) {
        for (int64_t t = 0; t < T; ++t) {
            const float* x = X + t * n_in;
            for (int64_t r0 = 0; r0 < br; r0 += 8) {
                const int64_t nr = std::min<int64_t>(8, br - r0);
                __m256 acc[8];
                for (int q = 0; q < 8; ++q) acc[q] = _mm256_setzero_ps();
                for (int64_t b = crow[rb]; b < crow[rb + 1]; ++b) {
                    const int64_t c0 = (int64_t)col[b] * bc;
                    const float* tile = val + b * br * bc + r0 * bc;
                    for (int64_t s0 = 0; s0 < bc; s0 += 8) {
                        const int64_t w = std::min<int64_t>(8, bc - s0);
                        const int64_t in_x = std::max<int64_t>(0, std::min<int64_t>(w, n_in - c0 - s0));
                        const __m256 xs = in_x == 8 ? _mm256_loadu_ps(x + c0 + s0)
                                                    : _mm256_maskload_ps(x + c0 + s0, sp::mask8(in_x));
                        if (w == 8 && nr == 8) {
                            for (int q = 0; q < 8; ++q)
                                acc[q] = _mm256_fmadd_ps(_mm256_loadu_ps(tile + q * bc + s0), xs, acc[q]);
                        } else {
                            const __m256i mw = sp::mask8(w);
                            for (int64_t q = 0; q < nr; ++q)
                                acc[q] = _mm256_fmadd_ps(_mm256_maskload_ps(tile + q * bc + s0, mw), xs, acc[q]);
                        }
                    }
                }
                for (int64_t q = 0; q < nr; ++q) {
                    const int64_t o = rb * br + r0 + q;
                    if (o < n_out) Y[t * n_out + o] = sp::hsum(acc[q]) + (bias ? bias[o] : 0.0f);
                }
            }
        }
      }
    });
    return 0;
#else
    (void)X; (void)T; (void)n_in; (void)n_out; (void)br; (void)bc; (void)crow; (void)col; (void)val;
    (void)bias; (void)Y; (void)threads; (void)R;
    return 2;  // needs AVX2 or AVX-512: callers use the panel kernel
#endif
}

}  // extern "C"
