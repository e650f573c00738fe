// Causal self-attention in bfloat16 on AMX tiles (Sapphire Rapids and later), forward and backward, as XLA FFI
// custom calls (see cpu_attention.py). Same layouts and work items as cpu_attention.cc's float32 kernel, which
// bfloat16 compute ran on float32 copies before: its products ran at ~45 GFLOP/s per core, a third of a `tiny`
// bfloat16 step; AMX tile products reach 300-430 GFLOP/s per core on these shapes.
//
// Numerics, as flash attention's bfloat16 kernels: q, k, v, o, do and dq, dk, dv are bfloat16 (what the model
// holds there anyway); the products accumulate in float32; scores, softmax and the logsumexp are float32; the
// probabilities P and the score gradients dS are rounded to bfloat16 for the products that read them.
//
// A product C (+)= A . B takes A row-major and B in AMX's pair layout: [K/2][N][2], the two k of a pair side by
// side. Every operand is packed per work item into zero-padded buffers (T and H rounded up to 32), so padding
// rows and columns contribute zeros. Built without AMX (-march=native on an older CPU) the handlers only
// return an error, and MinillmAmxReady() says 0 so they are never called.
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_parallel.h"
#include "cpu_simd.h"
#include "xla/ffi/api/ffi.h"

#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define MINILLM_AMX 1
#endif

namespace ffi = xla::ffi;

namespace {

using minillm::parallel_for;
using namespace minillm::simd;
typedef uint16_t bf16;

#ifdef MINILLM_AMX

constexpr int QB = 64;  // query rows per block

inline long up32(long x) { return (x + 31) / 32 * 32; }

inline bf16 narrow1(float f) {  // round to nearest even, NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16((u >> 16) | 0x40);
  return bf16((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

// y[j] = bfloat16(x[j] * s) for j < n.
inline void narrow(const float* x, bf16* y, long n, float s = 1.f) {
  long j = 0;
  for (; j + VL <= n; j += VL)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + j), (__m256i)_mm512_cvtneps_pbh(load(x + j) * s));
  for (; j < n; ++j) y[j] = narrow1(x[j] * s);
}

// Rows r0 and r1 (n floats, n % 16 == 0) as one pair-row of a B operand: y[2j] = r0[j], y[2j+1] = r1[j].
inline void narrow_pair(const float* r0, const float* r1, bf16* y, long n) {
  const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                       21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (long j = 0; j < n; j += VL) {
    __m512i both = (__m512i)_mm512_cvtne2ps_pbh(load(r1 + j), load(r0 + j));  // r0 in the low half
    _mm512_storeu_si512(y + 2 * j, _mm512_permutexvar_epi16(idx, both));
  }
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// The calling thread's tiles for one work item: eight tiles of 16 rows x 64 bytes, released at the end. XLA's
// and torch's AMX code (YNNPACK, oneDNN) configure the tiles on each of their own calls too.
struct Tiles {
  Tiles() {
    TileConfig c;
    for (int t = 0; t < 8; ++t) c.rows[t] = 16, c.colsb[t] = 64;
    _tile_loadconfig(&c);
  }
  ~Tiles() { _tile_release(); }
};

// C[M, N] (+)= A[M, K] . B, A bfloat16 row-major (lda), B bfloat16 pairs [K/2][N][2] (ldb elements per pair-row),
// C float32 (ldc); M, N, K multiples of 32. Blocks of 32 x 32: four accumulator tiles fed by two A and two B
// tiles per 32 k.
void gemm(long M, long N, long K, const bf16* A, long lda, const bf16* B, long ldb, float* C, long ldc, bool acc) {
  for (long i = 0; i < M; i += 32)
    for (long j = 0; j < N; j += 32) {
      float* c = C + i * ldc + j;
      if (acc) {
        _tile_loadd(0, c, ldc * 4);
        _tile_loadd(1, c + 16, ldc * 4);
        _tile_loadd(2, c + 16 * ldc, ldc * 4);
        _tile_loadd(3, c + 16 * ldc + 16, ldc * 4);
      } else {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
      }
      for (long k = 0; k < K; k += 32) {
        _tile_loadd(4, A + i * lda + k, lda * 2);
        _tile_loadd(5, A + (i + 16) * lda + k, lda * 2);
        _tile_loadd(6, B + k / 2 * ldb + j * 2, ldb * 2);
        _tile_loadd(7, B + k / 2 * ldb + j * 2 + 32, ldb * 2);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      _tile_stored(0, c, ldc * 4);
      _tile_stored(1, c + 16, ldc * 4);
      _tile_stored(2, c + 16 * ldc, ldc * 4);
      _tile_stored(3, c + 16 * ldc + 16, ldc * 4);
    }
}

// One head's rows x[t * ld + h] (t < T, h < H) packed zero-padded to Tp x Hp, in the layouts the products read.
// row: [Tp][Hp], the A operand x.
void pack_rows(const bf16* x, long ld, long T, long H, long Tp, long Hp, bf16* y) {
  std::fill(y, y + Tp * Hp, bf16(0));
  for (long t = 0; t < T; ++t) std::memcpy(y + t * Hp, x + t * ld, H * 2);
}

// trans: [Hp][Tp], the A operand x^T.
void pack_trans(const bf16* x, long ld, long T, long H, long Tp, long Hp, bf16* y) {
  std::fill(y, y + Tp * Hp, bf16(0));
  for (long t0 = 0; t0 < T; t0 += 32)  // 32 rows at a time: the 32 x 2-byte destination runs are one cache line
    for (long h = 0; h < H; ++h)
      for (long t = t0; t < std::min(T, t0 + 32); ++t) y[h * Tp + t] = x[t * ld + h];
}

// pairs: [Tp/2][Hp][2], the B operand x (k = t): rows 2i and 2i+1 interleaved, 32 columns at a time.
void pack_pairs(const bf16* x, long ld, long T, long H, long Tp, long Hp, bf16* y) {
  const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6, 37,
                                      5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  for (long t = 0; t < Tp; t += 2) {
    bf16* o = y + t * Hp;  // pair-row t / 2
    for (long h = 0; h < Hp; h += 32) {
      const __mmask32 m = h + 32 <= H ? ~0u : h < H ? (1u << (H - h)) - 1 : 0u;
      __m512i r0 = t < T ? _mm512_maskz_loadu_epi16(m, x + t * ld + h) : _mm512_setzero_si512();
      __m512i r1 = t + 1 < T ? _mm512_maskz_loadu_epi16(m, x + (t + 1) * ld + h) : _mm512_setzero_si512();
      _mm512_storeu_si512(o + 2 * h, _mm512_permutex2var_epi16(r0, lo, r1));
      _mm512_storeu_si512(o + 2 * h + 32, _mm512_permutex2var_epi16(r0, hi, r1));
    }
  }
}

// pairs_t: [Hp/2][Tp][2], the B operand x^T (k = h): the pairs (h, h+1) of row t are adjacent already, so this
// is a transpose of 4-byte pairs.
void pack_pairs_t(const bf16* x, long ld, long T, long H, long Tp, long Hp, bf16* y) {
  std::fill(y, y + Tp * Hp, bf16(0));
  for (long t = 0; t < T; ++t) {
    const bf16* r = x + t * ld;
    for (long h = 0; h + 1 < H; h += 2) std::memcpy(y + (h / 2) * 2 * Tp + 2 * t, r + h, 4);
    if (H % 2) y[(H / 2) * 2 * Tp + 2 * t] = r[H - 1];
  }
}

// One row's probabilities from its scores over L keys, of which the first len are visible: p[j] = exp(s[j] * scale
// - m) for j < len, 0 past it (whole vectors: L is a multiple of 32); returns their sum.
inline float exp_row(float* s, long len, long L, float scale, float m) {
  const vi lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  vf sum{};
  for (long j = 0; j < L; j += VL) {
    vf e = j < len ? vexp(load(s + j) * scale - m) : vf{};
    e = lane + int(j) < int(len) ? e : vf{};
    store(s + j, e);
    sum += e;
  }
  float t = 0.f;
  for (int i = 0; i < VL; ++i) t += sum[i];
  return t;
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> q, ffi::Buffer<ffi::BF16> k,
                   ffi::Buffer<ffi::BF16> v, ffi::ResultBuffer<ffi::BF16> o, ffi::ResultBuffer<ffi::F32> lse) {
  auto qd = q.dimensions(), kd = k.dimensions();
  const long B = qd[0], T = qd[1], N = qd[2], K = kd[2], H = qd[3], Tp = up32(T), Hp = up32(H);
  const float scale = 1.f / std::sqrt(float(H));
  const bf16 *Q = q.typed_data(), *Kx = k.typed_data(), *V = v.typed_data();
  bf16* O = o->typed_data();
  float* LSE = lse->typed_data();
  parallel_for(pool, B * N, [=](int item) {
    const long b = item / N, n = item % N, kh = n / (N / K);
    thread_local std::vector<bf16> hb;
    thread_local std::vector<float> fb;
    hb.resize(3 * Tp * Hp + QB * Tp);
    fb.resize(QB * Tp + QB * Hp);
    bf16 *q_ = hb.data(), *kT = q_ + Tp * Hp, *v_ = kT + Tp * Hp, *p = v_ + Tp * Hp;
    float *s = fb.data(), *o_ = s + QB * Tp;
    Tiles tiles;
    pack_rows(Q + (b * T * N + n) * H, N * H, T, H, Tp, Hp, q_);
    pack_pairs_t(Kx + (b * T * K + kh) * H, K * H, T, H, Tp, Hp, kT);
    pack_pairs(V + (b * T * K + kh) * H, K * H, T, H, Tp, Hp, v_);
    for (long a = 0; a < Tp; a += QB) {
      const long nr = std::min<long>(QB, Tp - a), L = a + nr;
      gemm(nr, L, Hp, q_ + a * Hp, Hp, kT, 2 * Tp, s, L, false);  // scores against keys [0, L)
      for (long r = 0; r < nr; ++r) {  // softmax over the keys row a+r sees: [0, a+r]
        float* sr = s + r * L;
        bf16* pr = p + r * L;
        const long len = a + r + 1;
        if (a + r >= T) {
          std::fill(pr, pr + L, bf16(0));
          continue;
        }
        const float m = row_max(sr, len) * scale, l = exp_row(sr, len, L, scale, m);
        narrow(sr, pr, L, 1.f / l);
        LSE[(b * N + n) * T + a + r] = m + std::log(l);
      }
      gemm(nr, Hp, L, p, L, v_, 2 * Hp, o_, Hp, false);
      for (long r = 0; r < nr && a + r < T; ++r) narrow(o_ + r * Hp, O + ((b * T + a + r) * N + n) * H, H);
    }
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> q, ffi::Buffer<ffi::BF16> k,
                    ffi::Buffer<ffi::BF16> v, ffi::Buffer<ffi::BF16> o, ffi::Buffer<ffi::F32> lse,
                    ffi::Buffer<ffi::BF16> dout, ffi::ResultBuffer<ffi::BF16> dq, ffi::ResultBuffer<ffi::BF16> dk,
                    ffi::ResultBuffer<ffi::BF16> dv) {
  auto qd = q.dimensions(), kd = k.dimensions();
  const long B = qd[0], T = qd[1], N = qd[2], K = kd[2], H = qd[3], Tp = up32(T), Hp = up32(H), G = N / K;
  const float scale = 1.f / std::sqrt(float(H));
  const bf16 *Q = q.typed_data(), *Kx = k.typed_data(), *V = v.typed_data(), *O = o.typed_data();
  const bf16* DO = dout.typed_data();
  const float* LSE = lse.typed_data();
  bf16 *DQ = dq->typed_data(), *DK = dk->typed_data(), *DV = dv->typed_data();
  // One item per (batch, kv head): dK and dV sum over the G query heads sharing it, inside the item.
  parallel_for(pool, B * K, [=](int item) {
    const long b = item / K, kh = item % K;
    thread_local std::vector<bf16> hb;
    thread_local std::vector<float> fb;
    hb.resize(7 * Tp * Hp + 3 * QB * Tp);
    fb.resize(2 * QB * Tp + 2 * Tp * Hp + QB * Hp + Tp);
    bf16 *kT = hb.data(), *k_ = kT + Tp * Hp, *vT = k_ + Tp * Hp, *q_ = vT + Tp * Hp, *qt = q_ + Tp * Hp;
    bf16 *do_ = qt + Tp * Hp, *dot = do_ + Tp * Hp, *pp = dot + Tp * Hp, *dsp = pp + QB * Tp, *ds_ = dsp + QB * Tp;
    float *s = fb.data(), *dp = s + QB * Tp, *dkT = dp + QB * Tp, *dvT = dkT + Tp * Hp, *dq_ = dvT + Tp * Hp;
    float* delta = dq_ + QB * Hp;
    Tiles tiles;
    pack_pairs_t(Kx + (b * T * K + kh) * H, K * H, T, H, Tp, Hp, kT);
    pack_pairs(Kx + (b * T * K + kh) * H, K * H, T, H, Tp, Hp, k_);
    pack_pairs_t(V + (b * T * K + kh) * H, K * H, T, H, Tp, Hp, vT);
    std::fill(dkT, dkT + 2 * Tp * Hp, 0.f);  // dK^T and dV^T, [Hp][Tp]
    for (long n = kh * G; n < (kh + 1) * G; ++n) {
      const long row0 = (b * T * N + n) * H;
      pack_rows(Q + row0, N * H, T, H, Tp, Hp, q_);
      pack_trans(Q + row0, N * H, T, H, Tp, Hp, qt);
      pack_rows(DO + row0, N * H, T, H, Tp, Hp, do_);
      pack_trans(DO + row0, N * H, T, H, Tp, Hp, dot);
      for (long t = 0; t < T; ++t) {  // rowsum(dO * O) = rowsum(P * dP)
        float dl = 0.f;
        for (long h = 0; h < H; ++h) dl += widen(DO[row0 + t * N * H + h]) * widen(O[row0 + t * N * H + h]);
        delta[t] = dl;
      }
      const float* lse_n = LSE + (b * N + n) * T;
      for (long a = 0; a < Tp; a += QB) {
        const long nr = std::min<long>(QB, Tp - a), L = a + nr;
        gemm(nr, L, Hp, q_ + a * Hp, Hp, kT, 2 * Tp, s, L, false);   // scores
        gemm(nr, L, Hp, do_ + a * Hp, Hp, vT, 2 * Tp, dp, L, false);  // dP = dO . V^T
        for (long r = 0; r < nr; ++r) {  // s <- P, dp <- dS (of the scaled scores); zero past the row's keys
          float *pr = s + r * L, *dr = dp + r * L;
          const long len = a + r < T ? a + r + 1 : 0;
          exp_row(pr, len, L, scale, len ? lse_n[a + r] : 0.f);
          const float dl = len ? delta[a + r] : 0.f;
          for (long j = 0; j < L; j += VL) store(dr + j, load(pr + j) * (load(dr + j) - dl));
          narrow(dr, ds_ + r * L, L);
        }
        for (long r = 0; r < nr; r += 2) {
          narrow_pair(s + r * L, s + (r + 1) * L, pp + r * L, L);
          narrow_pair(dp + r * L, dp + (r + 1) * L, dsp + r * L, L);
        }
        gemm(nr, Hp, L, ds_, L, k_, 2 * Hp, dq_, Hp, false);       // dQ = dS . K (times scale below)
        gemm(Hp, L, nr, dot + a, Tp, pp, 2 * L, dvT, Tp, true);    // dV^T += dO^T . P
        gemm(Hp, L, nr, qt + a, Tp, dsp, 2 * L, dkT, Tp, true);    // dK^T += Q^T . dS (times scale below)
        for (long r = 0; r < nr && a + r < T; ++r)
          narrow(dq_ + r * Hp, DQ + row0 + (a + r) * N * H, H, scale);
      }
    }
    for (long t = 0; t < T; ++t)
      for (long h = 0; h < H; ++h) {
        DK[((b * T + t) * K + kh) * H + h] = narrow1(dkT[h * Tp + t] * scale);
        DV[((b * T + t) * K + kh) * H + h] = narrow1(dvT[h * Tp + t]);
      }
  });
  return ffi::Error::Success();
}

#else  // no AMX in this build: MinillmAmxReady() is 0 and cpu_attention.py never calls these

ffi::Error Forward(ffi::ThreadPool, ffi::Buffer<ffi::BF16>, ffi::Buffer<ffi::BF16>, ffi::Buffer<ffi::BF16>,
                   ffi::ResultBuffer<ffi::BF16>, ffi::ResultBuffer<ffi::F32>) {
  return ffi::Error::Internal("minillm_attention_forward_bf16: built without AMX");
}

ffi::Error Backward(ffi::ThreadPool, ffi::Buffer<ffi::BF16>, ffi::Buffer<ffi::BF16>, ffi::Buffer<ffi::BF16>,
                    ffi::Buffer<ffi::BF16>, ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::BF16>,
                    ffi::ResultBuffer<ffi::BF16>, ffi::ResultBuffer<ffi::BF16>, ffi::ResultBuffer<ffi::BF16>) {
  return ffi::Error::Internal("minillm_attention_backward_bf16: built without AMX");
}

#endif

}  // namespace

// 1 when this build has the AMX kernels and the kernel lets this process use the tile registers (Linux asks
// each process to request them: arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA); 0 otherwise.
extern "C" int MinillmAmxReady() {
#ifdef MINILLM_AMX
  return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
#else
  return 0;
#endif
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(MinillmAttentionForwardBf16, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MinillmAttentionBackwardBf16, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>());
