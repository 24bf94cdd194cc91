// Activation-sparse and mixture-of-experts FFN for few tokens (decode).
//
// One pass over the FFN's neurons: for each candidate neuron j, the gate row
// W_in[j] is dotted with the tokens; only where some token's activation is
// non-zero are the up row W_up[j] and the down row W_outT[j] (W_down stored
// transposed, so it is a row too) read, each contiguously and once for all
// tokens. Threads (pool.h) take fixed groups of neuron chunks dynamically,
// each group accumulating into its own output buffer, summed in group order
// at the end (deterministic at any thread count). Memory traffic is the gate
// matrix (or only the listed neurons' gate rows, for experts) plus the
// active neurons' two rows: the bytes bound of activation sparsity. With an
// activation predictor (a rank-r map from x to neuron logits, a few MB), only
// the predicted neurons' gate rows are read as well. One token with a
// ReLU/FATReLU gate: a 16-bit screen of the gate rules neurons out first
// (sp_ffn_screened_f32; sp_ffn_planes_f32 with the gate in two planes).
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>
#include "pool.h"
#include "vec.h"

namespace {

enum Act { RELU = 0, SILU = 1, GELU = 2, GELU_TANH = 3 };
// A flag or-ed into `act`: the up projection's value goes through ReLU too (dReLU,
// Turbo Sparse), so a neuron counts only where gate and up are both positive.
constexpr int kUpReLU = 16;

inline float activate_raw(int act, float v, float threshold) {
    switch (act) {
        case RELU: return v >= threshold ? v : 0.0f;  // FATReLU; threshold 0 is ReLU
        case SILU: return v / (1.0f + std::exp(-v));
        case GELU: return 0.5f * v * (1.0f + std::erf(v * 0.70710678118654752f));
        default: {
            float u = 0.79788456080286536f * (v + 0.044715f * v * v * v);
            return 0.5f * v * (1.0f + std::tanh(u));
        }
    }
}

// The activation, then CATS-style magnitude cut: values with |y| < cut become 0.
inline float activate(int act, float v, float threshold, float cut) {
    float y = activate_raw(act, v, threshold);
    return std::fabs(y) >= cut ? y : 0.0f;
}

constexpr int kMaxTokens = 16;
constexpr int64_t kChunk = 16;

// The shared loop. `total` candidate neurons in chunks of kChunk; neurons(c, js)
// writes chunk c's neuron indices into js and returns how many. With `sel`
// (uint8 [T, sel_stride]), token t computes neuron j only where
// sel[t, j / sel_group] is set (a predictor's choice of neurons, group 1, or a
// router's choice of experts, group = expert size): elsewhere its activation
// counts as zero and its gate row is not even read for that token.
// Deterministic split of the chunks: kGroups fixed, contiguous groups of
// chunks, each summed in chunk order into its own buffer, the buffers then
// added in group order. Which thread takes a group changes from call to call;
// the float sums do not, at any thread count (so greedy tokens repeat exactly).
constexpr int64_t kGroups = 16;

template <class Chunk>
void run_groups(int64_t n_chunks, int64_t n_groups, int n_threads, int64_t group_size, float* acc, Chunk chunk) {
    sp::Pool::get().run(n_groups, n_threads, [&](int64_t g, int) {
        float* my = acc + (size_t)g * group_size;
        int state = 0;  // carried from chunk to chunk within the group (ffn_core: the last chunk's live count)
        for (int64_t c = g * n_chunks / n_groups; c < (g + 1) * n_chunks / n_groups; ++c) chunk(c, my, state);
    });
}

// y = bias (a row of width w, repeated; may be null) + acc[0] + acc[1] + ... (group buffers of `total`
// floats), summed in group order. The same sums, element by element, as one loop over groups per element,
// but as contiguous passes the compiler vectorises: per element a strided gather of n_groups floats and an
// integer modulo cost more than the weights' bytes on small projections (576 x 576: 2x the dense GEMV).
inline void sum_groups(const float* acc, int64_t n_groups, int64_t total, const float* bias, int64_t w, float* y) {
    for (int64_t i = 0; i < total; i += w)
        for (int64_t j = 0; j < w; ++j) y[i + j] = bias ? bias[j] : 0.0f;
    for (int64_t k = 0; k < n_groups; ++k) {
        const float* a = acc + (size_t)k * total;
        for (int64_t i = 0; i < total; ++i) y[i] += a[i];
    }
}

// Neuron j's up and down rows (up may be null), prefetched the moment its gate says it is active, so the
// random reads overlap the rest of the chunk's gate stream: measured on AVX2 (2-core EPYC, 576 x 1536 x 30
// layers, 14% active) the active rows' cost fell from 2.3 to 1.7 ms (13 -> 17 GB/s); a prefetch of only the
// next active neuron's first lines, as before, left most of each row's latency exposed.
inline void prefetch_rows(const float* w_up, const float* w_outT, int64_t j, int64_t d) {
    for (int64_t k = 0; k < d; k += 16) {
        if (w_up) __builtin_prefetch(w_up + j * d + k, 0, 3);
        __builtin_prefetch(w_outT + j * d + k, 0, 3);
    }
}

// Phase 2 for one token: the up rows of the live neurons (four at a time, dot4: four row streams in flight)
// scale their gate values g[q * g_stride], then the down rows of the non-zero ones are added into my (axpy4:
// four rows, the output loaded and stored once per four).
inline void active_rows_one_token(const float* x, int64_t d, const float* w_up, const float* b_up, const float* w_outT,
                                  bool up_relu, float* g, int64_t g_stride, const int64_t* live, int n_live,
                                  float* my) {
    int q = 0;
    if (w_up) {
        for (; q + 4 <= n_live; q += 4) {
            const float* rows[4];
            for (int k = 0; k < 4; ++k) rows[k] = w_up + live[q + k] * d;
            float u[4];
            sp::dot4<false>(rows, x, d, u);
            for (int k = 0; k < 4; ++k) {
                const float v = u[k] + (b_up ? b_up[live[q + k]] : 0.0f);
                g[(q + k) * g_stride] *= up_relu && v < 0.0f ? 0.0f : v;
            }
        }
        for (; q < n_live; ++q) {
            const float v = sp::dot<false>(w_up + live[q] * d, x, d) + (b_up ? b_up[live[q]] : 0.0f);
            g[q * g_stride] *= up_relu && v < 0.0f ? 0.0f : v;
        }
    }
    const float* rows[4];
    float coef[4];
    int m = 0;
    for (int q = 0; q < n_live; ++q) {
        if (g[q * g_stride] == 0.0f) continue;
        rows[m] = w_outT + live[q] * d;
        coef[m] = g[q * g_stride];
        if (++m == 4) {
            sp::axpy4(my, coef, rows, d);
            m = 0;
        }
    }
    for (int k = 0; k < m; ++k) sp::axpy<false>(my, coef[k], rows[k], d);
}

template <class Neurons>
void ffn_core(const float* x, int64_t T, int64_t d, const float* w_in, const float* b_in, const float* w_up,
              const float* b_up, const float* w_outT, const float* b_out, int64_t total, Neurons neurons,
              const uint8_t* sel, int64_t sel_stride, int64_t sel_group, int act, float threshold, float cut,
              float* y, int threads) {
    const bool up_relu = (act & kUpReLU) != 0;
    act &= ~kUpReLU;
    const int64_t n_chunks = (total + kChunk - 1) / kChunk;
    const int64_t n_groups = std::min<int64_t>(n_chunks, kGroups);
    const int n_threads = (int)std::max<int64_t>(1, std::min<int64_t>(threads, n_groups));
    std::vector<float> acc((size_t)n_groups * T * d, 0.0f);
    auto chunk = [&](int64_t c, float* my, int& last_live) {
        // Neurons of this chunk, then (phase 1) their gates: one contiguous stream.
        int64_t js[kChunk];
        const int n = neurons(c, js);
        float gs[kChunk][kMaxTokens];
        int64_t live[kChunk];
        int n_live = 0;
        int q = 0;
        // Prefetch active neurons' rows during the gate stream only where the group's last chunk had few
        // (high sparsity: isolated random rows whose latency the prefetch hides). With many, four-row streams
        // keep enough requests in flight and the prefetches (one per cache line) only crowd the gate stream:
        // measured on AVX-512 (Xeon, 4096 x 11008, one token) 5-16% slower at 30-50% active, 5% faster at 90%.
        const bool pf = T > 1 || last_live < 4;
        if (T == 1) {
            // One token: four gate rows at a time (sp::dot4), where all four are selected.
            for (; q + 4 <= n; q += 4) {
                const float* rows[4];
                bool all = true;
                for (int k = 0; k < 4; ++k) {
                    rows[k] = w_in + js[q + k] * d;
                    all &= !sel || sel[js[q + k] / sel_group] != 0;
                }
                if (!all) break;
                float v[4];
                if (js[q + 3] - js[q] == 3)  // consecutive rows: the prefetch past a row's end is the next row's
                    sp::dot4(rows, x, d, v);
                else  // listed rows (predicted, screened candidates): prefetch only inside each row
                    sp::dot4<true, false>(rows, x, d, v);
                for (int k = 0; k < 4; ++k) {
                    const int64_t j = js[q + k];
                    gs[n_live][0] = activate(act, v[k] + (b_in ? b_in[j] : 0.0f), threshold, cut);
                    if (gs[n_live][0] != 0.0f) {
                        if (pf) prefetch_rows(w_up, w_outT, j, d);
                        live[n_live++] = j;
                    }
                }
            }
        }
        for (; q < n; ++q) {
            const int64_t j = js[q];
            const float* gi = w_in + j * d;
            const uint8_t* sj = sel ? sel + j / sel_group : nullptr;
            bool any = false;
            for (int64_t t = 0; t < T; ++t) {
                if (sj && !sj[t * sel_stride]) {
                    gs[n_live][t] = 0.0f;
                    continue;
                }
                // One token: dot4's bits for every row (dot_as_dot4), whichever rows share its chunk, so a
                // neuron's gate is the same float in every kernel (sp_ffn_screened_f32 lists other chunks).
                float v = (T == 1 ? sp::dot_as_dot4(gi, x, d) : sp::dot(gi, x + t * d, d)) + (b_in ? b_in[j] : 0.0f);
                gs[n_live][t] = activate(act, v, threshold, cut);
                any |= gs[n_live][t] != 0.0f;
            }
            if (any) {  // the whole point: other neurons' up and down rows are never read
                if (pf) prefetch_rows(w_up, w_outT, j, d);
                live[n_live++] = j;
            }
        }
        last_live = n_live;
        // Phase 2: the active neurons' up and down rows (prefetched since phase 1 found them).
        if (T == 1) {
            active_rows_one_token(x, d, w_up, b_up, w_outT, up_relu, &gs[0][0], kMaxTokens, live, n_live, my);
            return;
        }
        for (int q = 0; q < n_live; ++q) {
            const int64_t j = live[q];
            float* g = gs[q];
            if (w_up) {
                const float* ui = w_up + j * d;
                for (int64_t t = 0; t < T; ++t) {
                    if (g[t] == 0.0f) continue;
                    const float u = sp::dot<false>(ui, x + t * d, d) + (b_up ? b_up[j] : 0.0f);
                    g[t] *= up_relu && u < 0.0f ? 0.0f : u;
                }
            }
            const float* oi = w_outT + j * d;
            for (int64_t t = 0; t < T; ++t)
                if (g[t] != 0.0f) sp::axpy<false>(my + t * d, g[t], oi, d);
        }
    };
    run_groups(n_chunks, n_groups, n_threads, T * d, acc.data(), chunk);
    sum_groups(acc.data(), n_groups, T * d, b_out, d, y);
}

// The indices j < n with f[j] set, in order.
inline std::vector<int64_t> flagged(const uint8_t* f, int64_t n) {
    std::vector<int64_t> list;
    list.reserve(n);
    for (int64_t j = 0; j < n; ++j)
        if (f[j]) list.push_back(j);
    return list;
}

// ffn_core's neurons(c, js) over a list of neuron indices: chunk c is entries [c kChunk, (c + 1) kChunk).
inline auto listed(const std::vector<int64_t>& list) {
    return [&list](int64_t c, int64_t* js) {
        int n = 0;
        for (int64_t f = c * kChunk; f < std::min<int64_t>((int64_t)list.size(), c * kChunk + kChunk); ++f)
            js[n++] = list[f];
        return n;
    };
}

// ||x||_2 for the screen's bound, computed in double and padded up (its own rounding).
inline double norm_bound(const float* x, int64_t d) {
    double ss = 0.0;
    for (int64_t i = 0; i < d; ++i) ss += (double)x[i] * (double)x[i];
    return std::sqrt(ss) * (1.0 + 0x1p-40);
}

// Whether a neuron whose screened gate is s (bias b, bound e = ||x|| err[j]) cannot reach the threshold:
// |gate - (s + b)| <= e plus the fp32 roundings of the bias additions, padded as for the LM head. NaN: never
// ruled out.
inline bool ruled_out(float s, float b, double e, float threshold) {
    const double slack = e + (std::fabs((double)s) + 2.0 * std::fabs((double)b) + e) * 0x1p-20;
    return (double)s + (double)b + slack < (double)threshold;
}

}  // namespace

extern "C" {

// y[t] = sum_j x1[t, j] * W_out[:, j] + b_out over the listed neurons, with
//   gated: x1[t, j] = act(W_in[j] . x[t] + b_in[j]) * (W_up[j] . x[t] + b_up[j])
//   plain: x1[t, j] = act(W_in[j] . x[t] + b_in[j])          (w_up == nullptr)
// act: 0 FATReLU with `threshold` (0: ReLU), 1 SiLU, 2 GELU, 3 GELU (tanh);
// then |act| < cut is zeroed (CATS; cut 0 keeps every non-zero). act | kUpReLU
// (16) also passes the up value through ReLU (dReLU).
// Neurons are the half-open ranges ranges[2i], ranges[2i+1]. Any bias may be
// null. Rows have stride d; x and y are [T, d] contiguous; T <= 16.
int sp_ffn_decode_f32(const float* x, int64_t T, int64_t d,
                      const float* w_in, const float* b_in,
                      const float* w_up, const float* b_up,
                      const float* w_outT, const float* b_out,
                      const int64_t* ranges, int64_t n_ranges,
                      int act, float threshold, float cut, float* y, int threads) {
    if (T < 1 || T > kMaxTokens) return 1;
    std::vector<int64_t> prefix(n_ranges + 1, 0);
    for (int64_t r = 0; r < n_ranges; ++r) prefix[r + 1] = prefix[r] + (ranges[2 * r + 1] - ranges[2 * r]);
    const int64_t total = prefix[n_ranges];
    auto neurons = [&](int64_t c, int64_t* js) {
        int n = 0;
        int64_t f = c * kChunk, f_end = std::min(total, f + kChunk);
        int64_t r = std::upper_bound(prefix.begin(), prefix.end(), f) - prefix.begin() - 1;
        for (; f < f_end; ++f) {
            while (f >= prefix[r + 1]) ++r;
            js[n++] = ranges[2 * r] + (f - prefix[r]);
        }
        return n;
    };
    ffn_core(x, T, d, w_in, b_in, w_up, b_up, w_outT, b_out, total, neurons, nullptr, 0, 1, act, threshold, cut, y,
             threads);
    return 0;
}

// The same FFN where a low-rank predictor chooses the neurons (DejaVu /
// PowerInfer): logits[t] = P_out (P_in x[t]) + p_bias ([dff]); token t computes
// neuron j only if logits[t, j] >= p_threshold, so unpredicted neurons cost
// nothing, gate row included. Approximate: an active neuron the predictor
// misses is dropped. P_in is [r, d], P_out [dff, r] (row-major), p_bias may be
// null. *n_selected (if not null) receives the number of neurons chosen for
// at least one token.
int sp_ffn_predicted_f32(const float* x, int64_t T, int64_t d,
                         const float* w_in, const float* b_in,
                         const float* w_up, const float* b_up,
                         const float* w_outT, const float* b_out, int64_t dff,
                         int act, float threshold, float cut,
                         const float* p_in, const float* p_out, const float* p_bias, int64_t r, float p_threshold,
                         float* y, int64_t* n_selected, int threads) {
    if (T < 1 || T > kMaxTokens || r < 1) return 1;
    // 1. The rank-r code of every token: r rows of P_in, 8 per work item.
    std::vector<float> h((size_t)T * r);
    sp::Pool::get().run((r + 7) / 8, threads, [&](int64_t item, int) {
        for (int64_t k = item * 8; k < std::min(r, item * 8 + 8); ++k)
            for (int64_t t = 0; t < T; ++t) h[t * r + k] = sp::dot(p_in + k * d, x + t * d, d);
    });
    // 2. Logits, thresholded into the per-token selection.
    std::vector<uint8_t> sel((size_t)T * dff), any(dff);
    constexpr int64_t kLogitChunk = 512;
    sp::Pool::get().run((dff + kLogitChunk - 1) / kLogitChunk, threads, [&](int64_t item, int) {
        for (int64_t j = item * kLogitChunk; j < std::min(dff, item * kLogitChunk + kLogitChunk); ++j) {
            uint8_t a = 0;
            for (int64_t t = 0; t < T; ++t) {
                const float l = sp::dot(p_out + j * r, h.data() + t * r, r) + (p_bias ? p_bias[j] : 0.0f);
                sel[t * dff + j] = l >= p_threshold;
                a |= sel[t * dff + j];
            }
            any[j] = a;
        }
    });
    // 3. The neurons some token needs, in order (a scan of dff bytes).
    const std::vector<int64_t> list = flagged(any.data(), dff);
    const int64_t total = (int64_t)list.size();
    if (n_selected) *n_selected = total;
    // 4. Only those neurons' gate rows (for the tokens that chose them), then the active ones' up and down rows.
    ffn_core(x, T, d, w_in, b_in, w_up, b_up, w_outT, b_out, total, listed(list), sel.data(), dff, 1, act, threshold,
             cut, y, threads);
    return 0;
}

// The MoE FFN with a router's choice per token (MoEfication top-k, LTE
// threshold: any number of experts per token): expert e is the neurons
// [e*size, (e+1)*size). experts is uint8 [T, E]; token t computes expert e
// only where experts[t, e] is set. Only the experts some token chose are
// visited, each of their rows read once for all tokens; an expert's gate rows
// are dotted only with the tokens that chose it. *n_listed (if not null)
// receives the number of experts chosen by at least one token.
int sp_ffn_moe_f32(const float* x, int64_t T, int64_t d,
                   const float* w_in, const float* b_in,
                   const float* w_up, const float* b_up,
                   const float* w_outT, const float* b_out,
                   const uint8_t* experts, int64_t E, int64_t size,
                   int act, float threshold, float cut, float* y, int64_t* n_listed, int threads) {
    if (T < 1 || T > kMaxTokens || E < 1 || size < 1) return 1;
    std::vector<int64_t> list;
    list.reserve(E);
    for (int64_t e = 0; e < E; ++e) {
        uint8_t a = 0;
        for (int64_t t = 0; t < T; ++t) a |= experts[t * E + e];
        if (a) list.push_back(e);
    }
    if (n_listed) *n_listed = (int64_t)list.size();
    const int64_t total = (int64_t)list.size() * size;
    auto neurons = [&](int64_t c, int64_t* js) {
        int n = 0;
        for (int64_t f = c * kChunk; f < std::min(total, c * kChunk + kChunk); ++f)
            js[n++] = list[f / size] * size + f % size;
        return n;
    };
    ffn_core(x, T, d, w_in, b_in, w_up, b_up, w_outT, b_out, total, neurons, T > 1 ? experts : nullptr, E, size,
             act, threshold, cut, y, threads);
    return 0;
}

// sp_ffn_moe_f32 with LTE's threshold routing decided here from the router's logits [T, E] (x W_r^T + b_r,
// computed by the caller), so that the decode step is one call after the router's GEMV: expert e is selected
// for token t where logit >= hi, not where logit <= lo. [lo, hi] brackets logit(tau) widely enough that fp32
// sigmoid(logit) > tau (the module's rule, as torch computes it) agrees outside it (kernels/ffn.py
// _logit_bracket). Returns 3, computing nothing, when a logit lies inside the bracket or is NaN: the caller
// then selects with torch and calls sp_ffn_moe_f32. Why: on the Xeon each torch op after a model-sized
// weight stream costs ~0.1 ms (its code and data evicted); sigmoid, compare and the selection's dtype and
// layout conversions were ~0.3 ms of case 2's 5.5 ms at 75% skipped.
int sp_ffn_moe_threshold_f32(const float* x, int64_t T, int64_t d,
                             const float* w_in, const float* b_in,
                             const float* w_up, const float* b_up,
                             const float* w_outT, const float* b_out,
                             const float* logits, double lo, double hi, int64_t E, int64_t size,
                             int act, float threshold, float cut, float* y, int64_t* n_listed, int threads) {
    if (T < 1 || T > kMaxTokens || E < 1 || size < 1) return 1;
    std::vector<uint8_t> sel((size_t)(T * E));
    for (int64_t i = 0; i < T * E; ++i) {
        const double z = logits[i];
        if (z >= hi)
            sel[i] = 1;
        else if (z <= lo)
            sel[i] = 0;
        else
            return 3;  // inside the bracket, or NaN
    }
    return sp_ffn_moe_f32(x, T, d, w_in, b_in, w_up, b_up, w_outT, b_out, sel.data(), E, size, act, threshold, cut,
                          y, n_listed, threads);
}

// The exact activation-sparse FFN for one token with a screened gate (FATReLU / ReLU, act 0, optionally
// with kUpReLU): the gate's 16-bit high halves (hi [dff, d] uint16, bfloat16 by truncation) are streamed
// for every neuron, and err[j] (decode.py's truncation_screen) bounds |fp32 gate - screened gate| per unit
// of ||x||_2. A neuron whose screened upper bound is below `threshold` cannot be active; the others (the
// candidates) get the fp32 gate row, bit for bit as sp_ffn_decode_f32 computes it, then the up and down
// rows where active: the same neurons, the same floats, only the order of the final sums differs. Bytes:
// half the gate, the candidates' fp32 gate rows, the active neurons' two rows. *n_candidates (if not null)
// receives the number of candidates. Returns 1 for another activation.
int sp_ffn_screened_f32(const float* x, int64_t d, const float* w_in, const uint16_t* hi, const float* err,
                        const float* b_in, const float* w_up, const float* b_up, const float* w_outT,
                        const float* b_out, int64_t dff, int act, float threshold, float cut, float* y,
                        int64_t* n_candidates, int threads) {
    if ((act & ~kUpReLU) != RELU || d < 1 || dff < 0) return 1;
    std::vector<float> xp(d);
    sp::hi_order(x, d, xp.data());
    const double xn = norm_bound(x, d);
    // 1. The screen, 64 rows per item: candidate flags.
    std::vector<uint8_t> cand(dff);
    constexpr int64_t kBlock = 64;
    sp::Pool::get().run((dff + kBlock - 1) / kBlock, threads, [&](int64_t item, int) {
        const int64_t r1 = std::min(dff, (item + 1) * kBlock);
        auto flag = [&](int64_t j, float s) {
            cand[j] = !ruled_out(s, b_in ? b_in[j] : 0.0f, xn * (double)err[j], threshold);  // NaN: a candidate
        };
        int64_t r = item * kBlock;
        for (; r + 4 <= r1; r += 4) {
            const uint16_t* rows[4] = {hi + r * d, hi + (r + 1) * d, hi + (r + 2) * d, hi + (r + 3) * d};
            float v[4];
            sp::dot_hi4(rows, xp.data(), d, v);
            for (int k = 0; k < 4; ++k) flag(r + k, v[k]);
        }
        for (; r < r1; ++r) flag(r, sp::dot_hi(hi + r * d, x, d));
    });
    // 2. The candidates in order, then the FFN over them (sp_ffn_predicted_f32's step 4, with no selection).
    const std::vector<int64_t> list = flagged(cand.data(), dff);
    const int64_t total = (int64_t)list.size();
    if (n_candidates) *n_candidates = total;
    ffn_core(x, 1, d, w_in, b_in, w_up, b_up, w_outT, b_out, total, listed(list), nullptr, 0, 1, act, threshold,
             cut, y, threads);
    return 0;
}

// The same FFN with the gate stored as two 16-bit planes, hi and lo [dff, d] (the upper and lower halves of
// every fp32 weight; hi is the truncation screen, err[j] its bound as for sp_ffn_screened_f32), screened and
// computed chunk by chunk: the chunk's hi rows are streamed through the screen, the neurons it cannot rule out
// (the candidates) get their exact fp32 gate from hi (just read: in cache) and lo (read for them only), bit
// for bit dot4's, then the active neurons' up and down rows. Gate bytes: 2 per weight plus 2 per candidate's
// weight (sp_ffn_screened_f32: 2 per weight plus 4 per candidate's, its fp32 row, after a separate pass over
// hi; sp_ffn_decode_f32: 4 per weight). The chunks, groups and sums are sp_ffn_decode_f32's over [0, dff): the
// output is bit for bit that kernel's. *n_candidates (if not null) receives the number of candidates.
// Returns 1 for another activation.
int sp_ffn_planes_f32(const float* x, int64_t d, const uint16_t* hi, const uint16_t* lo, const float* err,
                      const float* b_in, const float* w_up, const float* b_up, const float* w_outT,
                      const float* b_out, int64_t dff, int act, float threshold, float cut, float* y,
                      int64_t* n_candidates, int threads) {
    if ((act & ~kUpReLU) != RELU || d < 1 || dff < 0) return 1;
    const bool up_relu = (act & kUpReLU) != 0;
    std::vector<float> xp(d);
    sp::hi_order(x, d, xp.data());
    const double xn = norm_bound(x, d);
    const int64_t n_chunks = (dff + kChunk - 1) / kChunk;
    const int64_t n_groups = std::max<int64_t>(1, std::min<int64_t>(n_chunks, kGroups));
    const int n_threads = (int)std::max<int64_t>(1, std::min<int64_t>(threads, n_groups));
    std::vector<float> acc((size_t)n_groups * d, 0.0f);
    std::atomic<int64_t> n_cand{0};
    run_groups(n_chunks, n_groups, n_threads, d, acc.data(), [&](int64_t c, float* my, int& last_live) {
        const int64_t j0 = c * kChunk, n = std::min(kChunk, dff - j0);
        // 1. The screen over the chunk's hi rows (consecutive: dot_hi4's far prefetch runs into the next chunk).
        int64_t cand[kChunk];
        int nc = 0;
        auto screen = [&](int64_t j, float s) {
            if (!ruled_out(s, b_in ? b_in[j] : 0.0f, xn * (double)err[j], threshold)) cand[nc++] = j;
        };
        int64_t q = 0;
        for (; q + 4 <= n; q += 4) {
            const uint16_t* rows[4] = {hi + (j0 + q) * d, hi + (j0 + q + 1) * d, hi + (j0 + q + 2) * d,
                                       hi + (j0 + q + 3) * d};
            float v[4];
            sp::dot_hi4(rows, xp.data(), d, v);
            for (int k = 0; k < 4; ++k) screen(j0 + q + k, v[k]);
        }
        for (; q < n; ++q) screen(j0 + q, sp::dot_hi(hi + (j0 + q) * d, x, d));
        // 2. The candidates' exact gates, four at a time (a short last group repeats its last row).
        float gs[kChunk];
        int64_t live[kChunk];
        int n_live = 0;
        const bool pf = last_live < 4;  // as ffn_core: prefetch the active rows where they are few
        for (int p = 0; p < nc; p += 4) {
            const uint16_t* h4[4];
            const uint16_t* l4[4];
            for (int k = 0; k < 4; ++k) {
                const int64_t j = cand[std::min(p + k, nc - 1)];
                h4[k] = hi + j * d;
                l4[k] = lo + j * d;
            }
            float v[4];
            sp::dot4_planes(h4, l4, x, xp.data(), d, v);
            for (int k = 0; k < 4 && p + k < nc; ++k) {
                const int64_t j = cand[p + k];
                const float g = activate(RELU, v[k] + (b_in ? b_in[j] : 0.0f), threshold, cut);
                if (g != 0.0f) {
                    if (pf) prefetch_rows(w_up, w_outT, j, d);
                    gs[n_live] = g;
                    live[n_live++] = j;
                }
            }
        }
        last_live = n_live;
        n_cand += nc;
        // 3. The active neurons' up and down rows.
        active_rows_one_token(x, d, w_up, b_up, w_outT, up_relu, gs, 1, live, n_live, my);
    });
    sum_groups(acc.data(), n_groups, d, b_out, d, y);
    if (n_candidates) *n_candidates = n_cand;
    return 0;
}

// y[t] = b + sum_j x1[t, j] * WT[j]: a Linear whose input is sparse (the down
// projection of a plain FFN); rows j where every token's x1 is zero are never
// read. x1 is [T, n_in], WT is [n_in, n_out] (the weight transposed), y is
// [T, n_out]; T <= 16.
int sp_sparse_input_linear_f32(const float* x1, int64_t T, int64_t n_in, const float* wT, const float* b,
                               int64_t n_out, float* y, int threads) {
    if (T < 1 || T > kMaxTokens) return 1;
    const int64_t n_chunks = (n_in + kChunk - 1) / kChunk;
    const int64_t n_groups = std::min<int64_t>(n_chunks, kGroups);
    const int n_threads = (int)std::max<int64_t>(1, std::min<int64_t>(threads, n_groups));
    std::vector<float> acc((size_t)n_groups * T * n_out, 0.0f);
    run_groups(n_chunks, n_groups, n_threads, T * n_out, acc.data(), [&](int64_t c, float* my, int&) {
        // The chunk's rows some token needs, each prefetched whole one row ahead of its use (rows are read in
        // a data-dependent order: the far prefetch of a streamed row would fetch rows that are skipped).
        int64_t live[kChunk];
        int n_live = 0;
        for (int64_t j = c * kChunk; j < std::min(n_in, c * kChunk + kChunk); ++j)
            for (int64_t t = 0; t < T; ++t)
                if (x1[t * n_in + j] != 0.0f) {
                    live[n_live++] = j;
                    break;
                }
        if (n_live) prefetch_rows(nullptr, wT, live[0], n_out);
        for (int q = 0; q < n_live; ++q) {
            const int64_t j = live[q];
            if (q + 1 < n_live) prefetch_rows(nullptr, wT, live[q + 1], n_out);
            for (int64_t t = 0; t < T; ++t) {
                const float v = x1[t * n_in + j];
                if (v != 0.0f) sp::axpy<false>(my + t * n_out, v, wT + j * n_out, n_out);
            }
        }
    });
    sum_groups(acc.data(), n_groups, T * n_out, b, n_out, y);
    return 0;
}

}  // extern "C"
