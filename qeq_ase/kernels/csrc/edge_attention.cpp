// Fused per-edge work of one qeq_ase attention layer (qeq_ase/model/attention.py), forward and
// the first-order backward that gives forces.
//
// Built lazily by qeq_ase/kernels/edge_kernel.py (torch.utils.cpp_extension.load) on first use.
// The eager layer materialises a dozen [E, F]-sized tensors per layer (gathered keys and
// values, filtered keys, messages, their autograd copies) and spends ~75% of an energy +
// forces call in element-wise ops, gathers and scatters over them. Here every receiver
// reads its edges once and only node-sized results and per-edge gradients are written.
//
// Inputs (float32 or float64, contiguous):
//   qkv   [N, 5F]   q | k | values (x, g_vec, g_dir), the output of the layer's qkv linear
//   vin   [N, 3, F] vector features entering the layer (after the input quantizer)
//   filt  [E, 4F]   key filter | value filters (x, g_vec, g_dir), before the envelope
//   env   [E]       cutoff envelope C(r_ij);   unit [E, 3] unit vector receiver -> sender
//   scale [H]       1/temperature (normalised attention) or 1/sqrt(F/H) (plain dot product)
//   edges sorted by receiver: rowptr [N+1]; sender [E]; receiver [E];
//   the same edges grouped by sender: colptr [N+1], sender_order [E] (edge ids).
//
// Forward, for receiver i, head h and edge e = (j -> i):
//   l_e   = scale_h cos(q_i, k_j * kf_e)   (or scale_h <q_i, k_j * kf_e>)
//   u_e   = exp(l_e - m) / (exp(-m) + sum_e' C_e' exp(l_e' - m)),   m = max(0, max_e l_e)
//   a_e   = C_e u_e                                      (the sink softmax of attention.py)
//   agg_s[i] += a_e * values_x[j] * vf_x[e] * C_e
//   agg_v[i] += vin[j] * (values_vec[j] * vf_vec[e] * C_e) + unit_e (values_dir[j] * vf_dir[e] * C_e)
//
// Backward runs in two passes so that no two threads write the same row: pass 1 loops
// over receivers (softmax and query gradients, per-edge logit gradients), pass 2 over
// senders (key, value and vector-feature gradients of the sender, per-edge gradients).
//
// For the INT8 model the backward can hand the filter gradient straight to the filter
// layer's int8 input-gradient GEMM (qeq_ase/kernels/edge_kernel.py, filtered_edge_attention): given the
// layer's weight scales s_w [4F], each edge's row y = dfilt[e] * s_w is written as two-limb
// int8 codes with one scale per row, exactly as quantize_per_row_limbs of
// qeq_ase/kernels/csrc/int8_kernels.cpp would write them, and no float [E, 4F] gradient is stored.
// With the brgemm GEMM the filter layer itself runs in here (InKernelFilter below): the
// forward computes the filter rows from the edge features' codes, the backward runs the
// filter's input-gradient GEMM on the codes, both through oneDNN's brgemm micro-kernel.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <type_traits>
#include <vector>

#include "limb_quantizers.h"

namespace {

using qeq::quantize_limbs;
using qeq::round_half_even;

constexpr double kNormEps = 1e-12;  // torch.nn.functional.normalize's eps

struct Graph {
  const int64_t* rowptr;
  const int64_t* sender;
  const int64_t* receiver;
  const int64_t* colptr;
  const int64_t* sender_order;
};

void check(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

struct Sizes {
  int64_t N, E, F, H, D;
};

Sizes check_inputs(const at::Tensor& qkv, const at::Tensor& vin, const at::Tensor& filt, const at::Tensor& env,
                   const at::Tensor& unit, const at::Tensor& scale, const at::Tensor& rowptr,
                   const at::Tensor& sender, const at::Tensor& receiver, const at::Tensor& colptr,
                   const at::Tensor& sender_order) {
  const auto dtype = qkv.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "qkv must be float32 or float64, got ", dtype);
  for (auto [t, name] : {std::pair{&qkv, "qkv"}, {&vin, "vin"}, {&filt, "filt"}, {&env, "envelope"},
                         {&unit, "unit"}, {&scale, "scale"}}) {
    check(*t, name, dtype);
  }
  for (auto [t, name] : {std::pair{&rowptr, "rowptr"}, {&sender, "sender"}, {&receiver, "receiver"},
                         {&colptr, "colptr"}, {&sender_order, "sender_order"}}) {
    check(*t, name, at::kLong);
  }
  Sizes s;
  s.N = qkv.size(0);
  s.F = qkv.size(1) / 5;
  s.E = env.numel();
  s.H = scale.size(0);
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(1) == 5 * s.F, "qkv must be [N, 5F]");
  TORCH_CHECK(s.H > 0 && s.F % s.H == 0, "F=", s.F, " is not divisible by the ", s.H, " heads");
  s.D = s.F / s.H;
  TORCH_CHECK(vin.dim() == 3 && vin.size(0) == s.N && vin.size(1) == 3 && vin.size(2) == s.F, "vin must be [N, 3, F]");
  // filt may be empty: the INT8 filter computed inside the kernel (InKernelFilter)
  TORCH_CHECK(filt.numel() == 0 || (filt.dim() == 2 && filt.size(0) == s.E && filt.size(1) == 4 * s.F),
              "filt must be [E, 4F] (E = envelope's length) or empty");
  TORCH_CHECK(unit.numel() == 3 * s.E, "unit must be [E, 3] for E = the envelope's length");
  TORCH_CHECK(rowptr.numel() == s.N + 1 && colptr.numel() == s.N + 1, "rowptr and colptr must have N + 1 entries");
  TORCH_CHECK(sender.numel() == s.E && receiver.numel() == s.E && sender_order.numel() == s.E,
              "sender, receiver and sender_order must have E entries");
  return s;
}

Graph graph_of(const at::Tensor& rowptr, const at::Tensor& sender, const at::Tensor& receiver,
               const at::Tensor& colptr, const at::Tensor& sender_order) {
  return {rowptr.data_ptr<int64_t>(), sender.data_ptr<int64_t>(), receiver.data_ptr<int64_t>(),
          colptr.data_ptr<int64_t>(), sender_order.data_ptr<int64_t>()};
}

template <typename T>
inline T dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t t = 0; t < n; ++t) s += a[t] * b[t];
  return s;
}

// The per-row two-limb quantizer of qeq_ase/kernels/csrc/int8_kernels.cpp (quantize_per_row_limbs
// with qmax 127); tests/test_edge_kernel.py checks that the codes agree bit for bit.
// y = row * col_scale; scale = max(max |y|, tiny) / 127; hi = round(clamp(y / scale)),
// lo = round((clamp(y / scale) - hi) * 254). row is overwritten with y.
inline float quantize_row_limbs(float* __restrict row, const float* __restrict col_scale, int64_t n, float tiny,
                                int8_t* __restrict hi, int8_t* __restrict lo) {
  // Both loops must vectorise: they run over every element of every edge's filter gradient.
  float amax = 0.0f;
#pragma omp simd reduction(max : amax)
  for (int64_t k = 0; k < n; ++k) {
    row[k] *= col_scale[k];
    amax = std::max(amax, std::fabs(row[k]));
  }
  const float q = 127.0f, s = std::max(amax, tiny) / q;
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    const float yc = std::min(std::max(row[k] / s, -q), q);
    const float h = round_half_even(yc);
    hi[k] = static_cast<int8_t>(static_cast<int32_t>(h));
    lo[k] = static_cast<int8_t>(static_cast<int32_t>(round_half_even((yc - h) * (2.0f * q))));
  }
  return s;
}

// Where the filter-gradient codes go (int8 mode of the backward).
struct FilterCodes {
  const float* col_scale = nullptr;  // s_w [4F]; nullptr: write the float dfilt instead
  float tiny = 0.0f;
  bool planar = false;  // hi rows then lo rows (oneDNN), or (hi, lo) pairs of rows (torch._int_mm)
  int8_t* codes = nullptr;  // [2E, 4F]
  float* scale = nullptr;   // [E]
};

// The INT8 edge filter inside the kernel. Forward: the filter rows of a window of receivers'
// edges = rescale(two-limb codes of the edge features x W_q^T), the codes made from the
// window's rows of edge features as quantize_static_limbs does, through oneDNN's brgemm
// micro-kernel (AMX-INT8), exactly the arithmetic of the filter layer's "brgemm" GEMM in
// qeq_ase/kernels/csrc/int8_kernels.cpp, written to filt [E, 4F] for the backward and used while they
// are in cache (the separate GEMM wrote them to memory and the kernel read them back).
// Backward: the filter's input-gradient GEMM runs on a window of senders' gradient codes the
// same way, writing dL/d(edge features) [E, K] (float) instead of codes [2E, 4F]. (Recomputing
// the rows in the backward instead of storing them was measured slower: three brgemm passes
// per layer cost more than reading the stored rows.)
struct InKernelFilter {
  const float* x = nullptr;       // [E, K] the edge features (the filter layer's input)
  const int8_t* w_fwd = nullptr;  // W_q^T [K, 4F] in the VNNI layout [K/4, 4F, 4]
  const int8_t* w_bwd = nullptr;  // W_q [4F, K] in the VNNI layout [4F/4, K, 4] (backward)
  const float* w_scale = nullptr;  // s_w [4F]
  float step = 1.0f;                // the input step (static, per tensor)
  float inv_lo = 1.0f / 254.0f;     // 1 / (2 qmax) of the input limbs
  float qmax = 127.0f;              // the input quantizer's clip (STE mask)
  int64_t K = 0;
  const float* mask_x = nullptr;  // [E, K] the edge features where some were clipped, else nullptr
  float* dfeat = nullptr;         // [E, K] the backward's output
  std::atomic<bool>* clipped = nullptr;  // forward: set when some x / step lay beyond +-qmax
  bool on() const { return x != nullptr; }                 // forward: compute the rows
  bool grad_gemm() const { return w_bwd != nullptr; }      // backward: the input-gradient GEMM
};

constexpr int64_t kFilterRows = 16;  // edges per micro-kernel call (forward: 4F = 512 wide)
constexpr int64_t kFilterGradRows = 32;  // ... in the input-gradient GEMM (K = 128 wide: 32 rows were faster)
// Filter rows are computed for the edges of a run of whole nodes (a window) of at most this
// many edges (or one node), so that most micro-kernel calls have kFilterRows rows: one call
// per node (~14 edges) cost more in call overhead than the rows saved.
constexpr int64_t kWindowEdges = 128;

// Scratch of one thread for InKernelFilter.
struct FilterScratch {
  std::vector<int8_t> a;      // input codes of kFilterRows edges [2 kFilterRows, K] (hi, lo rows)
  std::vector<int32_t> acc;   // [2 kFilterRows, 4F] or [2 kFilterGradRows, K]
  std::vector<float> rows;     // filter rows of a window's edges [n, 4F] (forward)
  std::vector<int8_t> gcodes;  // gradient codes of a window's edges [2 n, 4F]
  std::vector<float> gscale;   // their row scales [deg]
  int64_t begin = 0, end = 0;  // the window: positions [begin, end) of the edge order (see window_end)
  // used = false (float path, no in-kernel filter): nothing is allocated
  FilterScratch(int64_t K, int64_t F, bool used)
      : a(used ? 2 * kFilterRows * K : 0), acc(used ? 2 * std::max(kFilterRows * 4 * F, kFilterGradRows * K) : 0) {}
};

// ptr[n1] for the last node n1 in (n, last] whose edges ptr[n] .. ptr[n1] number at most
// kWindowEdges (at least n1 = n + 1): the end of a window of whole nodes starting at node n.
inline int64_t window_end(const int64_t* ptr, int64_t n, int64_t last) {
  int64_t n1 = n + 1;
  while (n1 < last && ptr[n1 + 1] - ptr[n] <= kWindowEdges) ++n1;
  return ptr[n1];
}

// The rescales below must round exactly like rescale_row in int8_kernels.cpp (built with
// -ffp-contract=off): no fused multiply-add.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")

// o[n] = (hi[n] + lo[n] * inv_lo) * (r * cs[n])   (cs nullptr: * r)
inline void rescale_limbs(const int32_t* __restrict hi, const int32_t* __restrict lo, int64_t n, float inv_lo,
                          float r, const float* __restrict cs, float* __restrict o) {
  if (cs) {
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) o[k] = (static_cast<float>(hi[k]) + static_cast<float>(lo[k]) * inv_lo) * (r * cs[k]);
  } else {
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) o[k] = (static_cast<float>(hi[k]) + static_cast<float>(lo[k]) * inv_lo) * r;
  }
}

#pragma GCC pop_options

// out [n, 4F] = the filter rows of edges e0 .. e0 + n - 1.
inline void filter_rows(const InKernelFilter& f, int64_t e0, int64_t n, int64_t F4, FilterScratch& w, float* out) {
  const int64_t K = f.K;
  int32_t clipped = 0;
  for (int64_t r0 = 0; r0 < n; r0 += kFilterRows) {
    const int64_t rows = std::min(kFilterRows, n - r0);
    for (int64_t i = 0; i < rows; ++i) {
      int8_t* hi = w.a.data() + 2 * i * K;
      clipped |= quantize_limbs(f.x + (e0 + r0 + i) * K, K, f.step, f.qmax, hi, hi + K);
    }
    const auto* a = reinterpret_cast<const signed char*>(w.a.data());
    const auto* b = reinterpret_cast<const signed char*>(f.w_fwd);
    // a holds hi, lo, hi, lo, ... rows: both limbs in one call of 2 * rows rows, so the micro-kernel
    // loads W once for both (1.5% of a 1,344-atom INT8 call on 2 threads); acc rows alternate alike.
    at::native::cpublas::brgemm(2 * rows, F4, K, K, F4, F4, false, a, b, w.acc.data(), true);
    for (int64_t i = 0; i < rows; ++i) {
      const int32_t* hi = w.acc.data() + 2 * i * F4;
      rescale_limbs(hi, hi + F4, F4, f.inv_lo, f.step, f.w_scale, out + (r0 + i) * F4);
    }
  }
  if (clipped) f.clipped->store(true, std::memory_order_relaxed);
}

// dL/d(edge features) of edges edge(0..n-1) from their gradient codes [2n, 4F] (interleaved
// limbs) and row scales: (codes x W_q) rescaled per row, masked by the input's STE.
template <typename EdgeOf>
void filter_input_grad(const InKernelFilter& f, int64_t n, int64_t F4, EdgeOf edge, FilterScratch& w) {
  const int64_t K = f.K;
  for (int64_t r0 = 0; r0 < n; r0 += kFilterGradRows) {
    const int64_t rows = std::min(kFilterGradRows, n - r0);
    const auto* a = reinterpret_cast<const signed char*>(w.gcodes.data() + 2 * r0 * F4);
    const auto* b = reinterpret_cast<const signed char*>(f.w_bwd);
    at::native::cpublas::brgemm(2 * rows, K, F4, F4, K, K, false, a, b, w.acc.data(), true);  // both limbs, as above
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t e = edge(r0 + i);
      float* d = f.dfeat + e * K;
      const int32_t* hi = w.acc.data() + 2 * i * K;
      rescale_limbs(hi, hi + K, K, 1.0f / 254.0f, w.gscale[r0 + i], nullptr, d);
      if (f.mask_x) {
        const float* x = f.mask_x + e * K;
        for (int64_t k = 0; k < K; ++k) {
          const float y = x[k] / f.step;
          d[k] = (y >= -f.qmax && y <= f.qmax) ? d[k] : 0.0f;
        }
      }
    }
  }
}

// Asks for the cache lines of [p, p + bytes) to be loaded (a hint; no effect on results).
inline void prefetch(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(c + b, 0, 3);
}

// q / max(|q|, eps) per head of one node; returns nothing, fills qn and the clamped norms.
template <typename T>
inline void normalize_heads(const T* __restrict q, T* __restrict qn, T* __restrict qnorm, int64_t H, int64_t D) {
  for (int64_t h = 0; h < H; ++h) {
    const T* qh = q + h * D;
    const T norm = std::max(std::sqrt(dot(qh, qh, D)), static_cast<T>(kNormEps));
    qnorm[h] = norm;
    for (int64_t t = 0; t < D; ++t) qn[h * D + t] = qh[t] / norm;
  }
}

// Logits of the edges of receiver i (filter rows fr [deg, 4F]) into logits [deg, H] (a scratch buffer), and the
// cosines (or plain dot products) and clamped filtered-key norms into the per-edge
// cos [E, H] and knorm [E, H] that the backward pass reuses.
template <typename T>
void edge_logits(const T* qkv, const T* fr, const T* scale, const Graph& g, const Sizes& s, bool normalize,
                 int64_t i, const T* qn, T* logits, T* cos, T* knorm) {
  const int64_t e0 = g.rowptr[i], e1 = g.rowptr[i + 1];
  const T* q = qkv + i * 5 * s.F;
  for (int64_t e = e0; e < e1; ++e) {
    const T* k = qkv + g.sender[e] * 5 * s.F + s.F;
    const T* kf = fr + (e - e0) * 4 * s.F;
    for (int64_t h = 0; h < s.H; ++h) {
      T kk2 = 0, qk = 0;
      const T* qh = normalize ? qn + h * s.D : q + h * s.D;
#pragma omp simd reduction(+ : kk2, qk)
      for (int64_t t = 0; t < s.D; ++t) {
        const T kk = k[h * s.D + t] * kf[h * s.D + t];
        kk2 += kk * kk;
        qk += qh[t] * kk;
      }
      const int64_t at = e * s.H + h;
      const T norm = normalize ? std::max(std::sqrt(kk2), static_cast<T>(kNormEps)) : T(1);
      knorm[at] = norm;
      cos[at] = qk / norm;
      logits[(e - e0) * s.H + h] = scale[h] * cos[at];
    }
  }
}

// dst[0, n) = src[0, n), with non-temporal stores where possible (dst is not read again soon).
inline void stream_copy(float* __restrict dst, const float* __restrict src, int64_t n) {
#if defined(__AVX512F__)
  if (reinterpret_cast<uintptr_t>(dst) % 64 == 0 && n % 16 == 0) {
    for (int64_t k = 0; k < n; k += 16) _mm512_stream_ps(dst + k, _mm512_loadu_ps(src + k));
    return;
  }
#endif
  std::memcpy(dst, src, n * sizeof(float));
}

// The filter rows [deg, 4F] of receiver i's edges. In-kernel filter (forward): computed for a
// window of receivers i .. of this thread's range (which ends at node `last`) into scratch, where
// the kernel reads them, and streamed to filt for the backward. Otherwise the rows of filt.
template <typename T>
const T* receiver_filter(T* filt, const InKernelFilter& inf, const Graph& g, const Sizes& s, int64_t i, int64_t last,
                         FilterScratch& w) {
  const int64_t e_i = g.rowptr[i];
  if constexpr (std::is_same_v<T, float>) {
    if (inf.on()) {
      if (e_i < w.begin || g.rowptr[i + 1] > w.end || w.end == w.begin) {
        w.begin = e_i;
        w.end = window_end(g.rowptr, i, last);
        const int64_t n = (w.end - w.begin) * 4 * s.F;
        w.rows.resize(n);
        filter_rows(inf, e_i, w.end - w.begin, 4 * s.F, w, w.rows.data());
        stream_copy(filt + e_i * 4 * s.F, w.rows.data(), n);
      }
      return w.rows.data() + (e_i - w.begin) * 4 * s.F;
    }
  }
  return filt + e_i * 4 * s.F;
}

template <typename T>
void forward_impl(const T* qkv, const T* vin, T* filt, const T* env, const T* unit, const T* scale,
                  const Graph& g, const Sizes& s, bool normalize, T* agg_s, T* agg_v, T* u_out, T* cos, T* knorm,
                  const InKernelFilter& inf) {
  const int64_t F = s.F, H = s.H, D = s.D;
  at::parallel_for(0, s.N, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> qn(F), qnorm(H), logits, m(H), denom(H);
    FilterScratch scratch(inf.K, F, inf.on());
    for (int64_t i = begin; i < end; ++i) {
      T* as = agg_s + i * F;
      T* av = agg_v + i * 3 * F;
      std::fill(as, as + F, T(0));
      std::fill(av, av + 3 * F, T(0));
      const int64_t e0 = g.rowptr[i], e1 = g.rowptr[i + 1], deg = e1 - e0;
      if (deg == 0) continue;
      logits.resize(deg * H);
      if (normalize) normalize_heads(qkv + i * 5 * F, qn.data(), qnorm.data(), H, D);
      const T* fr = receiver_filter(filt, inf, g, s, i, end, scratch);
      edge_logits(qkv, fr, scale, g, s, normalize, i, qn.data(), logits.data(), cos, knorm);
      // sink softmax: the shift includes 0 (the sink's logit), as attention.sink_softmax does
      std::fill(m.begin(), m.end(), T(0));
      for (int64_t k = 0; k < deg; ++k)
        for (int64_t h = 0; h < H; ++h) m[h] = std::max(m[h], logits[k * H + h]);
      for (int64_t h = 0; h < H; ++h) denom[h] = std::exp(-m[h]);
      for (int64_t k = 0; k < deg; ++k)
        for (int64_t h = 0; h < H; ++h) {
          const T w = std::exp(logits[k * H + h] - m[h]);
          logits[k * H + h] = w;  // reuse the buffer for exp(l - m)
          denom[h] += env[e0 + k] * w;
        }
      for (int64_t h = 0; h < H; ++h) denom[h] = T(1) / denom[h];
      for (int64_t k = 0; k < deg; ++k) {
        const int64_t e = e0 + k, j = g.sender[e];
        const T c = env[e];
        const T* vals = qkv + j * 5 * F + 2 * F;
        const T* vf = fr + k * 4 * F + F;
        const T* vj = vin + j * 3 * F;
        const T* ue = unit + 3 * e;
        T* u = u_out + e * H;
        for (int64_t h = 0; h < H; ++h) {
          u[h] = logits[k * H + h] * denom[h];
          const T a = c * u[h] * c;  // attention weight times the envelope of the value filter
#pragma omp simd
          for (int64_t t = h * D; t < (h + 1) * D; ++t) as[t] += a * (vals[t] * vf[t]);
        }
#pragma omp simd
        for (int64_t f = 0; f < F; ++f) {
          const T gvec = vals[F + f] * vf[F + f] * c;
          const T gdir = vals[2 * F + f] * vf[2 * F + f] * c;
          av[f] += vj[f] * gvec + ue[0] * gdir;
          av[F + f] += vj[F + f] * gvec + ue[1] * gdir;
          av[2 * F + f] += vj[2 * F + f] * gvec + ue[2] * gdir;
        }
      }
    }
    if (inf.on()) {
      at::native::cpublas::brgemm_release(true);
#if defined(__AVX512F__)
      _mm_sfence();  // the streamed rows of filt
#endif
    }
  });
}

// Pass 1 (receivers): dL/dl_e [E, H], the softmax part of dL/dC_e, dL/dq_i, and the
// normalised queries qn [N, F] that pass 2 needs.
template <typename T>
void backward_receivers(const T* qkv, const T* filt, const T* env, const T* scale, const T* u_in, const T* knorm,
                        const T* gs, const Graph& g, const Sizes& s, bool normalize, T* dlogit, T* denv, T* dqkv,
                        T* qn_all) {
  const int64_t F = s.F, H = s.H, D = s.D;
  at::parallel_for(0, s.N, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> qnorm(H), da, sum_ada(H), dq(F);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t e0 = g.rowptr[i], e1 = g.rowptr[i + 1], deg = e1 - e0;
      const T* q = qkv + i * 5 * F;
      T* qn = qn_all + i * F;
      if (normalize) normalize_heads(q, qn, qnorm.data(), H, D);
      T* dqi = dqkv + i * 5 * F;  // the q columns of row i
      std::fill(dqi, dqi + F, T(0));
      if (deg == 0) continue;
      const T* gsi = gs + i * F;
      const T* fr = filt + e0 * 4 * F;
      da.resize(deg * H);
      std::fill(sum_ada.begin(), sum_ada.end(), T(0));
      for (int64_t k = 0; k < deg; ++k) {
        const int64_t e = e0 + k, j = g.sender[e];
        const T c = env[e];
        const T* vals = qkv + j * 5 * F + 2 * F;
        const T* vf = fr + k * 4 * F + F;
        for (int64_t h = 0; h < H; ++h) {
          T acc = 0;
#pragma omp simd reduction(+ : acc)
          for (int64_t t = h * D; t < (h + 1) * D; ++t) acc += gsi[t] * (vals[t] * vf[t]);
          da[k * H + h] = acc * c;  // dL/da_e
          sum_ada[h] += c * u_in[e * H + h] * da[k * H + h];
        }
      }
      std::fill(dq.begin(), dq.end(), T(0));
      for (int64_t k = 0; k < deg; ++k) {
        const int64_t e = e0 + k;
        const T* kj = qkv + g.sender[e] * 5 * F + F;
        const T* kf = fr + k * 4 * F;
        T dc = 0;
        for (int64_t h = 0; h < H; ++h) {
          const T u = u_in[e * H + h], diff = da[k * H + h] - sum_ada[h];
          const T dl = env[e] * u * diff;
          dlogit[e * H + h] = dl;
          dc += u * diff;
          // d l / d (qn or q) = scale * kk / |kk|   (or scale * kk)
          const T coef = dl * scale[h] / knorm[e * H + h];
#pragma omp simd
          for (int64_t t = h * D; t < (h + 1) * D; ++t) dq[t] += coef * (kj[t] * kf[t]);
        }
        denv[e] = dc;
      }
      if (normalize) {  // through qn = q / max(|q|, eps)
        for (int64_t h = 0; h < H; ++h) {
          const T* qnh = qn + h * D;
          const T* dqh = dq.data() + h * D;
          const T proj = qnorm[h] > kNormEps ? dot(qnh, dqh, D) : T(0);
          const T inv = T(1) / qnorm[h];
          for (int64_t t = 0; t < D; ++t) dqi[h * D + t] = (dqh[t] - qnh[t] * proj) * inv;
        }
      } else {
        std::copy(dq.begin(), dq.end(), dqi);
      }
    }
  });
}

// Pass 2 (senders): gradients of the sender's k, values and vin, and the per-edge filter,
// envelope and unit-vector gradients.
template <typename T>
void backward_senders(const T* qkv, const T* vin, const T* filt, const T* env, const T* unit, const T* scale,
                      const T* u_in, const T* knorm, const T* qn_all, const T* gs, const T* gv, const T* dlogit,
                      const Graph& g, const Sizes& s, bool normalize, T* dqkv, T* dvin, T* dfilt, T* denv,
                      T* dunit, const FilterCodes& fc, const InKernelFilter& inf) {
  const int64_t F = s.F, H = s.H, D = s.D;
  at::parallel_for(0, s.N, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> row(fc.col_scale ? 4 * F : 0);  // one edge's filter gradient, int8 mode
    FilterScratch scratch(inf.K, F, inf.grad_gemm());
    // dL/d(edge features) of the window's edges from their gradient codes, once all are written
    auto flush_input_grad = [&](FilterScratch& w) {
      if constexpr (std::is_same_v<T, float>) {
        if (inf.grad_gemm() && w.end > w.begin)
          filter_input_grad(inf, w.end - w.begin, 4 * F, [&](int64_t r) { return g.sender_order[w.begin + r]; }, w);
      }
      w.begin = w.end = 0;
    };
    const int64_t last_edge = g.colptr[end];
    for (int64_t j = begin; j < end; ++j) {
      T* dk = dqkv + j * 5 * F + F;  // k and the three value parts, 4F columns
      T* dvj = dvin + j * 3 * F;
      std::fill(dk, dk + 4 * F, T(0));
      std::fill(dvj, dvj + 3 * F, T(0));
      const T* k = qkv + j * 5 * F + F;
      const T* vals = k + F;
      const T* vj = vin + j * 3 * F;
      const int64_t c0 = g.colptr[j], out_deg = g.colptr[j + 1] - c0;
      if (inf.grad_gemm() && (c0 < scratch.begin || c0 + out_deg > scratch.end || scratch.end == scratch.begin)) {
        flush_input_grad(scratch);  // the previous window's input-gradient GEMM
        scratch.begin = c0;
        scratch.end = window_end(g.colptr, j, end);
        scratch.gcodes.resize(2 * (scratch.end - scratch.begin) * 4 * F);
        scratch.gscale.resize(scratch.end - scratch.begin);
      }
      for (int64_t o = c0; o < c0 + out_deg; ++o) {
        const int64_t e = g.sender_order[o], i = g.receiver[e];
        if (o + 1 < last_edge) {  // the next edge's rows lie anywhere in memory: fetch them while this one runs
          const int64_t e_next = g.sender_order[o + 1];
          const int64_t i_next = g.receiver[e_next];
          prefetch(filt + e_next * 4 * F, 4 * F * sizeof(T));
          prefetch(gv + i_next * 3 * F, 3 * F * sizeof(T));
          prefetch(gs + i_next * F, F * sizeof(T));
          if (normalize) prefetch(qn_all + i_next * F, F * sizeof(T));
          for (const T* per_edge : {u_in, knorm, dlogit}) prefetch(per_edge + e_next * H, H * sizeof(T));
        }
        const T c = env[e];
        const T* kf = filt + e * 4 * F;
        const T* vf = kf + F;
        const T* gsi = gs + i * F;
        const T* gvi = gv + i * 3 * F;
        const T* ue = unit + 3 * e;
        T* dkf = fc.col_scale ? row.data() : dfilt + e * 4 * F;
        T* dvf = dkf + F;
        T dc = 0, du0 = 0, du1 = 0, du2 = 0;
        // scalar message: agg_s += (C u) * vals_x * vf_x * C
        for (int64_t h = 0; h < H; ++h) {
          const T a = c * u_in[e * H + h];
#pragma omp simd reduction(+ : dc)
          for (int64_t t = h * D; t < (h + 1) * D; ++t) {
            const T dx = gsi[t] * a;  // dL/dx, x = vals_x vf_x C
            dk[F + t] += dx * vf[t] * c;
            dvf[t] = dx * vals[t] * c;
            dc += dx * vals[t] * vf[t];
          }
        }
        // vector message: agg_v += vin_j g_vec + unit g_dir
#pragma omp simd reduction(+ : dc, du0, du1, du2)
        for (int64_t f = 0; f < F; ++f) {
          const T gvec = vals[F + f] * vf[F + f] * c;
          const T gdir = vals[2 * F + f] * vf[2 * F + f] * c;
          const T dgvec = gvi[f] * vj[f] + gvi[F + f] * vj[F + f] + gvi[2 * F + f] * vj[2 * F + f];
          const T dgdir = gvi[f] * ue[0] + gvi[F + f] * ue[1] + gvi[2 * F + f] * ue[2];
          dvj[f] += gvi[f] * gvec;
          dvj[F + f] += gvi[F + f] * gvec;
          dvj[2 * F + f] += gvi[2 * F + f] * gvec;
          du0 += gvi[f] * gdir;
          du1 += gvi[F + f] * gdir;
          du2 += gvi[2 * F + f] * gdir;
          dk[2 * F + f] += dgvec * vf[F + f] * c;
          dvf[F + f] = dgvec * vals[F + f] * c;
          dk[3 * F + f] += dgdir * vf[2 * F + f] * c;
          dvf[2 * F + f] = dgdir * vals[2 * F + f] * c;
          dc += dgvec * vals[F + f] * vf[F + f] + dgdir * vals[2 * F + f] * vf[2 * F + f];
        }
        denv[e] += dc;
        dunit[3 * e] = du0;
        dunit[3 * e + 1] = du1;
        dunit[3 * e + 2] = du2;
        // key path: l = scale cos(q_i, kk) (or scale <q_i, kk>), kk = k_j * kf_e
        const T* qi = normalize ? qn_all + i * F : qkv + i * 5 * F;
        for (int64_t h = 0; h < H; ++h) {
          const T dl = dlogit[e * H + h] * scale[h];
          const int64_t t0 = h * D, t1 = t0 + D;
          if (normalize) {
            // d cos / d kk = (qn - kk <kk, qn> / |kk|^2) / |kk|
            const T inv = T(1) / knorm[e * H + h];
            T kq = 0;
#pragma omp simd reduction(+ : kq)
            for (int64_t t = t0; t < t1; ++t) kq += k[t] * kf[t] * qi[t];
            const T proj = knorm[e * H + h] > kNormEps ? kq * inv * inv : T(0);
#pragma omp simd
            for (int64_t t = t0; t < t1; ++t) {
              const T dkk = dl * (qi[t] - k[t] * kf[t] * proj) * inv;
              dk[t] += dkk * kf[t];
              dkf[t] = dkk * k[t];
            }
          } else {
#pragma omp simd
            for (int64_t t = t0; t < t1; ++t) {
              const T dkk = dl * qi[t];
              dk[t] += dkk * kf[t];
              dkf[t] = dkk * k[t];
            }
          }
        }
        if constexpr (std::is_same_v<T, float>) {
          if (fc.col_scale && inf.grad_gemm()) {  // codes in the window's scratch, for its GEMM
            int8_t* hi = scratch.gcodes.data() + 2 * (o - scratch.begin) * 4 * F;
            scratch.gscale[o - scratch.begin] = quantize_row_limbs(row.data(), fc.col_scale, 4 * F, fc.tiny, hi,
                                                                   hi + 4 * F);
          } else if (fc.col_scale) {
            int8_t* hi = fc.codes + (fc.planar ? e : 2 * e) * 4 * F;
            int8_t* lo = hi + (fc.planar ? s.E : 1) * 4 * F;
            fc.scale[e] = quantize_row_limbs(row.data(), fc.col_scale, 4 * F, fc.tiny, hi, lo);
          }
        }
      }
    }
    flush_input_grad(scratch);
    if (inf.grad_gemm()) at::native::cpublas::brgemm_release(true);
  });
}

}  // namespace

// The in-kernel INT8 filter from its tensors (all absent: the stored filt is used).
InKernelFilter make_filter(const Sizes& s, const c10::optional<at::Tensor>& x, const c10::optional<at::Tensor>& w_fwd,
                           const c10::optional<at::Tensor>& w_scale, double step, double qmax) {
  InKernelFilter f;
  if (!x.has_value()) return f;
  TORCH_CHECK(w_fwd.has_value() && w_scale.has_value(), "the in-kernel filter needs its packed weight and scales");
  check(*x, "filter_x", at::kFloat);
  check(*w_fwd, "filter_w", at::kChar);
  check(*w_scale, "filter_w_scale", at::kFloat);
  f.K = x->size(1);
  TORCH_CHECK(x->dim() == 2 && x->size(0) == s.E, "filter_x must be the edge features [E, K]");
  TORCH_CHECK(w_fwd->dim() == 3 && w_fwd->size(0) * 4 == f.K && w_fwd->size(1) == 4 * s.F && w_fwd->size(2) == 4,
              "filter_w must be W_q^T [K, 4F] in the VNNI layout [K/4, 4F, 4]");
  TORCH_CHECK(w_scale->numel() == 4 * s.F, "filter_w_scale must have 4F entries");
  f.x = x->data_ptr<float>();
  f.w_fwd = w_fwd->data_ptr<int8_t>();
  f.w_scale = w_scale->data_ptr<float>();
  f.step = static_cast<float>(step);
  f.qmax = static_cast<float>(qmax);
  f.inv_lo = 1.0f / (2.0f * f.qmax);
  return f;
}

// Returns agg_s [N, F], agg_v [N, 3, F] and, saved for the backward pass, u [E, H] (the
// softmax weights before the envelope), cos [E, H] (cosines or dot products) and
// knorm [E, H] (clamped filtered-key norms; 1 without normalisation); with the in-kernel
// filter (filter_x, filter_w, filter_w_scale given; filt empty) also the filter rows
// filt [E, 4F] it computed, which the backward takes as filt, and whether some edge feature
// was clipped (a bool tensor: the backward then needs filter_mask_x).
std::vector<at::Tensor> edge_attention_forward(const at::Tensor& qkv, const at::Tensor& vin, const at::Tensor& filt,
                                               const at::Tensor& env, const at::Tensor& unit, const at::Tensor& scale,
                                               const at::Tensor& rowptr, const at::Tensor& sender,
                                               const at::Tensor& receiver, const at::Tensor& colptr,
                                               const at::Tensor& sender_order, bool normalize,
                                               const c10::optional<at::Tensor>& filter_x,
                                               const c10::optional<at::Tensor>& filter_w,
                                               const c10::optional<at::Tensor>& filter_w_scale, double filter_step,
                                               double filter_qmax) {
  const Sizes s = check_inputs(qkv, vin, filt, env, unit, scale, rowptr, sender, receiver, colptr, sender_order);
  const Graph g = graph_of(rowptr, sender, receiver, colptr, sender_order);
  InKernelFilter inf = make_filter(s, filter_x, filter_w, filter_w_scale, filter_step, filter_qmax);
  std::atomic<bool> clipped{false};
  inf.clipped = &clipped;
  TORCH_CHECK(inf.on() ? qkv.scalar_type() == at::kFloat : filt.numel() == s.E * 4 * s.F,
              "give filt [E, 4F], or (float32) the in-kernel filter's input, weight and scales");
  auto agg_s = at::empty({s.N, s.F}, qkv.options());
  auto agg_v = at::empty({s.N, 3, s.F}, qkv.options());
  auto u = at::empty({s.E, s.H}, qkv.options());
  auto cos = at::empty({s.E, s.H}, qkv.options());
  auto knorm = at::empty({s.E, s.H}, qkv.options());
  at::Tensor rows = inf.on() ? at::empty({s.E, 4 * s.F}, qkv.options()) : filt;
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "edge_attention_forward", [&] {
    // (filt is only read, except in the in-kernel mode, where rows is the new tensor)
    forward_impl<scalar_t>(qkv.data_ptr<scalar_t>(), vin.data_ptr<scalar_t>(), rows.data_ptr<scalar_t>(),
                           env.data_ptr<scalar_t>(), unit.data_ptr<scalar_t>(), scale.data_ptr<scalar_t>(), g, s,
                           normalize, agg_s.data_ptr<scalar_t>(), agg_v.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(),
                           cos.data_ptr<scalar_t>(), knorm.data_ptr<scalar_t>(), inf);
  });
  if (inf.on()) return {agg_s, agg_v, u, cos, knorm, rows, at::scalar_tensor(clipped.load(), at::kBool)};
  return {agg_s, agg_v, u, cos, knorm};
}

// Returns dqkv [N, 5F], dvin [N, 3, F], dfilt [E, 4F], denv [E], dunit [E, 3], dscale [H],
// and two empty tensors. Int8 mode (filt_col_scale [4F] given, float32 only): dfilt is
// empty and the last two are the codes [2E, 4F] (int8; planar or interleaved limbs) and
// the row scales [E] of dfilt * filt_col_scale (see FilterCodes).
std::vector<at::Tensor> edge_attention_backward(const at::Tensor& grad_s, const at::Tensor& grad_v,
                                                const at::Tensor& qkv, const at::Tensor& vin, const at::Tensor& filt,
                                                const at::Tensor& env, const at::Tensor& unit,
                                                const at::Tensor& scale, const at::Tensor& u,
                                                const at::Tensor& cos, const at::Tensor& knorm,
                                                const at::Tensor& rowptr, const at::Tensor& sender,
                                                const at::Tensor& receiver, const at::Tensor& colptr,
                                                const at::Tensor& sender_order, bool normalize,
                                                const c10::optional<at::Tensor>& filt_col_scale, double tiny,
                                                bool planar, const c10::optional<at::Tensor>& filter_w_bwd,
                                                double filter_step, double filter_qmax,
                                                const c10::optional<at::Tensor>& filter_mask_x) {
  const Sizes s = check_inputs(qkv, vin, filt, env, unit, scale, rowptr, sender, receiver, colptr, sender_order);
  const Graph g = graph_of(rowptr, sender, receiver, colptr, sender_order);
  TORCH_CHECK(filt.numel() == s.E * 4 * s.F, "filt must be [E, 4F]");
  InKernelFilter inf;  // with filter_w_bwd: the filter's input-gradient GEMM in the kernel
  at::Tensor dfeat;
  if (filter_w_bwd.has_value()) {
    TORCH_CHECK(filt_col_scale.has_value(), "the in-kernel input-gradient GEMM needs filt_col_scale (s_w)");
    check(*filter_w_bwd, "filter_w_bwd", at::kChar);
    TORCH_CHECK(filter_w_bwd->dim() == 3 && filter_w_bwd->size(0) == s.F && filter_w_bwd->size(2) == 4,
                "filter_w_bwd must be W_q [4F, K] in the VNNI layout [F, K, 4]");
    inf.K = filter_w_bwd->size(1);
    inf.w_bwd = filter_w_bwd->data_ptr<int8_t>();
    inf.step = static_cast<float>(filter_step);
    inf.qmax = static_cast<float>(filter_qmax);
    if (filter_mask_x.has_value()) {
      check(*filter_mask_x, "filter_mask_x", at::kFloat);
      TORCH_CHECK(filter_mask_x->numel() == s.E * inf.K, "filter_mask_x must be the edge features [E, K]");
      inf.mask_x = filter_mask_x->data_ptr<float>();
    }
    dfeat = at::empty({s.E, inf.K}, qkv.options());
    inf.dfeat = dfeat.data_ptr<float>();
  }
  check(grad_s, "grad_s", qkv.scalar_type());
  check(grad_v, "grad_v", qkv.scalar_type());
  for (auto [t, name] : {std::pair{&u, "u"}, {&cos, "cos"}, {&knorm, "knorm"}}) {
    check(*t, name, qkv.scalar_type());
    TORCH_CHECK(t->numel() == s.E * s.H, name, " must be [E, H]");
  }
  TORCH_CHECK(grad_s.numel() == s.N * s.F && grad_v.numel() == 3 * s.N * s.F,
              "grad_s [N, F] and grad_v [N, 3, F] do not match the inputs");
  FilterCodes fc;
  at::Tensor codes, code_scale;
  if (filt_col_scale.has_value()) {
    TORCH_CHECK(qkv.scalar_type() == at::kFloat, "int8 filter-gradient codes need float32 inputs");
    check(*filt_col_scale, "filt_col_scale", at::kFloat);
    TORCH_CHECK(filt_col_scale->numel() == 4 * s.F, "filt_col_scale must have 4F entries");
    // (with the in-kernel filter the codes stay in each thread's scratch)
    codes = at::empty({inf.grad_gemm() ? 0 : 2 * s.E, 4 * s.F}, qkv.options().dtype(at::kChar));
    code_scale = at::empty({inf.grad_gemm() ? 0 : s.E}, qkv.options());
    fc = {filt_col_scale->data_ptr<float>(), static_cast<float>(tiny), planar, codes.data_ptr<int8_t>(),
          code_scale.data_ptr<float>()};
  }
  auto dqkv = at::empty_like(qkv);
  auto dvin = at::empty_like(vin);
  auto dfilt = fc.col_scale ? at::empty({0}, filt.options()) : at::empty_like(filt);
  auto denv = at::empty_like(env);
  auto dunit = at::empty_like(unit);
  auto dlogit = at::empty({s.E, s.H}, qkv.options());
  auto qn = at::empty({s.N, s.F}, qkv.options());
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "edge_attention_backward", [&] {
    backward_receivers<scalar_t>(qkv.data_ptr<scalar_t>(), filt.data_ptr<scalar_t>(), env.data_ptr<scalar_t>(),
                                 scale.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), knorm.data_ptr<scalar_t>(),
                                 grad_s.data_ptr<scalar_t>(), g, s, normalize, dlogit.data_ptr<scalar_t>(),
                                 denv.data_ptr<scalar_t>(), dqkv.data_ptr<scalar_t>(), qn.data_ptr<scalar_t>());
    backward_senders<scalar_t>(qkv.data_ptr<scalar_t>(), vin.data_ptr<scalar_t>(), filt.data_ptr<scalar_t>(),
                               env.data_ptr<scalar_t>(), unit.data_ptr<scalar_t>(), scale.data_ptr<scalar_t>(),
                               u.data_ptr<scalar_t>(), knorm.data_ptr<scalar_t>(), qn.data_ptr<scalar_t>(),
                               grad_s.data_ptr<scalar_t>(), grad_v.data_ptr<scalar_t>(), dlogit.data_ptr<scalar_t>(),
                               g, s, normalize, dqkv.data_ptr<scalar_t>(), dvin.data_ptr<scalar_t>(),
                               dfilt.data_ptr<scalar_t>(), denv.data_ptr<scalar_t>(), dunit.data_ptr<scalar_t>(),
                               fc, inf);
  });
  auto dscale = (dlogit * cos).sum(0);
  if (!codes.defined() || inf.grad_gemm()) codes = code_scale = at::empty({0}, qkv.options());
  // with the in-kernel input-gradient GEMM, the third output is dL/d(edge features) [E, K]
  return {dqkv, dvin, inf.grad_gemm() ? dfeat : dfilt, denv, dunit, dscale, codes, code_scale};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &edge_attention_forward, "fused per-edge attention of one layer: agg_s, agg_v, u, cos, knorm",
        py::arg("qkv"), py::arg("vin"), py::arg("filt"), py::arg("env"), py::arg("unit"), py::arg("scale"),
        py::arg("rowptr"), py::arg("sender"), py::arg("receiver"), py::arg("colptr"), py::arg("sender_order"),
        py::arg("normalize"), py::arg("filter_x") = py::none(), py::arg("filter_w") = py::none(),
        py::arg("filter_w_scale") = py::none(), py::arg("filter_step") = 1.0, py::arg("filter_qmax") = 127.0);
  m.def("backward", &edge_attention_backward, "first-order backward of forward (forces)", py::arg("grad_s"),
        py::arg("grad_v"), py::arg("qkv"), py::arg("vin"), py::arg("filt"), py::arg("env"), py::arg("unit"),
        py::arg("scale"), py::arg("u"), py::arg("cos"), py::arg("knorm"), py::arg("rowptr"), py::arg("sender"),
        py::arg("receiver"), py::arg("colptr"), py::arg("sender_order"), py::arg("normalize"),
        py::arg("filt_col_scale") = py::none(), py::arg("tiny") = 1e-30, py::arg("planar") = false,
        py::arg("filter_w_bwd") = py::none(), py::arg("filter_step") = 1.0, py::arg("filter_qmax") = 127.0,
        py::arg("filter_mask_x") = py::none());
}
