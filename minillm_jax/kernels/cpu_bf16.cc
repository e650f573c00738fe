// bfloat16 helpers of XLA:CPU as XLA FFI custom calls (see matmul.py); no BLAS.
//
// MinillmGemvBf16: decoding's matrix-vector products with weights stored in bfloat16. At batch 1 they read every
// weight once per token, so reading half the bytes is the lever: y[M, N] = x[M, K] op(w) with float32 x, float32
// accumulation and the weights widened to float32 exactly (a bfloat16 is the top half of a float32). XLA:CPU's
// own bfloat16 matrix-vector dots are not bandwidth bound (BENCHMARKS.md, "bfloat16 decode weights").
//
// MinillmTransposeBf16: for the bfloat16 train step's gradient products. XLA:CPU runs a bfloat16 dot natively
// only when both operands are row-major and untransposed, and widens any other to a float32 dot. A transpose
// written by XLA itself is folded back into the dot; this one is opaque to it.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef __SSE2__
#include <emmintrin.h>
#endif

#include "cpu_parallel.h"
#include "cpu_simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using minillm::parallel_for;
using minillm::simd::widen;
using Matrix = ffi::Buffer<ffi::F32, 2>;  // (an alias: a comma inside the binding macro's arguments splits them)
using MatrixBf16 = ffi::Buffer<ffi::BF16, 2>;

// acc[M, N] = x[:, k0:k1] w[k0:k1, :] for w [K, N]: this thread's rows of w are one contiguous run, read once,
// four rows per pass over the accumulators (a quarter of their loads and stores), and a prefetch 8 rows ahead
// (BENCHMARKS.md, "bfloat16 decode weights": the kernel versions).
void RowsKN(const float* x, const uint16_t* w, float* acc, int M, int K, int N, int k0, int k1) {
  std::fill(acc, acc + size_t(M) * N, 0.f);
  int k = k0;
  for (; k + 4 <= k1; k += 4) {
    const uint16_t *w0 = w + size_t(k) * N, *w1 = w0 + N, *w2 = w1 + N, *w3 = w2 + N;
    for (int m = 0; m < M; ++m) {
      const float* xr = x + size_t(m) * K + k;
      const float x0 = xr[0], x1 = xr[1], x2 = xr[2], x3 = xr[3];
      float* a = acc + size_t(m) * N;
      for (int j0 = 0; j0 < N; j0 += 32) {  // 32 bfloat16 = one cache line per row
        if (m == 0 && k + 12 <= k1) {
          const uint16_t* p = w0 + 8 * size_t(N) + j0;
          __builtin_prefetch(p), __builtin_prefetch(p + N), __builtin_prefetch(p + 2 * N), __builtin_prefetch(p + 3 * N);
        }
        const int j1 = std::min(N, j0 + 32);
#pragma omp simd
        for (int j = j0; j < j1; ++j) a[j] += x0 * widen(w0[j]) + x1 * widen(w1[j]) + x2 * widen(w2[j]) + x3 * widen(w3[j]);
      }
    }
  }
  for (; k < k1; ++k) {
    const uint16_t* wr = w + size_t(k) * N;
    for (int m = 0; m < M; ++m) {
      const float xv = x[size_t(m) * K + k];
      float* a = acc + size_t(m) * N;
#pragma omp simd
      for (int j = 0; j < N; ++j) a[j] += xv * widen(wr[j]);
    }
  }
}

// y[:, n0:n1] = x w[n0:n1, :]^T for w [N, K] (a tied head reading the embedding in place): a dot product per
// contiguous row of w.
void RowsNK(const float* x, const uint16_t* w, float* y, int M, int K, int N, int n0, int n1) {
  for (int n = n0; n < n1; ++n) {
    const uint16_t* wr = w + size_t(n) * K;
    for (int m = 0; m < M; ++m) {
      const float* xr = x + size_t(m) * K;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int k = 0; k < K; ++k) s += xr[k] * widen(wr[k]);
      y[size_t(m) * N + n] = s;
    }
  }
}

ffi::Error GemvBf16(ffi::ThreadPool pool, Matrix x, MatrixBf16 w, ffi::Result<Matrix> y, bool tb) {
  const int M = x.dimensions()[0], K = x.dimensions()[1], N = y->dimensions()[1];
  if (y->dimensions()[0] != M || w.dimensions()[tb ? 1 : 0] != K || w.dimensions()[tb ? 0 : 1] != N) {
    return ffi::Error::InvalidArgument("minillm_gemv_bf16: operand shapes do not match the result");
  }
  const float* xp = x.typed_data();
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.untyped_data());
  float* yp = y->typed_data();
  const int threads = int(std::max<int64_t>(1, pool.num_threads()));
  if (tb) {  // parts split the rows of w (the outputs)
    const int T = std::max(1, std::min(threads, N / 64));
    parallel_for(pool, T, [=](int t) { RowsNK(xp, wp, yp, M, K, N, int64_t(N) * t / T, int64_t(N) * (t + 1) / T); });
    return ffi::Error::Success();
  }
  // parts split the rows of w (the contraction), each streaming one contiguous block of it into its own partial
  // sums, added at the end: split by columns instead, each thread would read short strided runs
  const int T = std::max(1, std::min(threads, K / 64));
  thread_local std::vector<float> scratch;
  scratch.resize(size_t(T - 1) * M * N);
  float* part = scratch.data();  // (a thread_local named inside the work items would be each thread's own)
  parallel_for(pool, T, [=](int t) {
    RowsKN(xp, wp, t == 0 ? yp : part + size_t(t - 1) * M * N, M, K, N, int64_t(K) * t / T, int64_t(K) * (t + 1) / T);
  });
  for (int t = 1; t < T; ++t) {
    const float* p = part + size_t(t - 1) * M * N;
#pragma omp simd
    for (size_t i = 0; i < size_t(M) * N; ++i) yp[i] += p[i];
  }
  return ffi::Error::Success();
}

// 8 x 8 block of 16-bit values: x rows at xs (row stride sx) to y rows at ys (stride sy), in SSE2 registers
// (three rounds of interleaves instead of 64 scalar moves), scalar where SSE2 is missing.
inline void Transpose8x8(const uint16_t* xs, int64_t sx, uint16_t* ys, int64_t sy) {
#ifdef __SSE2__
  __m128i r[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(xs + i * sx));
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm_unpacklo_epi16(r[2 * i], r[2 * i + 1]), t[i + 4] = _mm_unpackhi_epi16(r[2 * i], r[2 * i + 1]);
  }
  for (int h = 0; h < 2; ++h) {  // h: columns 0-3 (from t[0..3]) or 4-7 (from t[4..7])
    const __m128i* a = t + 4 * h;
    u[4 * h] = _mm_unpacklo_epi32(a[0], a[1]), u[4 * h + 1] = _mm_unpackhi_epi32(a[0], a[1]);
    u[4 * h + 2] = _mm_unpacklo_epi32(a[2], a[3]), u[4 * h + 3] = _mm_unpackhi_epi32(a[2], a[3]);
  }
  for (int h = 0; h < 2; ++h) {
    for (int j = 0; j < 2; ++j) {
      const __m128i lo = u[4 * h + j], hi = u[4 * h + j + 2];  // rows 0-3 and rows 4-7 of columns 4h+2j, +1
      _mm_storeu_si128(reinterpret_cast<__m128i*>(ys + (4 * h + 2 * j) * sy), _mm_unpacklo_epi64(lo, hi));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(ys + (4 * h + 2 * j + 1) * sy), _mm_unpackhi_epi64(lo, hi));
    }
  }
#else
  for (int i = 0; i < 8; ++i) {
    for (int j = 0; j < 8; ++j) ys[j * sy + i] = xs[i * sx + j];
  }
#endif
}

// y[C, R] = x[R, C]^T; a work item is a band of 64 rows of x, moved in 8 x 8 blocks (scalar at the edges).
ffi::Error TransposeBf16(ffi::ThreadPool pool, MatrixBf16 x, ffi::Result<MatrixBf16> y) {
  const int64_t R = x.dimensions()[0], C = x.dimensions()[1];
  if (y->dimensions()[0] != C || y->dimensions()[1] != R) {
    return ffi::Error::InvalidArgument("minillm_transpose_bf16: the result is not the operand's transpose");
  }
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.untyped_data());
  uint16_t* yp = reinterpret_cast<uint16_t*>(y->untyped_data());
  constexpr int64_t B = 64;
  parallel_for(pool, int((R + B - 1) / B), [=](int i) {
    const int64_t r0 = i * B, r1 = std::min(R, r0 + B), r8 = r0 + (r1 - r0) / 8 * 8, c8 = C / 8 * 8;
    for (int64_t c = 0; c < c8; c += 8) {
      for (int64_t r = r0; r < r8; r += 8) Transpose8x8(xp + r * C + c, C, yp + c * R + r, R);
    }
    for (int64_t r = r0; r < r1; ++r) {  // the edges: columns past c8, rows past r8
      for (int64_t c = (r < r8 ? c8 : 0); c < C; ++c) yp[c * R + r] = xp[r * C + c];
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MinillmTransposeBf16, TransposeBf16,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<MatrixBf16>().Ret<MatrixBf16>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MinillmGemvBf16, GemvBf16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Matrix>()
                                  .Arg<MatrixBf16>()
                                  .Ret<Matrix>()
                                  .Attr<bool>("tb"));
