// Vector helpers of the C++ kernels (cpu_attention.cc, cpu_bf16.cc): GCC vector
// extensions sized for AVX-512, a vector exp, the softmax row pieces, and bfloat16 -> float32.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace minillm::simd {

constexpr int VL = 16;  // floats per vector register (AVX-512); GCC splits wider vectors on smaller hardware
typedef float vf __attribute__((vector_size(VL * 4)));
typedef float vfu __attribute__((vector_size(VL * 4), aligned(4), may_alias));
typedef int vi __attribute__((vector_size(VL * 4)));

// A bfloat16 (its bits) as the float32 it stands for: exact.
inline float widen(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline vf load(const float* p) { return *reinterpret_cast<const vfu*>(p); }
inline void store(float* p, vf x) { *reinterpret_cast<vfu*>(p) = x; }

// exp of a vector: Cody-Waite reduction to |r| <= ln2/2 and Cephes' degree-7 polynomial (about 1 ulp). Written
// out because the alternative, -ffast-math (glibc's vector exp), also makes GCC < 13 link code that turns on
// flush-to-zero for the whole process when the library loads, and lets the compiler drop NaNs.
inline vf vexp(vf x) {
  x = x < -87.3f ? vf{} - 87.3f : x;  // exp(-87.3) is the smallest normal float; NaN fails both tests, stays NaN
  x = x > 88.3f ? vf{} + 88.3f : x;
  vf k = (x * 1.44269504f + 12582912.f) - 12582912.f;  // round(x / ln2): 1.5 * 2^23 pushes out the fraction
  vf r = x - k * 0.693359375f - k * -2.12194440e-4f;    // ln2 in two parts, the first exact in few bits
  vf p = ((((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r + 4.1665795894e-2f) * r +
           1.6666665459e-1f) * r + 5.0000001201e-1f) * r * r) + r + 1.f;
  vi e = (__builtin_convertvector(k, vi) + 127) << 23;   // 2^k built in the exponent bits
  vf two_k;
  std::memcpy(&two_k, &e, sizeof e);
  return p * two_k;
}

inline float row_max(const float* x, int n) {
  float m = x[0];
  int j = 0;
  if (n >= VL) {
    vf mv = load(x);
    for (j = VL; j + VL <= n; j += VL) {
      vf v = load(x + j);
      mv = v > mv ? v : mv;
    }
    for (int i = 0; i < VL; ++i) m = std::max(m, mv[i]);
  }
  for (; j < n; ++j) m = std::max(m, x[j]);
  return m;
}

// x[j] = exp(x[j] - m) for j < n; returns their sum.
inline float exp_minus(float* x, int n, float m) {
  vf sv{};
  int j = 0;
  for (; j + VL <= n; j += VL) {
    vf e = vexp(load(x + j) - m);
    store(x + j, e);
    sv += e;
  }
  float s = 0.f;
  for (int i = 0; i < VL; ++i) s += sv[i];
  for (; j < n; ++j) s += (x[j] = std::exp(x[j] - m));
  return s;
}

}  // namespace minillm::simd
