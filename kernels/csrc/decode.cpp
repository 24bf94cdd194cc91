// One greedy decode step of a llama-style decoder, natively: every layer, the
// final norm, the LM head and the argmax in one call (one new token per
// sequence, B sequences at the same position).
//
// Why: at batch 1 a small model's step is a few hundred small GEMVs and
// element-wise ops; through torch each costs a dispatch and a thread-pool
// fork-join that, on a 2-core CPU, take longer than streaming its weights.
// Here each GEMV reads its weight once for all B tokens, rows split across
// the pool (pool.h) in fixed blocks, each row's dot product computed by one
// thread (so the result does not depend on the thread count), and the small
// ops (RMSNorm, RoPE, the cache write, residuals) run on the calling thread.
//
// Per layer (HF LlamaDecoderLayer, eval):
//   h = RMSNorm(x; w1, eps1)            fp32 statistics, as LlamaRMSNorm
//   q, k, v = h Wq^T + bq, h Wk^T + bk, h Wv^T + bv       (one fused pass)
//   q, k = RoPE(q, k) at `pos`          rotate_half layout, the model's cos/sin
//   K[pos], V[pos] = k, v               the caller's static cache
//   a = softmax(q K^T / sqrt(hd)) V     per head; GQA: head h reads kv head h / (H / KV)
//   x = x + a Wo^T + bo
//   h = RMSNorm(x; w2, eps2)
//   (TEAL: any projection may zero its input entries below its threshold first, reading only the
//    weight rows, stored [in, out], of the entries that survive; ffn.cpp's sparse-input kernel)
//   x = x + FFN(h)                      dense gated (gate/up fused, then down), or
//                                        the activation-sparse kernel of ffn.cpp (sp_ffn_decode_f32 /
//                                        sp_ffn_predicted_f32): gate for all neurons, up/down for active ones
// then logits = RMSNorm(x) Wh^T + bh and next = argmax (banned ids excluded).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>
#include "pool.h"
#include "vec.h"

// The activation-sparse FFN kernels (ffn.cpp, same library).
extern "C" int sp_ffn_decode_f32(const float* x, int64_t T, int64_t d, const float* w_in, const float* b_in,
                                 const float* w_up, const float* b_up, const float* w_outT, const float* b_out,
                                 const int64_t* ranges, int64_t n_ranges, int act, float threshold, float cut,
                                 float* y, int threads);
extern "C" int sp_ffn_predicted_f32(const float* x, int64_t T, int64_t d, const float* w_in, const float* b_in,
                                    const float* w_up, const float* b_up, const float* w_outT, const float* b_out,
                                    int64_t dff, int act, float threshold, float cut, const float* p_in,
                                    const float* p_out, const float* p_bias, int64_t r, float p_threshold, float* y,
                                    int64_t* n_selected, int threads);

extern "C" int sp_sparse_input_linear_f32(const float* x1, int64_t T, int64_t n_in, const float* wT,
                                          const float* b, int64_t n_out, float* y, int threads);

namespace {

enum FfnKind { DENSE = 0, SPARSE = 1, PREDICTED = 2 };
enum Act { RELU = 0, SILU = 1, GELU = 2, GELU_TANH = 3 };
constexpr int kUpReLU = 16;  // as ffn.cpp: ReLU on the up value too (dReLU)
constexpr int64_t kMaxSparseTokens = 16;  // ffn.cpp's kMaxTokens

// The activations of ffn.cpp (same formulas), for the dense FFN.
inline float activate(int act, float v, float threshold, float cut) {
    float y;
    switch (act) {
        case RELU: y = v >= threshold ? v : 0.0f; break;  // FATReLU; threshold 0 is ReLU
        case SILU: y = v / (1.0f + std::exp(-v)); break;
        case GELU: y = 0.5f * v * (1.0f + std::erf(v * 0.70710678118654752f)); break;
        default: {
            float u = 0.79788456080286536f * (v + 0.044715f * v * v * v);
            y = 0.5f * v * (1.0f + std::tanh(u));
        }
    }
    return std::fabs(y) >= cut ? y : 0.0f;
}

// r[k] = a[k] . b for four rows.
inline void dot4(const float* const a[4], const float* __restrict b, int64_t n, float r[4]) {
#if defined(__AVX512F__)
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 x = _mm512_loadu_ps(b + i);
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a[0] + i), x, s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a[1] + i), x, s1);
        s2 = _mm512_fmadd_ps(_mm512_loadu_ps(a[2] + i), x, s2);
        s3 = _mm512_fmadd_ps(_mm512_loadu_ps(a[3] + i), x, s3);
    }
    if (i < n) {
        const __mmask16 m = (__mmask16)((1u << (n - i)) - 1u);
        const __m512 x = _mm512_maskz_loadu_ps(m, b + i);
        s0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a[0] + i), x, s0);
        s1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a[1] + i), x, s1);
        s2 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a[2] + i), x, s2);
        s3 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a[3] + i), x, s3);
    }
    r[0] = _mm512_reduce_add_ps(s0);
    r[1] = _mm512_reduce_add_ps(s1);
    r[2] = _mm512_reduce_add_ps(s2);
    r[3] = _mm512_reduce_add_ps(s3);
#else
    sp::dot4(a, b, n, r);  // AVX2: eight accumulators over four rows; portable: four dot()s
#endif
}

// One row of dot4 above, bit for bit (the same accumulation), for rows recomputed out of order.
inline float dot4_row(const float* __restrict a, const float* __restrict b, int64_t n) {
#if defined(__AVX512F__)
    __m512 s = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) s = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s);
    if (i < n) {
        const __mmask16 m = (__mmask16)((1u << (n - i)) - 1u);
        s = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), s);
    }
    return _mm512_reduce_add_ps(s);
#else
    return sp::dot_as_dot4(a, b, n);
#endif
}

// One weight matrix of a fused GEMV: y[b, r] (+)= W[r] . x[b] + bias[r].
struct Mat {
    const float* w;
    const float* bias;  // may be null
    int64_t rows;
    float* y;
    int64_t y_stride;
    bool add;  // accumulate into y (a residual) instead of writing it
};

// Blocks of rows of gemv(): enough items for dynamic balance, few enough that claiming one costs nothing.
inline int64_t gemv_block(int64_t total_rows) { return total_rows >= 8192 ? 64 : 16; }

// Row r of a lone matrix of `rows` rows . x, plus bias: the bits gemv() computes for it (dot4 for the rows of
// a block's groups of four, dot() for the block's last rows).
inline float gemv_row(const float* w, const float* bias, int64_t rows, int64_t r, const float* x, int64_t n) {
    const int64_t block = gemv_block(rows), r0 = r / block * block, r1 = std::min(rows, r0 + block);
    const float v = r - r0 < (r1 - r0) / 4 * 4 ? dot4_row(w + r * n, x, n) : sp::dot(w + r * n, x, n);
    return v + (bias ? bias[r] : 0.0f);
}

// Every row of every matrix in `mats` against the B vectors x[b] (stride x_stride, length n), in
// blocks of rows spread over the pool; each block's rows are read from memory once for all B.
void gemv(const Mat* mats, int n_mats, const float* x, int64_t x_stride, int64_t B, int64_t n, int threads) {
    int64_t total = 0;
    for (int m = 0; m < n_mats; ++m) total += mats[m].rows;
    const int64_t block = gemv_block(total);
    int64_t starts[8], n_blocks = 0;
    for (int m = 0; m < n_mats; ++m) {
        starts[m] = n_blocks;
        n_blocks += (mats[m].rows + block - 1) / block;
    }
    sp::Pool::get().run(n_blocks, threads, [&](int64_t item, int) {
        int m = n_mats - 1;
        while (starts[m] > item) --m;
        const Mat& M = mats[m];
        const int64_t r0 = (item - starts[m]) * block, r1 = std::min(M.rows, r0 + block);
        int64_t r = r0;
        for (; r + 4 <= r1; r += 4) {
            const float* rows[4] = {M.w + r * n, M.w + (r + 1) * n, M.w + (r + 2) * n, M.w + (r + 3) * n};
            for (int64_t b = 0; b < B; ++b) {
                float v[4];
                dot4(rows, x + b * x_stride, n, v);
                float* y = M.y + b * M.y_stride + r;
                for (int k = 0; k < 4; ++k) {
                    const float val = v[k] + (M.bias ? M.bias[r + k] : 0.0f);
                    y[k] = M.add ? y[k] + val : val;
                }
            }
        }
        for (; r < r1; ++r)
            for (int64_t b = 0; b < B; ++b) {
                const float val = sp::dot(M.w + r * n, x + b * x_stride, n) + (M.bias ? M.bias[r] : 0.0f);
                float* y = M.y + b * M.y_stride + r;
                *y = M.add ? *y + val : val;
            }
    });
}

// LlamaRMSNorm: y = w * (x * rsqrt(mean(x^2) + eps)), statistics in fp32.
void rms_norm(const float* x, const float* w, float eps, int64_t B, int64_t d, float* y) {
    for (int64_t b = 0; b < B; ++b) {
        const float* xb = x + b * d;
        const float inv = 1.0f / std::sqrt(sp::dot(xb, xb, d) / (float)d + eps);
        for (int64_t i = 0; i < d; ++i) y[b * d + i] = w[i] * (xb[i] * inv);
    }
}

// HF apply_rotary_pos_emb on one head vector: x * cos + rotate_half(x) * sin.
void rope(float* x, const float* cos, const float* sin, int64_t hd) {
    const int64_t half = hd / 2;
    for (int64_t i = 0; i < half; ++i) {
        const float a = x[i], b = x[i + half];
        x[i] = a * cos[i] - b * sin[i];
        x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

struct Layer {
    const float *ln1, *ln2, *wq, *bq, *wk, *bk, *wv, *bv, *wo, *bo;
    const float *w_gate, *b_gate, *w_up, *b_up, *w_down, *b_down, *p_in, *p_out, *p_bias;
    float eps1, eps2, threshold, cut, p_threshold;
    int kind, act;
    int64_t p_rank;
    // TEAL: a projection whose input_t[p] >= 0 (p: q k v o gate up down) zeroes its input entries with
    // |x| < input_t[p] and stores its weight transposed [in, out]; -1: a plain [out, in] weight.
    float input_t[7] = {-1.0f, -1.0f, -1.0f, -1.0f, -1.0f, -1.0f, -1.0f};
    bool input_sparse() const {
        for (float t : input_t)
            if (t >= 0.0f) return true;
        return false;
    }
};

enum Proj { PQ = 0, PK, PV, PO, PGATE, PUP, PDOWN };

struct Decoder {
    int64_t n_layers, d, heads, kv_heads, head_dim, dff, vocab;
    const float *norm, *head_w, *head_b;
    float eps;
    std::vector<Layer> layers;
    std::vector<float> scratch;
    std::vector<float> sparse_in, sparse_out;  // the thresholded input and the output of an input-sparse projection
    // Greedy-only steps (no logits asked for): the LM head's screen (see sp_decoder_set_head_screen), or null.
    const uint16_t* head_hi = nullptr;
    const float* head_err = nullptr;
    std::vector<float> head_buf;    // [B, vocab]: screened values, or the logits nobody asked for
    std::vector<uint8_t> head_ban;  // [vocab]: banned ids of the current call
};

// next[b] = argmax of the head's logits for h[b] (banned ids excluded; the lowest id among equal maxima),
// exactly as gemv + argmax would choose, reading the head's 16-bit high halves for every row and the fp32
// rows only of the candidates: a row whose upper bound (screened value + ||h|| err[j]) is below the best
// lower bound cannot be the maximum. Candidates are computed with gemv's bits (gemv_row), so the winner and
// its ties are decided on the same floats as the full GEMV.
void screened_argmax(Decoder* dec, const float* h, int64_t B, const int64_t* banned, int64_t n_banned,
                     int64_t* next, int threads) {
    const int64_t V = dec->vocab, d = dec->d;
    if ((int64_t)dec->head_buf.size() < B * V) dec->head_buf.resize(B * V);
    float* sv = dec->head_buf.data();
    std::vector<float> hp(B * d);
    std::vector<double> xn(B);
    for (int64_t b = 0; b < B; ++b) {
        sp::hi_order(h + b * d, d, hp.data() + b * d);
        double ss = 0.0;
        for (int64_t i = 0; i < d; ++i) ss += (double)h[b * d + i] * (double)h[b * d + i];
        xn[b] = std::sqrt(ss) * (1.0 + 0x1p-40);
    }
    const float* bias = dec->head_b;
    const int64_t block = 64, n_blocks = (V + block - 1) / block;
    sp::Pool::get().run(n_blocks, threads, [&](int64_t item, int) {
        const int64_t r1 = std::min(V, (item + 1) * block);
        int64_t r = item * block;
        for (; r + 4 <= r1; r += 4) {
            const uint16_t* rows[4] = {dec->head_hi + r * d, dec->head_hi + (r + 1) * d, dec->head_hi + (r + 2) * d,
                                       dec->head_hi + (r + 3) * d};
            for (int64_t b = 0; b < B; ++b) {
                float v[4];
                sp::dot_hi4(rows, hp.data() + b * d, d, v);
                for (int k = 0; k < 4; ++k) sv[b * V + r + k] = v[k] + (bias ? bias[r + k] : 0.0f);
            }
        }
        for (; r < r1; ++r)
            for (int64_t b = 0; b < B; ++b)
                sv[b * V + r] = sp::dot_hi(dec->head_hi + r * d, h + b * d, d) + (bias ? bias[r] : 0.0f);
    });
    if ((int64_t)dec->head_ban.size() < V) dec->head_ban.assign(V, 0);
    for (int64_t j = 0; j < n_banned; ++j)
        if (banned[j] >= 0 && banned[j] < V) dec->head_ban[banned[j]] = 1;
    for (int64_t b = 0; b < B; ++b) {
        const float* s = sv + b * V;
        // |exact - s| <= ||h|| err[j] (the screen) plus the fp32 roundings of the two bias additions: padded.
        auto slack = [&](int64_t j) {
            const double e = xn[b] * (double)dec->head_err[j];
            return e + (std::fabs((double)s[j]) + 2.0 * std::fabs(bias ? (double)bias[j] : 0.0) + e) * 0x1p-20;
        };
        double best_low = -std::numeric_limits<double>::infinity();
        for (int64_t j = 0; j < V; ++j)
            if (!dec->head_ban[j]) best_low = std::max(best_low, (double)s[j] - slack(j));
        int64_t best = -1;
        float best_v = 0.0f;
        for (int64_t j = 0; j < V; ++j) {
            if (dec->head_ban[j] || !((double)s[j] + slack(j) >= best_low)) continue;
            const float v = gemv_row(dec->head_w, bias, V, j, h + b * d, d);
            if (best < 0 || v > best_v) best = j, best_v = v;
        }
        next[b] = best < 0 ? 0 : best;
    }
    for (int64_t j = 0; j < n_banned; ++j)
        if (banned[j] >= 0 && banned[j] < V) dec->head_ban[banned[j]] = 0;
}

// y[b] (+)= s(x[b]) WT + bias with s(v) = v where |v| >= t else 0 (TEAL's rule, as zero_small_inputs):
// the weight rows of the zeroed inputs are never read (ffn.cpp's sparse-input kernel, the same one the
// torch path's InputSparseLinear calls, so both paths compute the same sums).
int input_sparse_proj(Decoder* dec, const float* WT, const float* bias, float t, const float* x, int64_t x_stride,
                      int64_t B, int64_t n_in, int64_t n_out, float* y, int64_t y_stride, bool add, int threads) {
    if ((int64_t)dec->sparse_in.size() < B * n_in) dec->sparse_in.resize(B * n_in);
    if ((int64_t)dec->sparse_out.size() < B * n_out) dec->sparse_out.resize(B * n_out);
    float* xs = dec->sparse_in.data();
    float* ys = dec->sparse_out.data();
    for (int64_t b = 0; b < B; ++b)
        for (int64_t i = 0; i < n_in; ++i) {
            const float v = x[b * x_stride + i];
            xs[b * n_in + i] = std::fabs(v) >= t ? v : 0.0f;
        }
    const int rc = sp_sparse_input_linear_f32(xs, B, n_in, WT, bias, n_out, ys, threads);
    if (rc != 0) return rc;
    for (int64_t b = 0; b < B; ++b) {
        float* yb = y + b * y_stride;
        const float* src = ys + b * n_out;
        if (add)
            for (int64_t r = 0; r < n_out; ++r) yb[r] += src[r];
        else
            std::memcpy(yb, src, n_out * sizeof(float));
    }
    return 0;
}

// The projections of one input (q/k/v, or gate/up), each dense or input-sparse: the dense ones in one fused
// gemv pass, the input-sparse ones one by one.
int project(Decoder* dec, const Layer& L, const int* which, const Mat* mats, int n, const float* x, int64_t B,
            int64_t n_in, int threads) {
    Mat dense[8];
    int n_dense = 0;
    for (int m = 0; m < n; ++m)
        if (L.input_t[which[m]] < 0.0f) dense[n_dense++] = mats[m];
    if (n_dense) gemv(dense, n_dense, x, n_in, B, n_in, threads);
    for (int m = 0; m < n; ++m) {
        if (L.input_t[which[m]] < 0.0f) continue;
        const Mat& M = mats[m];
        const int rc = input_sparse_proj(dec, M.w, M.bias, L.input_t[which[m]], x, n_in, B, n_in, M.rows, M.y,
                                         M.y_stride, M.add, threads);
        if (rc != 0) return rc;
    }
    return 0;
}

using Clock = std::chrono::steady_clock;
inline double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

}  // namespace

extern "C" {

// A decoder of n_layers llama layers (dimensions as named) whose final RMSNorm is `norm` (eps) and whose LM
// head is head_w [vocab, d] (+ head_b, may be null). Weights are borrowed: the caller keeps them alive and
// unchanged in place while the decoder is used. Returns null for a bad dimension.
void* sp_decoder_new(int64_t n_layers, int64_t d, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t dff,
                     int64_t vocab, const float* norm, float eps, const float* head_w, const float* head_b) {
    if (n_layers < 1 || d < 1 || heads < 1 || kv_heads < 1 || heads % kv_heads || head_dim < 2 || head_dim % 2 ||
        dff < 1 || vocab < 1)
        return nullptr;
    auto* dec = new Decoder{n_layers, d, heads, kv_heads, head_dim, dff, vocab, norm, head_w, head_b, eps, {}, {}};
    dec->layers.resize(n_layers);
    return dec;
}

void sp_decoder_free(void* handle) { delete static_cast<Decoder*>(handle); }

// Layer i's weights. ptrs (19, any bias/predictor entry may be null): ln1, ln2, Wq, bq, Wk, bk, Wv, bv, Wo,
// bo, W_gate, b_gate, W_up, b_up, W_down, b_down, P_in, P_out, p_bias; W_down is [d, dff] (nn.Linear) for a
// dense FFN and [dff, d] (transposed) for a sparse one. fparams (5): eps1, eps2, threshold, cut, p_threshold.
// iparams (3): kind (0 dense gated, 1 activation-sparse, 2 activation-sparse with a predictor of rank
// p_rank), act (ffn.cpp's code, | 16 for dReLU), p_rank. Returns non-zero for a bad index or kind.
int sp_decoder_set_layer(void* handle, int64_t i, const float* const* ptrs, const float* fparams,
                         const int64_t* iparams) {
    auto* dec = static_cast<Decoder*>(handle);
    if (i < 0 || i >= dec->n_layers || iparams[0] < DENSE || iparams[0] > PREDICTED) return 1;
    if (iparams[0] == PREDICTED && (iparams[2] < 1 || !ptrs[16] || !ptrs[17])) return 1;
    Layer& L = dec->layers[i];
    const float** p[19] = {&L.ln1, &L.ln2, &L.wq, &L.bq, &L.wk, &L.bk, &L.wv, &L.bv, &L.wo, &L.bo, &L.w_gate,
                           &L.b_gate, &L.w_up, &L.b_up, &L.w_down, &L.b_down, &L.p_in, &L.p_out, &L.p_bias};
    for (int k = 0; k < 19; ++k) *p[k] = ptrs[k];
    L.eps1 = fparams[0], L.eps2 = fparams[1], L.threshold = fparams[2], L.cut = fparams[3];
    L.p_threshold = fparams[4];
    L.kind = (int)iparams[0], L.act = (int)iparams[1], L.p_rank = iparams[2];
    return 0;
}

// The LM head's screen for greedy-only steps (both null: none): hi [vocab, d] uint16, the upper 16 bits of
// every fp32 head weight, and err [vocab] >= ||W_h[j] - hi(W_h[j])||_2 plus the fp32 rounding of both dot
// products (decode.py's truncation_screen). Borrowed, like the weights.
int sp_decoder_set_head_screen(void* handle, const uint16_t* hi, const float* err) {
    auto* dec = static_cast<Decoder*>(handle);
    if ((hi == nullptr) != (err == nullptr)) return 1;
    dec->head_hi = hi, dec->head_err = err;
    return 0;
}

// TEAL input sparsity of layer i: thresholds[7] for q, k, v, o, gate, up, down; an entry >= 0 makes that
// projection zero its input entries with |x| < threshold and read its weight (already set by
// sp_decoder_set_layer) as [in, out], the transpose of nn.Linear's; -1 keeps it plain. Only a dense FFN's
// gate/up/down may be input-sparse. Returns non-zero for a bad index or an input-sparse sparse-FFN projection.
int sp_decoder_set_input_sparse(void* handle, int64_t i, const float* thresholds) {
    auto* dec = static_cast<Decoder*>(handle);
    if (i < 0 || i >= dec->n_layers) return 1;
    Layer& L = dec->layers[i];
    for (int p = PGATE; p < 7; ++p)
        if (thresholds[p] >= 0.0f && L.kind != DENSE) return 1;
    for (int p = 0; p < 7; ++p) L.input_t[p] = thresholds[p] >= 0.0f ? thresholds[p] : -1.0f;
    return 0;
}

// One decode step for B sequences at position `pos` (their new tokens' embeddings in x [B, d], overwritten
// with the last hidden state before the final norm). k_cache / v_cache: [n_layers, B, kv_heads, cache_len,
// head_dim] contiguous, positions < pos already filled; position pos is written. cos / sin: [cache_len,
// head_dim] rotary tables. logits [B, vocab] receives the head's output; next [B] its argmax over ids not in
// banned[0:n_banned] (the lowest id among equal maxima). logits may be null (greedy only): then, with a head
// screen set, only the candidates' fp32 head rows are read, and the same ids come out. seconds (3, may be
// null) accumulates the time in attention (norm to residual), FFN (norm to residual) and head (norm, GEMV,
// argmax). Returns non-zero
// for pos outside the cache, B < 1, or B > 16 with an activation-sparse FFN.
int sp_decoder_step(void* handle, float* x, int64_t B, int64_t pos, float* k_cache, float* v_cache,
                    int64_t cache_len, const float* cos, const float* sin, float* logits, const int64_t* banned,
                    int64_t n_banned, int64_t* next, double* seconds, int threads) {
    auto* dec = static_cast<Decoder*>(handle);
    const int64_t d = dec->d, H = dec->heads, KV = dec->kv_heads, hd = dec->head_dim, dff = dec->dff;
    if (B < 1 || pos < 0 || pos >= cache_len) return 1;
    for (const Layer& L : dec->layers)
        if ((L.kind != DENSE || L.input_sparse()) && B > kMaxSparseTokens) return 1;
    const int64_t n_ctx = pos + 1, group = H / KV;
    // Scratch: h [B, d], q [B, H hd], k, v [B, KV hd], att [B, H hd], scores [B H, n_ctx], g, u [B, dff], f [B, d].
    const int64_t sizes[] = {B * d, B * H * hd, B * KV * hd, B * KV * hd, B * H * hd, B * H * n_ctx, B * dff,
                             B * dff, B * d};
    int64_t need = 0;
    for (int64_t s : sizes) need += s;
    if ((int64_t)dec->scratch.size() < need) dec->scratch.resize(need);
    float* buf[9];
    float* at = dec->scratch.data();
    for (int k = 0; k < 9; ++k) buf[k] = at, at += sizes[k];
    float *h = buf[0], *q = buf[1], *k = buf[2], *v = buf[3], *att = buf[4], *scores = buf[5], *g = buf[6],
          *u = buf[7], *f = buf[8];
    const float* c = cos + pos * hd;
    const float* s = sin + pos * hd;
    const float scale = 1.0f / std::sqrt((float)hd);
    double t_attn = 0.0, t_ffn = 0.0;
    for (int64_t li = 0; li < dec->n_layers; ++li) {
        const Layer& L = dec->layers[li];
        Clock::time_point t0 = Clock::now();
        rms_norm(x, L.ln1, L.eps1, B, d, h);
        const Mat qkv[3] = {{L.wq, L.bq, H * hd, q, H * hd, false}, {L.wk, L.bk, KV * hd, k, KV * hd, false},
                            {L.wv, L.bv, KV * hd, v, KV * hd, false}};
        const int qkv_p[3] = {PQ, PK, PV};
        if (const int rc = project(dec, L, qkv_p, qkv, 3, h, B, d, threads)) return rc;
        // RoPE, then the new key/value into the cache: [layer, b, kv head, position, hd].
        const int64_t layer_off = li * B * KV * cache_len * hd;
        for (int64_t b = 0; b < B; ++b) {
            for (int64_t hh = 0; hh < H; ++hh) rope(q + (b * H + hh) * hd, c, s, hd);
            for (int64_t kh = 0; kh < KV; ++kh) {
                float* kb = k + (b * KV + kh) * hd;
                rope(kb, c, s, hd);
                const int64_t off = layer_off + ((b * KV + kh) * cache_len + pos) * hd;
                std::memcpy(k_cache + off, kb, hd * sizeof(float));
                std::memcpy(v_cache + off, v + (b * KV + kh) * hd, hd * sizeof(float));
            }
        }
        // Attention over positions 0..pos, one (sequence, head) per item.
        sp::Pool::get().run(B * H, threads, [&](int64_t item, int) {
            const int64_t b = item / H, hh = item % H, kh = hh / group;
            const float* qv = q + (b * H + hh) * hd;
            const float* K = k_cache + layer_off + (b * KV + kh) * cache_len * hd;
            const float* V = v_cache + layer_off + (b * KV + kh) * cache_len * hd;
            float* sc = scores + item * n_ctx;
            float mx = -std::numeric_limits<float>::infinity();
            for (int64_t t = 0; t < n_ctx; ++t) {
                sc[t] = sp::dot(qv, K + t * hd, hd) * scale;
                mx = std::max(mx, sc[t]);
            }
            float sum = 0.0f;
            for (int64_t t = 0; t < n_ctx; ++t) sum += (sc[t] = std::exp(sc[t] - mx));
            float* out = att + (b * H + hh) * hd;
            std::fill(out, out + hd, 0.0f);
            const float inv = 1.0f / sum;
            for (int64_t t = 0; t < n_ctx; ++t) sp::axpy(out, sc[t] * inv, V + t * hd, hd);
        });
        const Mat o = {L.wo, L.bo, d, x, d, true};  // the residual: x += a Wo^T + bo
        const int o_p[1] = {PO};
        if (const int rc = project(dec, L, o_p, &o, 1, att, B, H * hd, threads)) return rc;
        Clock::time_point t1 = Clock::now();
        t_attn += std::chrono::duration<double>(t1 - t0).count();
        rms_norm(x, L.ln2, L.eps2, B, d, h);
        if (L.kind == DENSE) {
            const Mat gu[2] = {{L.w_gate, L.b_gate, dff, g, dff, false}, {L.w_up, L.b_up, dff, u, dff, false}};
            const int gu_p[2] = {PGATE, PUP};
            if (const int rc = project(dec, L, gu_p, gu, 2, h, B, d, threads)) return rc;
            const bool up_relu = (L.act & kUpReLU) != 0;
            const int act = L.act & ~kUpReLU;
            for (int64_t i = 0; i < B * dff; ++i) {
                const float up = up_relu && u[i] < 0.0f ? 0.0f : u[i];
                g[i] = activate(act, g[i], L.threshold, L.cut) * up;
            }
            const Mat down = {L.w_down, L.b_down, d, x, d, true};
            const int down_p[1] = {PDOWN};
            if (const int rc = project(dec, L, down_p, &down, 1, g, B, dff, threads)) return rc;
        } else {
            int rc;
            if (L.kind == SPARSE) {
                const int64_t all[2] = {0, dff};
                rc = sp_ffn_decode_f32(h, B, d, L.w_gate, L.b_gate, L.w_up, L.b_up, L.w_down, L.b_down, all, 1,
                                       L.act, L.threshold, L.cut, f, threads);
            } else {
                rc = sp_ffn_predicted_f32(h, B, d, L.w_gate, L.b_gate, L.w_up, L.b_up, L.w_down, L.b_down, dff,
                                          L.act, L.threshold, L.cut, L.p_in, L.p_out, L.p_bias, L.p_rank,
                                          L.p_threshold, f, nullptr, threads);
            }
            if (rc != 0) return rc;
            for (int64_t i = 0; i < B * d; ++i) x[i] += f[i];
        }
        t_ffn += since(t1);
    }
    Clock::time_point t2 = Clock::now();
    rms_norm(x, dec->norm, dec->eps, B, d, h);
    if (!logits && dec->head_hi) {
        screened_argmax(dec, h, B, banned, n_banned, next, threads);
    } else {
        if (!logits) {  // greedy only, no screen: the logits go to scratch
            if ((int64_t)dec->head_buf.size() < B * dec->vocab) dec->head_buf.resize(B * dec->vocab);
            logits = dec->head_buf.data();
        }
        const Mat head = {dec->head_w, dec->head_b, dec->vocab, logits, dec->vocab, false};
        gemv(&head, 1, h, d, B, d, threads);
        for (int64_t b = 0; b < B; ++b) {
            float* lb = logits + b * dec->vocab;
            for (int64_t j = 0; j < n_banned; ++j)
                if (banned[j] >= 0 && banned[j] < dec->vocab) lb[banned[j]] = -std::numeric_limits<float>::infinity();
            int64_t best = 0;
            for (int64_t j = 1; j < dec->vocab; ++j)
                if (lb[j] > lb[best]) best = j;
            next[b] = best;
        }
    }
    if (seconds) {
        seconds[0] += t_attn;
        seconds[1] += t_ffn;
        seconds[2] += since(t2);
    }
    return 0;
}

}  // extern "C"
