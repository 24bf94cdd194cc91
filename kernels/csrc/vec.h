// Small vector helpers shared by the CPU kernels: dot products and axpy with
// several independent accumulators (AVX-512, AVX2+FMA, or portable C++).
// Which one is compiled is the build's ISA variant (sparsify_kernels/native.py
// builds one library per variant and picks at run time).
#pragma once
#include <cstdint>
#include <cmath>
#include <cstring>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace sp {

// Software prefetch distance in floats (4 KB) for the long row streams (0: off);
// measured: +5-20% bandwidth on the FFN rows over the hardware prefetcher alone.
#ifndef SP_PREFETCH
#define SP_PREFETCH 1024
#endif
#ifndef SP_DOT4_PREFETCH
#define SP_DOT4_PREFETCH(p) (__builtin_prefetch((p), 0, 3), __builtin_prefetch((p) + 16, 0, 3))
#endif

// Far = true prefetches SP_PREFETCH floats past `a` (a row of a matrix streamed in order); rows read in a
// data-dependent order (active neurons, surviving inputs) take Far = false: there the prefetch past the row
// fetches the next rows' bytes, which are mostly never used.
template <bool Far = true>
static inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
    int64_t i = 0;
#if defined(__AVX512F__)
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    for (; i + 64 <= n; i += 64) {
#if SP_PREFETCH
        if (Far) {
            __builtin_prefetch(a + i + SP_PREFETCH, 0, 3);
            __builtin_prefetch(a + i + SP_PREFETCH + 16, 0, 3);
            __builtin_prefetch(a + i + SP_PREFETCH + 32, 0, 3);
            __builtin_prefetch(a + i + SP_PREFETCH + 48, 0, 3);
        }
#endif
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
        s2 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 32), _mm512_loadu_ps(b + i + 32), s2);
        s3 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 48), _mm512_loadu_ps(b + i + 48), s3);
    }
    for (; i + 16 <= n; i += 16) s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
    if (i < n) {
        __mmask16 m = (__mmask16)((1u << (n - i)) - 1u);
        s1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), s1);
        i = n;
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
#elif defined(__AVX2__)
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    for (; i + 32 <= n; i += 32) {
#if SP_PREFETCH
        if (Far) {
            __builtin_prefetch(a + i + SP_PREFETCH, 0, 3);
            __builtin_prefetch(a + i + SP_PREFETCH + 16, 0, 3);
        }
#endif
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
        s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), s2);
        s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), s3);
    }
    __m256 s = _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3));
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    float r = _mm_cvtss_f32(h);
    for (; i < n; ++i) r += a[i] * b[i];
    return r;
#else
    float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; ++k) s[k] += a[i + k] * b[i + k];
    float r = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
    for (; i < n; ++i) r += a[i] * b[i];
    return r;
#endif
}

// r[i] = a[i] . b over n floats, for four rows a[0..3] at once: b is loaded once
// for the four, and four streams in flight keep more memory requests
// outstanding than one (AVX-512 and AVX2; portable: four dot() calls).
// Far = false: rows in a data-dependent order (no prefetch past the rows' current position). Spill = false:
// the far prefetch stays inside each row (listed rows: past a row's end lie rows that are not read; measured
// on the Xeon, case-1 predictor at 90%: +4% on AVX-512, +5% on AVX2).
template <bool Far = true, bool Spill = true>
static inline void dot4(const float* const a[4], const float* __restrict b, int64_t n, float r[4]) {
#if defined(__AVX512F__)
    // Eight accumulators (two per row). Measured on a 2-core Xeon (Emerald Rapids): four dot()s one after
    // another stream the gate at ~2/3 of the bandwidth torch's GEMV reaches; four rows at once match it.
    __m512 s[8];
    for (int k = 0; k < 8; ++k) s[k] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
#if SP_PREFETCH
        if (Far && (Spill || i + SP_PREFETCH < n))
            for (int k = 0; k < 4; ++k) SP_DOT4_PREFETCH(a[k] + i + SP_PREFETCH);
#endif
        const __m512 b0 = _mm512_loadu_ps(b + i), b1 = _mm512_loadu_ps(b + i + 16);
        for (int k = 0; k < 4; ++k) {
            s[k] = _mm512_fmadd_ps(_mm512_loadu_ps(a[k] + i), b0, s[k]);
            s[4 + k] = _mm512_fmadd_ps(_mm512_loadu_ps(a[k] + i + 16), b1, s[4 + k]);
        }
    }
    if (i + 16 <= n) {
        const __m512 b0 = _mm512_loadu_ps(b + i);
        for (int k = 0; k < 4; ++k) s[k] = _mm512_fmadd_ps(_mm512_loadu_ps(a[k] + i), b0, s[k]);
        i += 16;
    }
    if (i < n) {
        const __mmask16 m = (__mmask16)((1u << (n - i)) - 1u);
        const __m512 b1 = _mm512_maskz_loadu_ps(m, b + i);
        for (int k = 0; k < 4; ++k) s[4 + k] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a[k] + i), b1, s[4 + k]);
    }
    for (int k = 0; k < 4; ++k) r[k] = _mm512_reduce_add_ps(_mm512_add_ps(s[k], s[4 + k]));
#elif defined(__AVX2__)
    __m256 s[8];
    for (int k = 0; k < 8; ++k) s[k] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
#if SP_PREFETCH
        // Both cache lines of each row's next 32 floats (one line per 32 floats, as before, left half of every
        // row to the hardware prefetcher: case-1 FFN gate 1.34 -> 1.47x dense at 50%, AVX2 vs AVX2 torch, Xeon).
        if (Far && (i & 31) == 0 && (Spill || i + SP_PREFETCH < n))
            for (int k = 0; k < 4; ++k) SP_DOT4_PREFETCH(a[k] + i + SP_PREFETCH);
#endif
        const __m256 b0 = _mm256_loadu_ps(b + i), b1 = _mm256_loadu_ps(b + i + 8);
        for (int k = 0; k < 4; ++k) {
            s[k] = _mm256_fmadd_ps(_mm256_loadu_ps(a[k] + i), b0, s[k]);
            s[4 + k] = _mm256_fmadd_ps(_mm256_loadu_ps(a[k] + i + 8), b1, s[4 + k]);
        }
    }
    for (int k = 0; k < 4; ++k) {
        __m256 t = _mm256_add_ps(s[k], s[4 + k]);
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        h = _mm_add_ss(h, _mm_movehdup_ps(h));
        float v = _mm_cvtss_f32(h);
        for (int64_t j = i; j < n; ++j) v += a[k][j] * b[j];
        r[k] = v;
    }
#else
    for (int k = 0; k < 4; ++k) r[k] = dot<Far>(a[k], b, n);
#endif
}

// y[0:n] += a * x[0:n]; Far as for dot().
template <bool Far = true>
static inline void axpy(float* __restrict y, float a, const float* __restrict x, int64_t n) {
    int64_t i = 0;
#if defined(__AVX512F__)
    __m512 va = _mm512_set1_ps(a);
    for (; i + 32 <= n; i += 32) {
#if SP_PREFETCH
        if (Far) {
            __builtin_prefetch(x + i + SP_PREFETCH, 0, 3);
            __builtin_prefetch(x + i + SP_PREFETCH + 16, 0, 3);
        }
#endif
        _mm512_storeu_ps(y + i, _mm512_fmadd_ps(va, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
        _mm512_storeu_ps(y + i + 16, _mm512_fmadd_ps(va, _mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(y + i + 16)));
    }
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(y + i, _mm512_fmadd_ps(va, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
    if (i < n) {
        __mmask16 m = (__mmask16)((1u << (n - i)) - 1u);
        _mm512_mask_storeu_ps(y + i, m, _mm512_fmadd_ps(va, _mm512_maskz_loadu_ps(m, x + i), _mm512_maskz_loadu_ps(m, y + i)));
    }
#elif defined(__AVX2__)
    __m256 va = _mm256_set1_ps(a);
    for (; i + 32 <= n; i += 32) {
#if SP_PREFETCH
        if (Far) {
            __builtin_prefetch(x + i + SP_PREFETCH, 0, 3);
            __builtin_prefetch(x + i + SP_PREFETCH + 16, 0, 3);
        }
#endif
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
        _mm256_storeu_ps(y + i + 8, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i + 8), _mm256_loadu_ps(y + i + 8)));
        _mm256_storeu_ps(y + i + 16, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i + 16), _mm256_loadu_ps(y + i + 16)));
        _mm256_storeu_ps(y + i + 24, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i + 24), _mm256_loadu_ps(y + i + 24)));
    }
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; ++i) y[i] += a * x[i];
#else
    for (; i < n; ++i) y[i] += a * x[i];
#endif
}

// y[0:n] += g[0] x[0][0:n] + g[1] x[1][0:n] + g[2] x[2][0:n] + g[3] x[3][0:n] (in that order, per element):
// four rows read at once and y loaded and stored once for the four (rows in a data-dependent order: no far
// prefetch). Measured on a 2-core Xeon (Emerald Rapids), MoE FFN 4096 x 11008 at 75% skipped: the down rows
// one axpy at a time kept the whole FFN at ~75% of torch's GEMV bandwidth.
static inline void axpy4(float* __restrict y, const float g[4], const float* const x[4], int64_t n) {
    int64_t i = 0;
#if defined(__AVX512F__)
    const __m512 g0 = _mm512_set1_ps(g[0]), g1 = _mm512_set1_ps(g[1]), g2 = _mm512_set1_ps(g[2]),
                 g3 = _mm512_set1_ps(g[3]);
    for (; i + 16 <= n; i += 16) {
        __m512 v = _mm512_fmadd_ps(g0, _mm512_loadu_ps(x[0] + i), _mm512_loadu_ps(y + i));
        v = _mm512_fmadd_ps(g1, _mm512_loadu_ps(x[1] + i), v);
        v = _mm512_fmadd_ps(g2, _mm512_loadu_ps(x[2] + i), v);
        _mm512_storeu_ps(y + i, _mm512_fmadd_ps(g3, _mm512_loadu_ps(x[3] + i), v));
    }
    if (i < n) {
        const __mmask16 m = (__mmask16)((1u << (n - i)) - 1u);
        __m512 v = _mm512_fmadd_ps(g0, _mm512_maskz_loadu_ps(m, x[0] + i), _mm512_maskz_loadu_ps(m, y + i));
        v = _mm512_fmadd_ps(g1, _mm512_maskz_loadu_ps(m, x[1] + i), v);
        v = _mm512_fmadd_ps(g2, _mm512_maskz_loadu_ps(m, x[2] + i), v);
        _mm512_mask_storeu_ps(y + i, m, _mm512_fmadd_ps(g3, _mm512_maskz_loadu_ps(m, x[3] + i), v));
        i = n;
    }
#elif defined(__AVX2__)
    const __m256 g0 = _mm256_set1_ps(g[0]), g1 = _mm256_set1_ps(g[1]), g2 = _mm256_set1_ps(g[2]),
                 g3 = _mm256_set1_ps(g[3]);
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_fmadd_ps(g0, _mm256_loadu_ps(x[0] + i), _mm256_loadu_ps(y + i));
        v = _mm256_fmadd_ps(g1, _mm256_loadu_ps(x[1] + i), v);
        v = _mm256_fmadd_ps(g2, _mm256_loadu_ps(x[2] + i), v);
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(g3, _mm256_loadu_ps(x[3] + i), v));
    }
#endif
    for (; i < n; ++i) y[i] = ((y[i] + g[0] * x[0][i]) + g[1] * x[1][i] + g[2] * x[2][i]) + g[3] * x[3][i];
}

// The float whose upper 16 bits are h and lower 16 bits zero: a weight truncated to its sign, exponent and
// top 7 mantissa bits (bfloat16 by truncation). |w - hi(w)| < 2^-7 |w|.
static inline float hi_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

// x reordered for dot_hi4 and dot4_planes (bp, n floats): the order in which the 16-bit unpacks (lane-wise,
// zeros or a lower-half row under a row of upper halves) widen 16-bit halves into floats. AVX-512: within
// each block of 32, entries 0-3, 8-11, 16-19, 24-27, then 4-7, 12-15, 20-23, 28-31; AVX2: within each block
// of 16, 0-3, 8-11, 4-7, 12-15. Elsewhere (and past the last whole block) a plain copy.
static inline void hi_order(const float* __restrict b, int64_t n, float* __restrict bp) {
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 32 <= n; i += 32)
        for (int q = 0; q < 4; ++q)
            for (int k = 0; k < 4; ++k) {
                bp[i + 4 * q + k] = b[i + 8 * q + k];            // unpacklo: words 0-3 of each 128-bit lane
                bp[i + 16 + 4 * q + k] = b[i + 8 * q + 4 + k];   // unpackhi: words 4-7
            }
#elif defined(__AVX2__)
    static const int src[16] = {0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15};
    for (; i + 16 <= n; i += 16)
        for (int k = 0; k < 16; ++k) bp[i + k] = b[i + src[k]];
#endif
    for (; i < n; ++i) bp[i] = b[i];
}

// r[k] = hi(a[k]) . b for four rows of high halves (uint16, see hi_float): half the bytes of the fp32 rows.
// bp is b in hi_order. The summation order is free here (callers bound the rounding error): widening by
// unpacking zeros under each 16-bit half takes one instruction per 16 weights on AVX-512 (8 on AVX2; no
// shift), which keeps the pass memory-bound (AVX2 code, in L3: 33 GB/s of halves per thread). The AVX-512
// steps (this build ran the AVX2 ones before) and dot4_planes' unpacks, measured on the Xeon (`kernel_ab
// planes|screened`, one process, 15-20 rounds, 30 / 50 / 70 / 90%): planes 1.19 / 1.39 / 1.87 / 3.16x ->
// 1.29 / 1.44 / 1.95 / 3.24x dense, screened 1.42 / 2.88x -> 1.46 / 2.97x at 50 / 90%; the AVX2 build's
// planes (unpacks only, AVX2-capped torch) 1.23 / 1.40 / 1.75 / 3.13x -> 1.20 / 1.52 / 1.82 / 3.28x.
static inline void dot_hi4(const uint16_t* const a[4], const float* __restrict bp, int64_t n, float r[4]) {
    int64_t i = 0;
    float tail[4] = {0, 0, 0, 0};
#if defined(__AVX512F__)
    // 32 halves per row per step: one 64-byte load, two unpacks, two multiply-adds (the AVX2 steps below
    // take twice the instructions per byte).
    __m512 s[8];
    for (int k = 0; k < 8; ++k) s[k] = _mm512_setzero_ps();
    const __m512i z = _mm512_setzero_si512();
    for (; i + 32 <= n; i += 32) {
#if SP_PREFETCH
        for (int k = 0; k < 4; ++k) __builtin_prefetch(a[k] + i + 2 * SP_PREFETCH, 0, 3);  // 4 KB ahead
#endif
        const __m512 b0 = _mm512_loadu_ps(bp + i), b1 = _mm512_loadu_ps(bp + i + 16);
        for (int k = 0; k < 4; ++k) {
            const __m512i h = _mm512_loadu_si512((const void*)(a[k] + i));
            s[k] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_unpacklo_epi16(z, h)), b0, s[k]);
            s[4 + k] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_unpackhi_epi16(z, h)), b1, s[4 + k]);
        }
    }
    for (int k = 0; k < 4; ++k) tail[k] = _mm512_reduce_add_ps(_mm512_add_ps(s[k], s[4 + k]));
#elif defined(__AVX2__)
    __m256 s[8];
    for (int k = 0; k < 8; ++k) s[k] = _mm256_setzero_ps();
    const __m256i z = _mm256_setzero_si256();
    for (; i + 16 <= n; i += 16) {
#if SP_PREFETCH
        if ((i & 31) == 0)
            for (int k = 0; k < 4; ++k) __builtin_prefetch(a[k] + i + 2 * SP_PREFETCH, 0, 3);  // 4 KB ahead
#endif
        const __m256 b0 = _mm256_loadu_ps(bp + i), b1 = _mm256_loadu_ps(bp + i + 8);
        for (int k = 0; k < 4; ++k) {
            const __m256i h = _mm256_loadu_si256((const __m256i*)(a[k] + i));
            s[k] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(z, h)), b0, s[k]);
            s[4 + k] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(z, h)), b1, s[4 + k]);
        }
    }
    for (int k = 0; k < 4; ++k) {
        __m256 t = _mm256_add_ps(s[k], s[4 + k]);
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        h = _mm_add_ss(h, _mm_movehdup_ps(h));
        tail[k] = _mm_cvtss_f32(h);
    }
#endif
    for (int k = 0; k < 4; ++k) {
        float v = tail[k];
        for (int64_t j = i; j < n; ++j) v += hi_float(a[k][j]) * bp[j];
        r[k] = v;
    }
}

// hi(a) . b for one row (see dot_hi4; b in plain order).
static inline float dot_hi(const uint16_t* __restrict a, const float* __restrict b, int64_t n) {
    float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; ++k) s[k] += hi_float(a[i + k]) * b[i + k];
    float r = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
    for (; i < n; ++i) r += hi_float(a[i]) * b[i];
    return r;
}

// One row's result of dot4 above, bit for bit (the same accumulators and order), for a row that must
// agree exactly with the rows dot4 computes.
static inline float dot_as_dot4(const float* __restrict a, const float* __restrict b, int64_t n) {
#if defined(__AVX512F__)
    __m512 s0 = _mm512_setzero_ps(), s1 = s0;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
    }
    if (i + 16 <= n) {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
        i += 16;
    }
    if (i < n) {
        const __mmask16 m = (__mmask16)((1u << (n - i)) - 1u);
        s1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), s1);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
#elif defined(__AVX2__)
    __m256 s0 = _mm256_setzero_ps(), s1 = s0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    __m256 t = _mm256_add_ps(s0, s1);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    float v = _mm_cvtss_f32(h);
    for (int64_t j = i; j < n; ++j) v += a[j] * b[j];
    return v;
#else
    return dot<false>(a, b, n);  // the prefetch does not change the sums
#endif
}

// The fp32 weights whose upper 16 bits are h[0..n) and lower 16 bits l[0..n) (a row stored as two 16-bit
// planes), times b, for four rows: dot4's accumulators and order, so r[k] is bit for bit dot4 of the fp32 rows.
// The lo planes are rows in a data-dependent order: prefetched ahead inside each row only.
// bp: b in hi_order. The unpacks of a lower-half row under an upper-half row give the weights in hi_order
// (AVX-512: one instruction per 16 weights, against two widenings, a shift and an or), each accumulator
// lane summing the same weights in the same order as dot4's lane: the lanes are put back in dot4's places
// once, after the loop, so the bits are dot4's.
static inline void dot4_planes(const uint16_t* const h[4], const uint16_t* const l[4], const float* __restrict b,
                               const float* __restrict bp, int64_t n, float r[4]) {
#if defined(__AVX512F__)
    auto w16 = [](const uint16_t* hp, const uint16_t* lp) {
        const __m512i hv = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)hp));
        const __m512i lv = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)lp));
        return _mm512_castsi512_ps(_mm512_or_si512(_mm512_slli_epi32(hv, 16), lv));
    };
    __m512 s[8];
    for (int k = 0; k < 8; ++k) s[k] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
#if SP_PREFETCH
        if (i + 2 * SP_PREFETCH < n)
            for (int k = 0; k < 4; ++k) __builtin_prefetch(l[k] + i + 2 * SP_PREFETCH, 0, 3);
#endif
        const __m512 b0 = _mm512_loadu_ps(bp + i), b1 = _mm512_loadu_ps(bp + i + 16);
        for (int k = 0; k < 4; ++k) {
            const __m512i hv = _mm512_loadu_si512((const void*)(h[k] + i));
            const __m512i lv = _mm512_loadu_si512((const void*)(l[k] + i));
            s[k] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_unpacklo_epi16(lv, hv)), b0, s[k]);
            s[4 + k] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_unpackhi_epi16(lv, hv)), b1, s[4 + k]);
        }
    }
    // s[k] holds weights 0-3, 8-11, 16-19, 24-27 of each block, s[4 + k] 4-7, 12-15, 20-23, 28-31: dot4's
    // first accumulator takes 0-15, its second 16-31.
    const __m512i lo_idx = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i hi_idx = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    for (int k = 0; k < 4; ++k) {
        const __m512 a = s[k], c = s[4 + k];
        s[k] = _mm512_permutex2var_ps(a, lo_idx, c);
        s[4 + k] = _mm512_permutex2var_ps(a, hi_idx, c);
    }
    if (i + 16 <= n) {
        const __m512 b0 = _mm512_loadu_ps(b + i);
        for (int k = 0; k < 4; ++k) s[k] = _mm512_fmadd_ps(w16(h[k] + i, l[k] + i), b0, s[k]);
        i += 16;
    }
    if (i < n) {
        const __mmask16 m = (__mmask16)((1u << (n - i)) - 1u);
        const __m512 b1 = _mm512_maskz_loadu_ps(m, b + i);
        for (int k = 0; k < 4; ++k) {
            const __m512i hv = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, h[k] + i));
            const __m512i lv = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, l[k] + i));
            const __m512 w = _mm512_castsi512_ps(_mm512_or_si512(_mm512_slli_epi32(hv, 16), lv));
            s[4 + k] = _mm512_fmadd_ps(w, b1, s[4 + k]);
        }
    }
    for (int k = 0; k < 4; ++k) r[k] = _mm512_reduce_add_ps(_mm512_add_ps(s[k], s[4 + k]));
#elif defined(__AVX2__)
    __m256 s[8];
    for (int k = 0; k < 8; ++k) s[k] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
#if SP_PREFETCH
        if ((i & 31) == 0 && i + 2 * SP_PREFETCH < n)
            for (int k = 0; k < 4; ++k) __builtin_prefetch(l[k] + i + 2 * SP_PREFETCH, 0, 3);
#endif
        const __m256 b0 = _mm256_loadu_ps(bp + i), b1 = _mm256_loadu_ps(bp + i + 8);
        for (int k = 0; k < 4; ++k) {
            const __m256i hv = _mm256_loadu_si256((const __m256i*)(h[k] + i));
            const __m256i lv = _mm256_loadu_si256((const __m256i*)(l[k] + i));
            s[k] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(lv, hv)), b0, s[k]);
            s[4 + k] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(lv, hv)), b1, s[4 + k]);
        }
    }
    // s[k] holds weights 0-3, 8-11 of each block, s[4 + k] 4-7, 12-15: dot4's take 0-7 and 8-15
    for (int k = 0; k < 4; ++k) {
        const __m256 a = s[k], c = s[4 + k];
        s[k] = _mm256_permute2f128_ps(a, c, 0x20);
        s[4 + k] = _mm256_permute2f128_ps(a, c, 0x31);
    }
    for (int k = 0; k < 4; ++k) {
        __m256 t = _mm256_add_ps(s[k], s[4 + k]);
        __m128 hh = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
        hh = _mm_add_ps(hh, _mm_movehl_ps(hh, hh));
        hh = _mm_add_ss(hh, _mm_movehdup_ps(hh));
        float v = _mm_cvtss_f32(hh);
        for (int64_t j = i; j < n; ++j) {
            const uint32_t u = ((uint32_t)h[k][j] << 16) | l[k][j];
            float w;
            std::memcpy(&w, &u, sizeof w);
            v += w * b[j];
        }
        r[k] = v;
    }
#else
    // portable: dot()'s eight partial sums over the reassembled weights
    for (int k = 0; k < 4; ++k) {
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t i = 0;
        auto w = [&](int64_t j) {
            const uint32_t u = ((uint32_t)h[k][j] << 16) | l[k][j];
            float f;
            std::memcpy(&f, &u, sizeof f);
            return f;
        };
        for (; i + 8 <= n; i += 8)
            for (int q = 0; q < 8; ++q) acc[q] += w(i + q) * b[i + q];
        float v = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
        for (; i < n; ++i) v += w(i) * b[i];
        r[k] = v;
    }
#endif
}

#if defined(__AVX2__) && !defined(__AVX512F__)
// AVX2 helpers: the first n (0..8) lanes set, and a horizontal sum.
static inline __m256i mask8(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n < 0 ? 0 : n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
static inline float hsum(__m256 s) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}
#endif

}  // namespace sp
