// Rounding and two-limb quantization shared by the int8 kernels (int8_kernels.cpp) and the
// fused edge kernel (edge_attention.cpp), which must produce the same codes bit for bit.
// Included by both; the build key of every kernel covers this file (qeq_ase/kernels/cpp_extension.py).
#pragma once

#include <algorithm>
#include <cstdint>

namespace qeq {

// Round half to even for |y| <= 2^22 (callers clamp first): the classic 1.5 * 2^23 trick.
// Vectorises everywhere, unlike std::nearbyint; exact because -ffp-contract=off and no
// -ffast-math keep the add and the subtract as written.
inline float round_half_even(float y) {
  const float magic = 12582912.0f;  // 1.5 * 2^23
  return (y + magic) - magic;
}

// Two limbs of y = clamp(x[k] / step, -q, q): hi = round(y), lo = round((y - hi) * 2q).
// Returns nonzero if some x[k] / step lay outside [-q, q].
inline int32_t quantize_limbs(const float* __restrict x, int64_t n, float step, float q, int8_t* __restrict hi,
                              int8_t* __restrict lo) {
  int32_t clipped = 0;
  const float L = 2.0f * q;
#pragma omp simd reduction(| : clipped)
  for (int64_t k = 0; k < n; ++k) {
    const float y = x[k] / step;
    clipped |= static_cast<int32_t>(y < -q) | static_cast<int32_t>(y > q);
    const float yc = std::min(std::max(y, -q), q);
    const float h = round_half_even(yc);
    hi[k] = static_cast<int8_t>(static_cast<int32_t>(h));
    lo[k] = static_cast<int8_t>(static_cast<int32_t>(round_half_even((yc - h) * L)));
  }
  return clipped;
}

}  // namespace qeq
