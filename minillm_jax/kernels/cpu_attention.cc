// Causal self-attention for XLA:CPU, forward and backward, as XLA FFI custom calls (see cpu_attention.py).
//
// Why it exists: XLA:CPU has no fused attention. Its blockwise attention writes every [rows, keys] score block
// to memory between two batched dots and the softmax, and copies query blocks and key prefixes around them
// (BENCHMARKS.md, "Fused CPU attention").
// Here each (batch, head) is one work item: its Q, K, V are packed into contiguous per-thread buffers once,
// and each 64-row query block computes its scores against the keys it can see into a buffer that stays in
// the L2 cache, then the softmax and the product with V. The backward recomputes the probabilities from the
// saved logsumexp (flash-attention style) and accumulates dK, dV for a kv head over its whole query group in
// the same work item, so no two threads write the same memory.
//
// Layouts are the model's own, so JAX needs no transposes: q, o, do [B, T, N, H]; k, v [B, T, K, H] with
// query head n using kv head n / (N / K); lse [B, N, T]. float32 only.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu_parallel.h"
#include "cpu_simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using minillm::parallel_for;
using namespace minillm::simd;

constexpr int QB = 64;  // query rows per block

// C[M, N] (+)= A[M, Kd] . B[Kd, N], all row-major with leading dimensions. Register blocks of R rows x NV
// vectors: per step of the Kd loop, NV loads of B and R broadcasts of A feed R * NV independent FMAs.
template <int R, int NV>
inline void block(int rows, int kd, const float* A, long lda, const float* B, long ldb, float* C, long ldc,
                  bool acc) {
  vf c[R][NV];
  const float* ar[R];  // rows past `rows` repeat the last one (computed, not stored): no branch in the loop
  for (int r = 0; r < R; ++r) ar[r] = A + std::min(r, rows - 1) * lda;
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) c[r][v] = (acc && r < rows) ? load(C + r * ldc + v * VL) : vf{};
  for (int k = 0; k < kd; ++k) {
    vf b[NV];
    for (int v = 0; v < NV; ++v) b[v] = load(B + k * ldb + v * VL);
    for (int r = 0; r < R; ++r) {
      float a = ar[r][k];
      for (int v = 0; v < NV; ++v) c[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < rows; ++r)
    for (int v = 0; v < NV; ++v) store(C + r * ldc + v * VL, c[r][v]);
}

constexpr int MR = 6;  // 6 x 4 accumulators + 4 operands: 28 of AVX-512's 32 vector registers

void matmul(int M, int N, int kd, const float* A, long lda, const float* B, long ldb, float* C, long ldc,
            bool acc) {
  for (int i = 0; i < M; i += MR) {
    int rows = std::min(MR, M - i);
    const float* a = A + i * lda;
    float* c = C + i * ldc;
    int j = 0;
    for (; j + 4 * VL <= N; j += 4 * VL) block<MR, 4>(rows, kd, a, lda, B + j, ldb, c + j, ldc, acc);
    for (; j + 2 * VL <= N; j += 2 * VL) block<MR, 2>(rows, kd, a, lda, B + j, ldb, c + j, ldc, acc);
    for (; j + VL <= N; j += VL) block<MR, 1>(rows, kd, a, lda, B + j, ldb, c + j, ldc, acc);
    for (; j < N; ++j)  // columns left over when N is not a multiple of VL
      for (int r = 0; r < rows; ++r) {
        float s = acc ? c[r * ldc + j] : 0.f;
        for (int k = 0; k < kd; ++k) s += a[r * lda + k] * B[k * ldb + j];
        c[r * ldc + j] = s;
      }
  }
}

// dst[c, r] = src[r, c] for an R x C block.
void transpose(int R, int C, const float* src, long lds, float* dst, long ldd) {
  for (int r0 = 0; r0 < R; r0 += 16)
    for (int c0 = 0; c0 < C; c0 += 16)
      for (int r = r0; r < std::min(R, r0 + 16); ++r)
        for (int c = c0; c < std::min(C, c0 + 16); ++c) dst[c * ldd + r] = src[r * lds + c];
}

struct Dims {
  long B, T, N, K, H;
};

constexpr int KB = 64;  // keys per block of a transposed, blocked K or V

inline long padded(long T) { return (T + KB - 1) / KB * KB; }

// x [T, H] (row stride ld) into xT [T/KB blocks][H][KB], zero-padded: each key block of the product
// a . x^T then reads one contiguous H x KB tile instead of H rows T floats apart.
void pack_transposed(long T, long H, const float* x, long ld, float* xT) {
  std::fill(xT, xT + padded(T) * H, 0.f);
  for (long t = 0; t < T; ++t)
    for (long h = 0; h < H; ++h) xT[(t / KB) * H * KB + h * KB + t % KB] = x[t * ld + h];
}

// c[n, L] = a[n, H] . x[0:L]^T from the packed xT, L = a0 + n: rows [a0, a0+n) against the keys they can see.
void times_transposed(long H, int n, int L, const float* a, const float* xT, float* c) {
  for (int j = 0; j < L; j += KB) matmul(n, std::min(KB, L - j), H, a, H, xT + (j / KB) * H * KB, KB, c + j, L, false);
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::ResultBuffer<ffi::F32> o, ffi::ResultBuffer<ffi::F32> lse) {
  auto qd = q.dimensions(), kd = k.dimensions();
  Dims d{qd[0], qd[1], qd[2], kd[2], qd[3]};
  const float scale = 1.f / std::sqrt(float(d.H));
  const float *Q = q.typed_data(), *Kp = k.typed_data(), *V = v.typed_data();
  float *O = o->typed_data(), *LSE = lse->typed_data();
  parallel_for(pool, d.B * d.N, [=](int item) {
    long b = item / d.N, n = item % d.N, kh = n / (d.N / d.K), T = d.T, H = d.H;
    thread_local std::vector<float> buf;
    buf.resize(padded(T) * H + 2 * T * H + QB * T + QB * H);  // the pointers below, in order
    float *q_ = buf.data(), *kT = q_ + T * H, *v_ = kT + padded(T) * H, *s = v_ + T * H, *acc = s + QB * T;
    for (long t = 0; t < T; ++t) {
      const float* qr = Q + ((b * T + t) * d.N + n) * H;
      for (long h = 0; h < H; ++h) q_[t * H + h] = qr[h] * scale;
      std::memcpy(v_ + t * H, V + ((b * T + t) * d.K + kh) * H, H * 4);
    }
    pack_transposed(T, H, Kp + (b * T * d.K + kh) * H, d.K * H, kT);
    for (int a = 0; a < T; a += QB) {
      int nr = std::min<long>(QB, T - a), L = a + nr;
      times_transposed(H, nr, L, q_ + a * H, kT, s);  // scores against keys [0, L)
      for (int r = 0; r < nr; ++r) {  // softmax over the keys row a+r sees: [0, a+r]
        float* sr = s + r * L;
        int len = a + r + 1;
        float m = row_max(sr, len), l = exp_minus(sr, len, m);
        for (int j = len; j < L; ++j) sr[j] = 0.f;
        float inv = 1.f / l;
        for (int j = 0; j < len; ++j) sr[j] *= inv;
        LSE[(b * d.N + n) * T + a + r] = m + std::log(l);
      }
      matmul(nr, H, L, s, L, v_, H, acc, H, false);
      for (int r = 0; r < nr; ++r) std::memcpy(O + ((b * T + a + r) * d.N + n) * H, acc + r * H, H * 4);
    }
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> o, ffi::Buffer<ffi::F32> lse,
                    ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                    ffi::ResultBuffer<ffi::F32> dv) {
  auto qd = q.dimensions(), kd = k.dimensions();
  Dims d{qd[0], qd[1], qd[2], kd[2], qd[3]};
  const float scale = 1.f / std::sqrt(float(d.H));
  const float *Q = q.typed_data(), *Kp = k.typed_data(), *V = v.typed_data(), *O = o.typed_data();
  const float *LSE = lse.typed_data(), *DO = dout.typed_data();
  float *DQ = dq->typed_data(), *DK = dk->typed_data(), *DV = dv->typed_data();
  const long G = d.N / d.K;
  // One item per (batch, kv head): dK and dV sum over the G query heads sharing it, inside the item.
  parallel_for(pool, d.B * d.K, [=](int item) {
    long b = item / d.K, kh = item % d.K, T = d.T, H = d.H;
    thread_local std::vector<float> buf;
    buf.resize(2 * padded(T) * H + 6 * T * H + T + 4 * QB * T);  // the pointers below, in order
    float *k_ = buf.data(), *kT = k_ + T * H, *vT = kT + padded(T) * H, *q_ = vT + padded(T) * H, *do_ = q_ + T * H;
    float *dk_ = do_ + T * H, *dv_ = dk_ + T * H, *dq_ = dv_ + T * H, *delta = dq_ + T * H;
    float *p = delta + T, *ds = p + QB * T, *pT = ds + QB * T, *dsT = pT + QB * T;
    for (long t = 0; t < T; ++t) std::memcpy(k_ + t * H, Kp + ((b * T + t) * d.K + kh) * H, H * 4);
    pack_transposed(T, H, Kp + (b * T * d.K + kh) * H, d.K * H, kT);
    pack_transposed(T, H, V + (b * T * d.K + kh) * H, d.K * H, vT);
    std::fill(dk_, dk_ + 2 * T * H, 0.f);  // dk_ and dv_
    for (long n = kh * G; n < (kh + 1) * G; ++n) {
      for (long t = 0; t < T; ++t) {
        const long row = ((b * T + t) * d.N + n) * H;
        float dl = 0.f;
        for (long h = 0; h < H; ++h) {
          q_[t * H + h] = Q[row + h] * scale;
          do_[t * H + h] = DO[row + h];
          dl += DO[row + h] * O[row + h];
        }
        delta[t] = dl;  // rowsum(dO * O) = rowsum(P * dP)
      }
      const float* lse_n = LSE + (b * d.N + n) * T;
      for (int a = 0; a < T; a += QB) {
        int nr = std::min<long>(QB, T - a), L = a + nr;
        times_transposed(H, nr, L, q_ + a * H, kT, p);              // scores, then P in place
        times_transposed(H, nr, L, do_ + a * H, vT, ds);             // dP = dO . V^T
        for (int r = 0; r < nr; ++r) {
          float *pr = p + r * L, *dr = ds + r * L, m = lse_n[a + r], dl = delta[a + r];
          int len = a + r + 1;
          exp_minus(pr, len, m);
          for (int j = 0; j < len; ++j) dr[j] = pr[j] * (dr[j] - dl);  // dS (of the scaled scores)
          for (int j = len; j < L; ++j) pr[j] = dr[j] = 0.f;
        }
        matmul(nr, H, L, ds, L, k_, H, dq_ + a * H, H, false);        // dQ = dS . K (times scale below)
        transpose(nr, L, p, L, pT, QB);
        transpose(nr, L, ds, L, dsT, QB);
        matmul(L, H, nr, pT, QB, do_ + a * H, H, dv_, H, true);      // dV += P^T . dO
        matmul(L, H, nr, dsT, QB, q_ + a * H, H, dk_, H, true);      // dK += dS^T . (scale Q)
      }
      for (long t = 0; t < T; ++t) {
        float* dr = DQ + ((b * T + t) * d.N + n) * H;
        for (long h = 0; h < H; ++h) dr[h] = dq_[t * H + h] * scale;
      }
    }
    for (long t = 0; t < T; ++t) {
      std::memcpy(DK + ((b * T + t) * d.K + kh) * H, dk_ + t * H, H * 4);
      std::memcpy(DV + ((b * T + t) * d.K + kh) * H, dv_ + t * H, H * 4);
    }
  });
  return ffi::Error::Success();
}

inline float dot(const float* a, const float* b, long H) {
  vf acc{};
  long h = 0;
  for (; h + VL <= H; h += VL) acc += load(a + h) * load(b + h);
  float s = 0.f;
  for (int i = 0; i < VL; ++i) s += acc[i];
  for (; h < H; ++h) s += a[h] * b[h];
  return s;
}

// Decoding: queries q [B, T, N, H] at positions [pos, pos + T) against a KV cache k, v [C = B * K, S, H] whose
// slots [0, pos + T) are written; query t sees slots [0, pos + t]. The cache is read in place, only the slots in
// use: XLA's dots take no strided operands, so the JAX path copies a power-of-two prefix of every layer's cache
// per token. One work item per cache row (b, kv head) with its G query heads; each key and value row is read
// once for all of them.
ffi::Error Decode(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                  ffi::Buffer<ffi::S32> pos, ffi::ResultBuffer<ffi::F32> o) {
  auto qd = q.dimensions(), kd = k.dimensions();
  const long B = qd[0], T = qd[1], N = qd[2], H = qd[3], C = kd[0], S = kd[1], p0 = pos.typed_data()[0];
  if (C % B != 0 || N % (C / B) != 0 || kd[2] != H || p0 < 0 || p0 + T > S) {
    return ffi::Error::InvalidArgument("minillm_attention_decode: shapes or position out of range");
  }
  const long K = C / B, G = N / K, L = p0 + T;  // L: slots the last query sees
  const float scale = 1.f / std::sqrt(float(H));
  const float *Q = q.typed_data(), *Kc = k.typed_data(), *Vc = v.typed_data();
  float* O = o->typed_data();
  parallel_for(pool, int(C), [=](int c) {
    const long b = c / K, kh = c % K, R = G * T;  // R query rows: r = g * T + t
    thread_local std::vector<float> buf;
    buf.resize(R * L + R * H + R);
    float *s = buf.data(), *acc = s + R * L, *sum = acc + R * H;
    auto qrow = [&](long r) { return Q + ((b * T + r % T) * N + kh * G + r / T) * H; };
    for (long j = 0; j < L; ++j) {  // scores, masked slots left unused
      const float* kj = Kc + (c * S + j) * H;
      for (long r = 0; r < R; ++r) s[r * L + j] = j <= p0 + r % T ? dot(qrow(r), kj, H) * scale : 0.f;
    }
    for (long r = 0; r < R; ++r) {
      const int len = int(p0 + r % T + 1);
      sum[r] = exp_minus(s + r * L, len, row_max(s + r * L, len));
    }
    std::fill(acc, acc + R * H, 0.f);
    for (long j = 0; j < L; ++j) {
      const float* vj = Vc + (c * S + j) * H;
      for (long r = 0; r < R; ++r) {
        if (j > p0 + r % T) continue;
        const float p = s[r * L + j];
        float* a = acc + r * H;
        for (long h = 0; h < H; ++h) a[h] += p * vj[h];
      }
    }
    for (long r = 0; r < R; ++r) {
      float* out = O + ((b * T + r % T) * N + kh * G + r / T) * H;
      const float inv = 1.f / sum[r];
      for (long h = 0; h < H; ++h) out[h] = acc[r * H + h] * inv;
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MinillmAttentionDecode, Decode,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MinillmAttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MinillmAttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
