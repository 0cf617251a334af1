// Fused element-wise kernels around the int8 GEMMs (torch._int_mm, or oneDNN's int8 linear
// on AMX) for qeq_ase.quant.int8_linear.
//
// Built lazily by qeq_ase/quant/int8_kernels.py (torch.utils.cpp_extension.load) on first use.
// Every kernel is one pass over its data (rows fit in L1) and follows the operation
// order of the eager definitions in qeq_ase/quant/quantizers.py, so that its int8 codes agree
// bit for bit with the fake quantizers of QAT: x / step (a true division, not x * 1/step),
// clamp, round half to even, no fused multiply-add (built with -ffp-contract=off).
//
// Shapes: x [M, K] float32, codes [M, K] int8, acc [M, N] int32 (the GEMM's output),
// vectors [N, 3, F] float32 (Cartesian axis in the middle, as in qeq_ase.model.layers).
//
// Two-limb activations (limbs = 2): each input y = x / step (clamped to [-qmax, qmax]) is
// carried as hi = round(y) and lo = round((y - hi) * 2 qmax), two int8 codes whose rows are
// interleaved in a [2M, K] code matrix; one _int_mm then gives both partial products and
// the rescale adds acc_hi + acc_lo / (2 qmax). For oneDNN the limbs are planar (all hi
// rows, then all lo rows) and its GEMM epilogue does the scaling and the sum. The
// activation grid is 2 qmax = 254 times finer (~15 bits) with the same int8 weights and
// GEMM, which makes the energy smooth enough in the positions for MD (see
// docs/quantization.md, "Smoothness").

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "limb_quantizers.h"

namespace {

using qeq::quantize_limbs;
using qeq::round_half_even;

// max |x[i]| over n floats. Compares the bit patterns with the sign bit cleared, which
// orders non-negative floats like their values and, unlike a float max, vectorises
// without -ffast-math. (NaN inputs give a NaN-like pattern; inputs are finite.)
inline float abs_max(const float* __restrict x, int64_t n) {
  uint32_t m = 0;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) {
    uint32_t b;
    std::memcpy(&b, x + i, sizeof b);
    b &= 0x7fffffffu;
    m = b > m ? b : m;
  }
  float r;
  std::memcpy(&r, &m, sizeof r);
  return r;
}

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

constexpr int64_t kGrain = 16384;  // elements per parallel chunk

// In place: o[i] = 0 where x[i] / step lies outside [lo, hi] (the STE mask of a clamped
// quantizer: a clipped input gets no gradient).
inline void ste_mask_span(float* __restrict o, const float* __restrict x, int64_t n, float step, float lo,
                          float hi) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float y = x[i] / step;
    o[i] = (y >= lo && y <= hi) ? o[i] : 0.0f;
  }
}

// The loops over one row's values are functions of their own, with restrict pointers and
// "omp simd": written inline in at::parallel_for's lambda, which -fopenmp outlines, they
// vectorised into gathers and ran ~2.5x slower than on one thread without OpenMP.

// out[k] = round(clamp(x[k] / s, -q, q)); returns nonzero if some x[k] / s was clipped.
inline int32_t quantize_span(const float* __restrict x, int64_t n, float s, float q, int8_t* __restrict out) {
  int32_t clipped = 0;
#pragma omp simd reduction(| : clipped)
  for (int64_t k = 0; k < n; ++k) {
    const float y0 = x[k] / s;
    clipped |= static_cast<int32_t>(y0 < -q) | static_cast<int32_t>(y0 > q);
    const float y = std::min(std::max(y0, -q), q);
    out[k] = static_cast<int8_t>(static_cast<int32_t>(round_half_even(y)));
  }
  return clipped;
}

}  // namespace

// codes = clamp(round(x / step), -qmax, qmax) as int8 (static per-tensor activation step).
// *clipped (if given) is set when some x / step fell outside [-qmax, qmax]: the backward
// pass needs the STE mask only then.
at::Tensor quantize_static(const at::Tensor& x, double step, int64_t qmax, bool* clipped) {
  check_float(x, "x");
  auto codes = at::empty(x.sizes(), x.options().dtype(at::kChar));
  const float* __restrict xp = x.data_ptr<float>();
  int8_t* __restrict qp = codes.data_ptr<int8_t>();
  const float s = static_cast<float>(step), hi = static_cast<float>(qmax);
  std::atomic<bool> any_clipped{false};
  at::parallel_for(0, x.numel(), kGrain, [&](int64_t begin, int64_t end) {
    if (quantize_span(xp + begin, end - begin, s, hi, qp + begin)) any_clipped.store(true, std::memory_order_relaxed);
  });
  if (clipped) *clipped = any_clipped.load();
  return codes;
}

at::Tensor quantize_per_tensor(const at::Tensor& x, double step, int64_t qmax) {
  return quantize_static(x, step, qmax, nullptr);
}

// Where the two limbs of input row m (of M rows of K codes) go. Interleaved (for
// torch._int_mm, whose blocks then hold whole pairs): rows 2m (hi) and 2m + 1 (lo) of
// [2M, K]. Planar (for oneDNN, which takes each limb as its own [M, K] operand): row m of
// the hi half and row m of the lo half of [2M, K].
inline int8_t* hi_row(int8_t* codes, int64_t m, int64_t K, bool planar) {
  return codes + (planar ? m : 2 * m) * K;
}
inline int64_t lo_offset(int64_t M, int64_t K, bool planar) { return planar ? M * K : K; }

// Two-limb codes [2M, K] of x [M, K] with a static step (interleaved or planar, see hi_row).
at::Tensor quantize_static_limbs(const at::Tensor& x, double step, int64_t qmax, bool* clipped, bool planar) {
  check_float(x, "x");
  TORCH_CHECK(x.dim() == 2, "x must be [M, K]");
  const int64_t M = x.size(0), K = x.size(1);
  auto codes = at::empty({2 * M, K}, x.options().dtype(at::kChar));
  const float* __restrict xp = x.data_ptr<float>();
  int8_t* __restrict qp = codes.data_ptr<int8_t>();
  const float s = static_cast<float>(step), hi = static_cast<float>(qmax);
  std::atomic<bool> any_clipped{false};
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, K));
  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    int32_t out = 0;
    for (int64_t m = begin; m < end; ++m) {
      int8_t* qh = hi_row(qp, m, K, planar);
      out |= quantize_limbs(xp + m * K, K, s, hi, qh, qh + lo_offset(M, K, planar));
    }
    if (out) any_clipped.store(true, std::memory_order_relaxed);
  });
  if (clipped) *clipped = any_clipped.load();
  return codes;
}

// r2[f] = |(x0[f], x1[f], x2[f])|^2
inline void squared_norms(const float* __restrict x0, const float* __restrict x1, const float* __restrict x2,
                          int64_t F, float* __restrict r2) {
#pragma omp simd
  for (int64_t f = 0; f < F; ++f) r2[f] = (x0[f] * x0[f] + x1[f] * x1[f]) + x2[f] * x2[f];
}

// Rotation-invariant per-atom quantization of vectors v [N, 3, F]:
//   scale[n] = max(max_f |v[n, :, f]|, tiny) / qmax,   codes = clamp(round(v / scale[n])).
// |v[n, :, f]| is the Euclidean norm over the Cartesian axis, so scale[n] does not change
// under a rotation of the molecule (a per-row max over x, y or z components would).
// limbs = 2: codes [N, 3, 2, F] (for each Cartesian row the hi row, then the lo row), or
// planar [2, N, 3, F].
std::tuple<at::Tensor, at::Tensor> quantize_per_atom_limbs(const at::Tensor& v, int64_t qmax, double tiny,
                                                           int64_t limbs, bool planar = false) {
  check_float(v, "v");
  TORCH_CHECK(v.dim() == 3 && v.size(1) == 3, "v must be [N, 3, F], got ", v.sizes());
  TORCH_CHECK(limbs == 1 || limbs == 2, "limbs must be 1 or 2");
  const int64_t N = v.size(0), F = v.size(2);
  auto codes = limbs == 1 ? at::empty(v.sizes(), v.options().dtype(at::kChar))
                          : at::empty(planar ? at::IntArrayRef{2, N, 3, F} : at::IntArrayRef{N, 3, 2, F},
                                      v.options().dtype(at::kChar));
  auto scale = at::empty({N}, v.options());
  const float* vp = v.data_ptr<float>();
  int8_t* qp = codes.data_ptr<int8_t>();
  float* sp = scale.data_ptr<float>();
  const float hi = static_cast<float>(qmax), tf = static_cast<float>(tiny);
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, 3 * F));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> r2(F);
    for (int64_t n = begin; n < end; ++n) {
      const float* x0 = vp + n * 3 * F;
      const float* x1 = x0 + F;
      const float* x2 = x1 + F;
      squared_norms(x0, x1, x2, F, r2.data());
      const float m2 = abs_max(r2.data(), F);
      // sqrt is monotone and correctly rounded: sqrt(max r^2) == max sqrt(r^2)
      const float s = std::max(std::sqrt(m2), tf) / hi;
      sp[n] = s;
      if (limbs == 1) {
        quantize_span(x0, 3 * F, s, hi, qp + n * 3 * F);
      } else {
        for (int64_t c = 0; c < 3; ++c) {
          int8_t* qh = hi_row(qp, n * 3 + c, F, planar);
          quantize_limbs(x0 + c * F, F, s, hi, qh, qh + lo_offset(3 * N, F, planar));
        }
      }
    }
  });
  return {codes, scale};
}

std::tuple<at::Tensor, at::Tensor> quantize_per_atom(const at::Tensor& v, int64_t qmax, double tiny) {
  return quantize_per_atom_limbs(v, qmax, tiny, 1);
}

// out[k] = x[k] * c[k]
inline void multiply_span(const float* __restrict x, const float* __restrict c, int64_t n, float* __restrict out) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) out[k] = x[k] * c[k];
}

// Dynamic per-row quantization of y = x * col_scale (col_scale optional), x [M, K]:
//   scale[m] = max(max_k |y[m, k]|, tiny) / qmax,   codes = round(y / scale[m]);
// limbs = 2: codes [2M, K], interleaved (hi, lo) rows as in quantize_static_limbs.
// Used for the int8 backward: g * s_w quantized per row, then the int8 GEMM with W_q.
std::tuple<at::Tensor, at::Tensor> quantize_per_row_limbs(const at::Tensor& x,
                                                          const c10::optional<at::Tensor>& col_scale, int64_t qmax,
                                                          double tiny, int64_t limbs, bool planar = false) {
  check_float(x, "x");
  TORCH_CHECK(x.dim() == 2, "x must be [M, K]");
  TORCH_CHECK(limbs == 1 || limbs == 2, "limbs must be 1 or 2");
  const int64_t M = x.size(0), K = x.size(1);
  const float* cs = nullptr;
  if (col_scale.has_value()) {
    check_float(*col_scale, "col_scale");
    TORCH_CHECK(col_scale->numel() == K, "col_scale must have K elements");
    cs = col_scale->data_ptr<float>();
  }
  auto codes = at::empty({limbs * M, K}, x.options().dtype(at::kChar));
  auto scale = at::empty({M}, x.options());
  const float* xp = x.data_ptr<float>();
  int8_t* qp = codes.data_ptr<int8_t>();
  float* sp = scale.data_ptr<float>();
  const float hi = static_cast<float>(qmax), tf = static_cast<float>(tiny);
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, K));
  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> row(K);
    for (int64_t m = begin; m < end; ++m) {
      float* rw = row.data();
      if (cs) {
        multiply_span(xp + m * K, cs, K, rw);
      } else {
        std::memcpy(rw, xp + m * K, K * sizeof(float));
      }
      const float amax = abs_max(rw, K);
      const float s = std::max(amax, tf) / hi;
      sp[m] = s;
      if (limbs == 1) {
        quantize_span(rw, K, s, hi, qp + m * K);
      } else {
        int8_t* qh = hi_row(qp, m, K, planar);
        quantize_limbs(rw, K, s, hi, qh, qh + lo_offset(M, K, planar));
      }
    }
  });
  return {codes, scale};
}

std::tuple<at::Tensor, at::Tensor> quantize_per_row(const at::Tensor& x, const c10::optional<at::Tensor>& col_scale,
                                                    int64_t qmax, double tiny) {
  return quantize_per_row_limbs(x, col_scale, qmax, tiny, 1, false);
}

// ---------------------------------------------------------------------------------------
// int32 GEMM output -> float32
// ---------------------------------------------------------------------------------------

// Scales of one rescale: out[m, n] = acc[m, n] * (r(m) * cs[n]) + bias[n], then masked.
//   r(m) = rs[0] (per_tensor) or rs[m / group] (group = 3: one scale per atom of [N, 3, F]).
//   mask (mx given): out = 0 where mx[m, n] / ms lies outside [-qmax, qmax] (LSQ's STE).
struct RescaleArgs {
  const float* rs = nullptr;
  bool per_tensor = true;
  int64_t group = 1;
  const float* cs = nullptr;
  const float* bias = nullptr;
  const float* mx = nullptr;
  float ms = 1.0f, lo = -127.0f, hi = 127.0f;
  int64_t limbs = 1;      // 2: acc rows come in (hi, lo) pairs, combined as hi + lo * inv_lo
  float inv_lo = 1.0f;
};

// Rows [m0, m0 + rows) of the output; acc points at row m0 (limbs = 2: row 2 m0) of an
// int32 [*, N] block.
// One output row: o = (a + b * inv_lo) * (r * cs) + bias (b: the lo limb's accumulator,
// limbs = 2 only; cs and bias optional).
inline void rescale_row(const int32_t* __restrict a, const int32_t* __restrict b, int64_t N, float r,
                        const float* __restrict cs, const float* __restrict bias, int64_t limbs, float inv_lo,
                        float* __restrict o) {
  if (cs) {
    if (limbs == 2) {
#pragma omp simd
      for (int64_t n = 0; n < N; ++n) o[n] = (static_cast<float>(a[n]) + static_cast<float>(b[n]) * inv_lo) * (r * cs[n]);
    } else {
#pragma omp simd
      for (int64_t n = 0; n < N; ++n) o[n] = static_cast<float>(a[n]) * (r * cs[n]);
    }
  } else if (limbs == 2) {
#pragma omp simd
    for (int64_t n = 0; n < N; ++n) o[n] = (static_cast<float>(a[n]) + static_cast<float>(b[n]) * inv_lo) * r;
  } else {
#pragma omp simd
    for (int64_t n = 0; n < N; ++n) o[n] = static_cast<float>(a[n]) * r;
  }
  if (bias) {
#pragma omp simd
    for (int64_t n = 0; n < N; ++n) o[n] = o[n] + bias[n];
  }
}

// rescale_row with non-temporal stores, for outputs far larger than the caches (the edge
// filters' [E, 4F]): a plain store first reads each cache line it writes, which made writing
// the output cost more than the GEMM. The same operations in the same order (no FMA), so the
// same floats. Returns false (nothing written) where AVX-512 or an aligned row is missing.
inline bool rescale_row_streaming(const int32_t* a, const int32_t* b, int64_t N, float r, const float* cs,
                                  const float* bias, int64_t limbs, float inv_lo, float* o) {
#if defined(__AVX512F__)
  if (N % 16 != 0 || reinterpret_cast<uintptr_t>(o) % 64 != 0) return false;
  const __m512 vr = _mm512_set1_ps(r), vlo = _mm512_set1_ps(inv_lo);
  for (int64_t n = 0; n < N; n += 16) {
    __m512 v = _mm512_cvtepi32_ps(_mm512_loadu_si512(a + n));
    if (limbs == 2) v = _mm512_add_ps(v, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(b + n)), vlo));
    v = _mm512_mul_ps(v, cs ? _mm512_mul_ps(vr, _mm512_loadu_ps(cs + n)) : vr);
    if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + n));
    _mm512_stream_ps(o + n, v);
  }
  return true;
#else
  return false;
#endif
}

// Output row m from its accumulator row(s) a (limbs = 2: the hi row, then the lo row);
// streaming: non-temporal stores where possible (callers then need a store fence).
inline void rescale_output_row(const int32_t* a, int64_t m, int64_t N, const RescaleArgs& p, float* out,
                               bool streaming = false) {
  const float r = p.per_tensor ? p.rs[0] : p.rs[m / p.group];
  if (!(streaming && !p.mx && rescale_row_streaming(a, a + N, N, r, p.cs, p.bias, p.limbs, p.inv_lo, out + m * N)))
    rescale_row(a, a + N, N, r, p.cs, p.bias, p.limbs, p.inv_lo, out + m * N);
  if (p.mx) ste_mask_span(out + m * N, p.mx + m * N, N, p.ms, p.lo, p.hi);
}

// Outputs of at least this many bytes are written with non-temporal stores.
constexpr int64_t kStreamingBytes = int64_t{8} << 20;

// Rows [m0, m0 + rows) of the output; acc points at row m0 (limbs = 2: row 2 m0) of an
// int32 [*, N] block whose rows come in (hi, lo) pairs for two limbs. streaming: with
// non-temporal stores where possible (rescale_row_streaming).
void rescale_rows(const int32_t* acc, int64_t m0, int64_t rows, int64_t N, const RescaleArgs& p, float* out,
                  bool streaming = false) {
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, N));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) rescale_output_row(acc + p.limbs * i * N, m0 + i, N, p, out, streaming);
#if defined(__AVX512F__)
    if (streaming) _mm_sfence();
#endif
  });
}

const float* optional_ptr(const c10::optional<at::Tensor>& t, int64_t numel, const char* name) {
  if (!t.has_value() || !t->defined() || t->numel() == 0) return nullptr;
  check_float(*t, name);
  TORCH_CHECK(t->numel() == numel, name, " has ", t->numel(), " elements, expected ", numel);
  return t->data_ptr<float>();
}

// rs: rs_numel row scales (1: per tensor; else one per group of rows).
RescaleArgs make_args(const float* rs, int64_t rs_numel, int64_t group, int64_t M, int64_t N,
                      const c10::optional<at::Tensor>& col_scale, const c10::optional<at::Tensor>& bias,
                      const c10::optional<at::Tensor>& mask_x, double mask_step, int64_t qmax) {
  RescaleArgs p;
  p.per_tensor = rs_numel == 1;
  p.group = std::max<int64_t>(1, group);
  TORCH_CHECK(p.per_tensor || rs_numel * p.group == M, "row_scale has ", rs_numel,
              " elements, expected 1 or M / row_group = ", M / p.group);
  p.rs = rs;
  p.cs = optional_ptr(col_scale, N, "col_scale");
  p.bias = optional_ptr(bias, N, "bias");
  p.mx = optional_ptr(mask_x, M * N, "mask_x");
  p.ms = static_cast<float>(mask_step);
  p.hi = static_cast<float>(qmax);
  p.lo = -p.hi;
  return p;
}

void set_limbs(RescaleArgs& p, int64_t limbs, int64_t qmax) {
  p.limbs = limbs;
  p.inv_lo = 1.0f / (2.0f * static_cast<float>(qmax));
}

// out = rescale(acc) for a whole int32 [M, N] tensor (exposed for tests and the eager twin).
at::Tensor rescale(const at::Tensor& acc, const at::Tensor& row_scale, int64_t row_group,
                   const c10::optional<at::Tensor>& col_scale, const c10::optional<at::Tensor>& bias,
                   const c10::optional<at::Tensor>& mask_x, double mask_step, int64_t qmax, int64_t limbs) {
  TORCH_CHECK(acc.scalar_type() == at::kInt && acc.is_contiguous() && acc.dim() == 2,
              "acc must be a contiguous int32 [M, N] tensor");
  TORCH_CHECK(limbs == 1 || (limbs == 2 && acc.size(0) % 2 == 0), "limbs must be 1, or 2 with an even row count");
  check_float(row_scale, "row_scale");
  const int64_t M = acc.size(0) / limbs, N = acc.size(1);
  auto p = make_args(row_scale.data_ptr<float>(), row_scale.numel(), row_group, M, N, col_scale, bias, mask_x,
                     mask_step, qmax);
  set_limbs(p, limbs, qmax);
  auto out = at::empty({M, N}, row_scale.options());
  rescale_rows(acc.data_ptr<int32_t>(), 0, M, N, p, out.data_ptr<float>());
  return out;
}

// ---------------------------------------------------------------------------------------
// oneDNN's int8 linear (AMX-INT8 where the CPU has it)
// ---------------------------------------------------------------------------------------

// A layer holding a weight packed by onednn::qlinear_prepack runs its GEMM through
// onednn::qlinear_pointwise for inputs of at least kOnednnMinRows rows (below that the
// call's fixed cost, ~20 us, exceeds the gain and torch._int_mm runs) whose two matrix
// widths are at least kOnednnMinWidth: narrower products (the readout's 64 -> 1 and its
// backward, K = 1) fall to oneDNN's reference kernel: 10.8 ms for 1,344 x 1 x 64 against
// 1 us with _int_mm (experiments/gemm_kinds.py).
constexpr int64_t kOnednnMinRows = 128;
constexpr int64_t kOnednnMinWidth = 32;

bool use_onednn(const c10::optional<at::Tensor>& packed, int64_t rows) {
  // packed [in, out] as oneDNN reports it (an opaque oneDNN tensor)
  return packed.has_value() && packed->defined() && packed->is_mkldnn() && rows >= kOnednnMinRows &&
         packed->size(0) >= kOnednnMinWidth && packed->size(1) >= kOnednnMinWidth;
}

// y = (hi @ W^T) * x_scale * w_scale + bias  [+ (lo @ W^T) * x_scale * inv_lo * w_scale]
// codes: [M, K], or planar two-limb codes [2M, K] (hi rows, then lo rows). oneDNN applies
// the scales and the bias in the GEMM's epilogue and adds the lo limb's product into y
// with its "sum" post-op: no int32 accumulator is stored and read back (edge filter,
// 9,344 x 128 -> 512, two limbs: 4.3 ms against 12.5 ms for _int_mm + rescale,
// docs/quantization.md "Benchmark"). Only a per-tensor x_scale exists, so per-row scales
// come after.
at::Tensor onednn_linear(const at::Tensor& codes, int64_t limbs, double x_scale, double inv_lo,
                         const at::Tensor& packed, const at::Tensor& w_scale,
                         const c10::optional<at::Tensor>& bias) {
  using Args = torch::List<std::optional<at::Scalar>>;
  static const auto unary = c10::Dispatcher::singleton()
      .findSchemaOrThrow("onednn::qlinear_pointwise", "")
      .typed<at::Tensor(at::Tensor, double, int64_t, at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>,
                        double, int64_t, std::optional<c10::ScalarType>, c10::string_view, Args, c10::string_view)>();
  static const auto binary = c10::Dispatcher::singleton()
      .findSchemaOrThrow("onednn::qlinear_pointwise", "binary")
      .typed<at::Tensor(at::Tensor, double, int64_t, at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>,
                        std::optional<at::Tensor>, double, int64_t, std::optional<c10::ScalarType>, double, int64_t,
                        c10::string_view, double, c10::string_view, Args, c10::string_view)>();
  const int64_t M = codes.size(0) / limbs;
  auto zeros = at::zeros({w_scale.numel()}, w_scale.options().dtype(at::kLong));
  std::optional<at::Tensor> b;
  if (bias.has_value() && bias->defined() && bias->numel() > 0) b = *bias;
  auto y = unary.call(codes.narrow(0, 0, M), x_scale, 0, packed, w_scale, zeros, b, 1.0, 0, at::kFloat, "none",
                      Args(), "");
  if (limbs == 2) {
    binary.call(codes.narrow(0, M, M), x_scale * inv_lo, 0, packed, w_scale, zeros, y, std::nullopt, 1.0, 0,
                at::kFloat, 1.0, 0, "sum", 1.0, "none", Args(), "");
  }
  return y;
}

// In place: o[n] *= r
inline void scale_span(float* __restrict o, int64_t n, float r) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) o[k] = o[k] * r;
}

// In place: y[m, :] *= rs[m / group], then the STE mask of mask_x (if given).
void scale_rows_(at::Tensor& y, const at::Tensor& rs, int64_t group, const c10::optional<at::Tensor>& mask_x,
                 double mask_step, int64_t qmax) {
  const int64_t M = y.size(0), N = y.size(1);
  auto p = make_args(rs.data_ptr<float>(), rs.numel(), group, M, N, c10::nullopt, c10::nullopt, mask_x, mask_step,
                     qmax);
  float* yp = y.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, N));
  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      float* o = yp + m * N;
      scale_span(o, N, p.rs[m / p.group]);
      if (p.mx) ste_mask_span(o, p.mx + m * N, N, p.ms, p.lo, p.hi);
    }
  });
}

// torch._int_mm runs oneDNN's s8 x s8 GEMM, which without VNNI or AMX sums u8 x s8 pairs in
// saturating int16 and returns wrong integers (qeq_ase.kernels.cpu_features.int_mm_is_exact). There
// the same integers come from a float GEMM: every partial sum of K <= kExactFloatK products of
// codes |c| <= 127 is an integer below 2^24, which float32 holds exactly (float64 beyond).
constexpr int64_t kExactFloatK = (int64_t{1} << 24) / (127 * 127);
bool g_int_mm_via_float = false;

void set_int_mm_via_float(bool on) { g_int_mm_via_float = on; }

void int_mm_out(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b) {
  if (!g_int_mm_via_float) {
    at::_int_mm_out(acc, a, b);
    return;
  }
  RECORD_FUNCTION("qeq_int8_gemm_via_float", std::vector<c10::IValue>({a, b}));  // for torch.profiler
  const auto dtype = a.size(1) <= kExactFloatK ? at::kFloat : at::kDouble;
  acc.copy_(at::mm(a.to(dtype), b.to(dtype)));
}

// _int_mm(codes [L M, K], w [K, N]) then rescale, in blocks of rows whose int32 result
// (<= 1 MB) stays in L2: the full int32 [L M, N] tensor is never written to memory, which
// for M x N = 5000 x 640 saves two 12.8 MB passes (and the page faults of a fresh one).
// With two limbs (interleaved) each block holds whole (hi, lo) pairs. Outputs of kStreamingBytes
// and more (the edge filters' [E, 4F]) are written with non-temporal stores.
at::Tensor gemm_rescale(const at::Tensor& codes, const at::Tensor& w, const RescaleArgs& p) {
  const int64_t L = p.limbs, M = codes.size(0) / L, N = w.size(1);
  auto out = at::empty({M, N}, codes.options().dtype(at::kFloat));
  if (M == 0) return out;
  const int64_t block = std::min<int64_t>(M, std::max<int64_t>(64, (int64_t{1} << 18) / std::max<int64_t>(1, L * N)));
  auto acc = at::empty({L * block, N}, codes.options().dtype(at::kInt));
  const bool streaming = M * N * static_cast<int64_t>(sizeof(float)) >= kStreamingBytes;
  for (int64_t m0 = 0; m0 < M; m0 += block) {
    const int64_t rows = std::min(block, M - m0);
    auto acc_rows = acc.narrow(0, 0, L * rows);
    int_mm_out(acc_rows, codes.narrow(0, L * m0, L * rows), w);
    rescale_rows(acc_rows.data_ptr<int32_t>(), m0, rows, N, p, out.data_ptr<float>(), streaming);
  }
  return out;
}

// In place: grad *= 1[-qmax <= x / step <= qmax] (the STE mask of a clamped quantizer).
at::Tensor ste_mask_(at::Tensor grad, const at::Tensor& x, double step, int64_t qmax) {
  check_float(grad, "grad");
  check_float(x, "x");
  TORCH_CHECK(grad.numel() == x.numel(), "grad and x must have the same number of elements");
  float* __restrict gp = grad.data_ptr<float>();
  const float* __restrict xp = x.data_ptr<float>();
  const float s = static_cast<float>(step), hi = static_cast<float>(qmax), lo = -hi;
  at::parallel_for(0, x.numel(), kGrain, [&](int64_t begin, int64_t end) {
    ste_mask_span(gp + begin, xp + begin, end - begin, s, lo, hi);
  });
  return grad;
}

// ---------------------------------------------------------------------------------------
// oneDNN's batch-reduce GEMM micro-kernel (at::native::cpublas::brgemm; AMX-INT8 tiles
// where the CPU has them)
// ---------------------------------------------------------------------------------------

// The B operand [K, N] in the VNNI layout the int8 micro-kernel reads: [K/4, N, 4], element
// (k, n) at ((k / 4) N + n) 4 + k % 4. Packed once per layer (forward: W_q^T; backward: W_q).
at::Tensor pack_vnni(const at::Tensor& b) {
  TORCH_CHECK(b.scalar_type() == at::kChar && b.dim() == 2 && b.is_contiguous(), "b must be a contiguous int8 [K, N]");
  const int64_t K = b.size(0), N = b.size(1);
  TORCH_CHECK(K % 4 == 0, "the VNNI layout needs K divisible by 4, got K=", K);
  auto out = at::empty({K / 4, N, 4}, b.options());
  const int8_t* in = b.data_ptr<int8_t>();
  int8_t* o = out.data_ptr<int8_t>();
  for (int64_t k = 0; k < K; ++k)
    for (int64_t n = 0; n < N; ++n) o[((k / 4) * N + n) * 4 + k % 4] = in[k * N + n];
  return out;
}

bool use_brgemm(const c10::optional<at::Tensor>& packed) {
  return packed.has_value() && packed->defined() && !packed->is_mkldnn() && packed->dim() == 3;
}

// Rows per micro-kernel call: each thread's int32 accumulator (limbs x rows x N) stays in L1/L2,
// so the int32 result is never written to memory, only the float output. 32 rows were faster
// for outputs up to 384 wide, 16 for wider ones (2 x 32 x 512 int32 spill out of L1).
inline int64_t brgemm_rows(int64_t N) { return N <= 384 ? 32 : 16; }
// rescale(codes [L M, K] (interleaved limbs) x B [K, N]), B packed by pack_vnni, in tiles of
// brgemm_rows(N) rows spread over the threads.
at::Tensor brgemm_rescale(const at::Tensor& codes, const at::Tensor& packed, const RescaleArgs& p) {
  const int64_t L = p.limbs, M = codes.size(0) / L, K = codes.size(1), N = packed.size(1);
  TORCH_CHECK(codes.scalar_type() == at::kChar && codes.is_contiguous() && packed.size(0) * 4 == K,
              "codes must be contiguous int8 [rows, K] for a VNNI-packed [K/4, N, 4] weight");
  RECORD_FUNCTION("qeq_int8_brgemm", std::vector<c10::IValue>({codes, packed}));  // for torch.profiler
  auto out = at::empty({M, N}, codes.options().dtype(at::kFloat));
  const auto* A = reinterpret_cast<const signed char*>(codes.data_ptr<int8_t>());
  const auto* B = reinterpret_cast<const signed char*>(packed.data_ptr<int8_t>());
  float* O = out.data_ptr<float>();
  const int64_t T = brgemm_rows(N);
  const bool streaming = M * N * static_cast<int64_t>(sizeof(float)) >= kStreamingBytes;
  at::parallel_for(0, (M + T - 1) / T, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> acc(L * T * N);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t m0 = t * T, rows = std::min(T, M - m0);
      // limb l of row i: codes row L (m0 + i) + l, acc row L i + l; all limbs in one call, so
      // the micro-kernel loads B once for them (as in the edge kernel's in-kernel filter)
      at::native::cpublas::brgemm(L * rows, N, K, K, N, N, false, A + L * m0 * K, B, acc.data(), true);
      for (int64_t i = 0; i < rows; ++i) rescale_output_row(acc.data() + L * i * N, m0 + i, N, p, O, streaming);
    }
    at::native::cpublas::brgemm_release(true);
#if defined(__AVX512F__)
    if (streaming) _mm_sfence();
#endif
  });
  return out;
}

// The int8 input gradient with the quantization in the tiles: each tile's rows of
// y = grad * w_scale are quantized per row (two limbs: quantize_per_row_limbs) into the
// thread's scratch and go straight into the micro-kernel with W_q (packed [N/4, K, 4]), then
// the rescale by the row scales and the STE mask of mask_x. Bit for bit what
// quantize_per_row_limbs + brgemm_rescale give, without writing the codes to memory.
at::Tensor brgemm_backward_int8(const at::Tensor& grad, const at::Tensor& w_scale, const at::Tensor& packed,
                                const c10::optional<at::Tensor>& mask_x, double step, int64_t qmax, double tiny,
                                int64_t limbs) {
  check_float(grad, "grad");
  check_float(w_scale, "w_scale");
  const int64_t M = grad.size(0), N = grad.size(1), K = packed.size(1), L = limbs;
  TORCH_CHECK(grad.dim() == 2 && packed.size(0) * 4 == N && w_scale.numel() == N,
              "grad [M, N], w_scale [N] and W_q packed [N/4, K, 4] do not match");
  RECORD_FUNCTION("qeq_int8_brgemm", std::vector<c10::IValue>({grad, packed}));
  auto out = at::empty({M, K}, grad.options());
  auto scale = at::empty({M}, grad.options());
  auto p = make_args(scale.data_ptr<float>(), M, 1, M, K, c10::nullopt, c10::nullopt, mask_x, step, qmax);
  set_limbs(p, limbs, 127);
  const float* G = grad.data_ptr<float>();
  const float* cs = w_scale.data_ptr<float>();
  float* S = scale.data_ptr<float>();
  float* O = out.data_ptr<float>();
  const auto* B = reinterpret_cast<const signed char*>(packed.data_ptr<int8_t>());
  const float q = 127.0f, tf = static_cast<float>(tiny);
  const int64_t T = brgemm_rows(K);
  at::parallel_for(0, (M + T - 1) / T, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> row(N);
    std::vector<int8_t> codes(L * T * N);
    std::vector<int32_t> acc(L * T * K);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t m0 = t * T, rows = std::min(T, M - m0);
      for (int64_t i = 0; i < rows; ++i) {
        multiply_span(G + (m0 + i) * N, cs, N, row.data());
        const float s = std::max(abs_max(row.data(), N), tf) / q;
        S[m0 + i] = s;
        int8_t* c = codes.data() + L * i * N;
        if (L == 1) {
          quantize_span(row.data(), N, s, q, c);
        } else {
          quantize_limbs(row.data(), N, s, q, c, c + N);
        }
      }
      const auto* A = reinterpret_cast<const signed char*>(codes.data());
      at::native::cpublas::brgemm(L * rows, K, N, N, K, K, false, A, B, acc.data(), true);  // all limbs at once
      for (int64_t i = 0; i < rows; ++i) rescale_output_row(acc.data() + L * i * K, m0 + i, K, p, O);
    }
    at::native::cpublas::brgemm_release(true);
  });
  return out;
}

// ---------------------------------------------------------------------------------------
// Whole layers
// ---------------------------------------------------------------------------------------

// static: y = rescale(int8_gemm(quantize_per_tensor(x), w_t), step, w_scale, bias)
// Returns (y, clipped): clipped tells whether any input was clipped (STE mask needed).
// packed (optional): the weight packed for oneDNN, used from kOnednnMinRows rows on.
std::tuple<at::Tensor, bool> linear_static_forward(const at::Tensor& x, double step, int64_t qmax,
                                                   const at::Tensor& w_t, const at::Tensor& w_scale,
                                                   const c10::optional<at::Tensor>& bias, int64_t limbs,
                                                   const c10::optional<at::Tensor>& packed) {
  TORCH_CHECK(limbs == 1 || limbs == 2, "limbs must be 1 or 2");
  const bool brgemm = use_brgemm(packed), onednn = use_onednn(packed, x.size(0));
  bool clipped = false;
  auto codes = limbs == 1 ? quantize_static(x, step, qmax, &clipped)
                          : quantize_static_limbs(x, step, qmax, &clipped, /*planar=*/onednn);
  if (onednn) return {onednn_linear(codes, limbs, step, 1.0 / (2.0 * qmax), *packed, w_scale, bias), clipped};
  const float s = static_cast<float>(step);
  auto p = make_args(&s, 1, 1, x.size(0), w_t.size(1), w_scale, bias, c10::nullopt, 1.0, qmax);
  set_limbs(p, limbs, qmax);
  return {brgemm ? brgemm_rescale(codes, *packed, p) : gemm_rescale(codes, w_t, p), clipped};
}

// atom: y = rescale(int8_gemm(quantize_per_atom(x as [N, 3, K]), w_t), scale[n], w_scale)
at::Tensor linear_atom_forward(const at::Tensor& x, int64_t qmax, double tiny, const at::Tensor& w_t,
                               const at::Tensor& w_scale, int64_t limbs, const c10::optional<at::Tensor>& packed) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) % 3 == 0, "x must be [3N, K]");
  const bool brgemm = use_brgemm(packed), onednn = use_onednn(packed, x.size(0));
  auto [codes, scale] = quantize_per_atom_limbs(x.view({x.size(0) / 3, 3, x.size(1)}), qmax, tiny, limbs, onednn);
  codes = codes.view({limbs * x.size(0), x.size(1)});
  if (onednn) {
    auto y = onednn_linear(codes, limbs, 1.0, 1.0 / (2.0 * qmax), *packed, w_scale, c10::nullopt);
    scale_rows_(y, scale, 3, c10::nullopt, 1.0, qmax);
    return y;
  }
  auto p = make_args(scale.data_ptr<float>(), scale.numel(), 3, x.size(0), w_t.size(1), w_scale, c10::nullopt,
                     c10::nullopt, 1.0, qmax);
  set_limbs(p, limbs, qmax);
  return brgemm ? brgemm_rescale(codes, *packed, p) : gemm_rescale(codes, w_t, p);
}

// Input gradient from per-row codes of g * w_scale ([limbs * M, N], planar for oneDNN,
// interleaved for torch._int_mm: as quantize_per_row_limbs writes them for
// use_onednn(packed, M)) and their scales [M]: codes times W_q [N, K], rescaled per row,
// masked by the STE of the static input quantizer when x is given.
at::Tensor linear_backward_from_codes(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& w,
                                      const c10::optional<at::Tensor>& x, double step, int64_t qmax, int64_t limbs,
                                      const c10::optional<at::Tensor>& packed) {
  check_float(scale, "scale");
  const int64_t M = scale.numel();
  TORCH_CHECK(codes.scalar_type() == at::kChar && codes.dim() == 2 && codes.size(0) == limbs * M &&
              codes.size(1) == w.size(0), "codes must be int8 [limbs * M, N] for scale [M] and w [N, K]");
  if (use_onednn(packed, M)) {  // the gradient's codes have qmax 127, whatever the input quantizer's
    auto y = onednn_linear(codes, limbs, 1.0, 1.0 / 254.0, *packed, at::ones({w.size(1)}, scale.options()),
                           c10::nullopt);
    scale_rows_(y, scale, 1, x, step, qmax);
    return y;
  }
  auto p = make_args(scale.data_ptr<float>(), M, 1, M, w.size(1), c10::nullopt, c10::nullopt, x, step, qmax);
  set_limbs(p, limbs, 127);
  return use_brgemm(packed) ? brgemm_rescale(codes, *packed, p) : gemm_rescale(codes, w, p);
}

// Input gradient with int8 GEMM: (g * w_scale) quantized per row (one or two limbs),
// times W_q [N, K], masked by the STE of the static input quantizer when x is given.
// packed (optional): W_q^T packed for oneDNN.
at::Tensor linear_backward_int8(const at::Tensor& grad, const at::Tensor& w_scale, const at::Tensor& w,
                                const c10::optional<at::Tensor>& x, double step, int64_t qmax, double tiny,
                                int64_t limbs, const c10::optional<at::Tensor>& packed) {
  if (use_brgemm(packed)) return brgemm_backward_int8(grad, w_scale, *packed, x, step, qmax, tiny, limbs);
  const bool planar = use_onednn(packed, grad.size(0));
  auto [codes, scale] = quantize_per_row_limbs(grad, w_scale, 127, tiny, limbs, planar);
  return linear_backward_from_codes(codes, scale, w, x, step, qmax, limbs, packed);
}

// ---------------------------------------------------------------------------------------
// autograd: the layer as one C++ node (no Python in forward or backward)
// ---------------------------------------------------------------------------------------

// Inputs: x [M, K] float32 (needs grad), w_t [K, N] int8, w [N, K] int8, w_deq [N, K]
// float32 (W_q * s_w, for the float and the double backward), w_scale [N], bias [N] or an
// empty tensor. backward_int8 picks the int8 backward GEMM, whose gradient codes always have
// two limbs (kGradientLimbs: one limb would cost ~1% of the gradient); limbs (1 or 2) the
// activation codes of the forward GEMM. w_packed /
// w_t_packed: w and w_t packed for oneDNN (forward / int8 backward GEMM), or empty tensors
// for torch._int_mm.
// Double backward (create_graph=True): the backward runs differentiable ATen ops, so the
// second derivative is that of the STE surrogate clamp(x) @ w_deq.T (linear in grad).
constexpr int64_t kGradientLimbs = 2;

c10::optional<at::Tensor> packed_or_none(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

struct Int8LinearFunction : public torch::autograd::Function<Int8LinearFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w_t,
                            const at::Tensor& w, const at::Tensor& w_deq, const at::Tensor& w_scale,
                            const at::Tensor& bias, double step, int64_t qmax, bool atom, bool backward_int8,
                            int64_t limbs, const at::Tensor& w_packed, const at::Tensor& w_t_packed) {
    at::Tensor y;
    bool clipped = false;
    if (atom) {
      y = linear_atom_forward(x, qmax, 1e-30, w_t, w_scale, limbs, packed_or_none(w_packed));
    } else {
      std::tie(y, clipped) = linear_static_forward(x, step, qmax, w_t, w_scale, bias, limbs, packed_or_none(w_packed));
    }
    ctx->saved_data["step"] = step;
    ctx->saved_data["qmax"] = qmax;
    ctx->saved_data["masked"] = clipped;
    ctx->saved_data["backward_int8"] = backward_int8;
    ctx->saved_data["w_t_packed"] = w_t_packed;
    ctx->save_for_backward({clipped ? x : at::empty({0}, x.options()), w, w_deq, w_scale});
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &w = saved[1], &w_deq = saved[2], &w_scale = saved[3];
    const double step = ctx->saved_data["step"].toDouble();
    const int64_t qmax = ctx->saved_data["qmax"].toInt();
    const bool masked = ctx->saved_data["masked"].toBool();
    const at::Tensor& grad = grad_outputs[0];
    at::Tensor gx;
    if (at::GradMode::is_enabled()) {
      gx = at::mm(grad, w_deq);
      if (masked) {
        auto y = x.detach() / step;
        gx = gx * at::logical_and(y >= -qmax, y <= qmax).to(gx.scalar_type());
      }
    } else if (!ctx->saved_data["backward_int8"].toBool()) {
      gx = at::mm(grad.contiguous(), w_deq);
      if (masked) ste_mask_(gx, x, step, qmax);
    } else {
      gx = linear_backward_int8(grad.contiguous(), w_scale, w, masked ? c10::optional<at::Tensor>(x) : c10::nullopt,
                                step, qmax, 1e-30, kGradientLimbs,
                                packed_or_none(ctx->saved_data["w_t_packed"].toTensor()));
    }
    torch::autograd::variable_list grads(13);
    grads[0] = gx;
    return grads;
  }
};

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w_t, const at::Tensor& w, const at::Tensor& w_deq,
                       const at::Tensor& w_scale, const at::Tensor& bias, double step, int64_t qmax, bool atom,
                       bool backward_int8, int64_t limbs, const at::Tensor& w_packed, const at::Tensor& w_t_packed) {
  return Int8LinearFunction::apply(x, w_t, w, w_deq, w_scale, bias, step, qmax, atom, backward_int8, limbs, w_packed,
                                   w_t_packed);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "qeq_ase int8 quantize / GEMM / rescale kernels (see qeq_ase/quant/int8_kernels.py)";
  m.def("int8_linear", &int8_linear, "autograd int8 linear layer (one C++ node)");
  m.def("linear_static_forward", &linear_static_forward, "quantize (static step) + int8 GEMM + rescale");
  m.def("linear_atom_forward", &linear_atom_forward, "quantize (per atom) + int8 GEMM + rescale");
  m.def("linear_backward_int8", &linear_backward_int8, "input gradient through an int8 GEMM with W_q");
  m.def("linear_backward_from_codes", &linear_backward_from_codes,
        "input gradient from per-row int8 codes of g * w_scale (int8 GEMM with W_q)");
  m.def("quantize_per_tensor", &quantize_per_tensor, "int8 codes with a static step");
  m.def("quantize_per_atom", &quantize_per_atom, "int8 codes of [N,3,F] vectors, one invariant scale per atom");
  m.def("quantize_static_limbs", [](const at::Tensor& x, double step, int64_t qmax, bool planar) {
    return quantize_static_limbs(x, step, qmax, nullptr, planar);
  }, "two-limb int8 codes [2M, K] with a static step", py::arg("x"), py::arg("step"), py::arg("qmax"),
        py::arg("planar") = false);
  m.def("quantize_per_atom_limbs", &quantize_per_atom_limbs, "per-atom int8 codes, one or two limbs", py::arg("v"),
        py::arg("qmax"), py::arg("tiny"), py::arg("limbs"), py::arg("planar") = false);
  m.def("quantize_per_row", &quantize_per_row, "int8 codes with one dynamic scale per row");
  m.def("quantize_per_row_limbs", &quantize_per_row_limbs, "per-row int8 codes, one or two limbs", py::arg("x"),
        py::arg("col_scale"), py::arg("qmax"), py::arg("tiny"), py::arg("limbs"), py::arg("planar") = false);
  m.def("rescale", &rescale, "int32 GEMM output -> float32 with row/column scales, bias, STE mask");
  m.def("ste_mask_", &ste_mask_, "in-place STE mask of a clamped quantizer");
  m.def("pack_vnni", &pack_vnni, "int8 [K, N] -> the VNNI layout [K/4, N, 4] of the brgemm micro-kernel");
  m.def("set_int_mm_via_float", &set_int_mm_via_float,
        "compute the int_mm GEMM's exact integers with a float GEMM (CPUs where torch._int_mm saturates)");
  m.attr("onednn_min_rows") = kOnednnMinRows;
}
