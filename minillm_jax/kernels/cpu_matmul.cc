// Float32 matrix products for XLA:CPU through OpenBLAS's sgemm, as an XLA FFI custom call (see matmul.py).
//
// Why it exists: XLA:CPU's own dots (YNNPACK, Eigen) are slower than OpenBLAS on the train step's shapes
// (BENCHMARKS.md, "OpenBLAS matmuls"). OpenBLAS comes from the scipy-openblas32 wheel (the `blas` extra), so no
// system BLAS is needed; its symbols carry the scipy_ prefix.
//
// c[M, N] = op(a) op(b), row-major; a is [M, K] or, with ta, [K, M]; b is [K, N] or, with tb, [N, K]: the
// transposed operands of the backward pass are read in place. `threads` is OpenBLAS's thread count for the
// call: all cores for one device, cores / devices when every device of a data-parallel step calls at once.
#include <cstdint>

#include <cblas.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using Matrix = ffi::Buffer<ffi::F32, 2>;  // (an alias: a comma inside the binding macro's arguments splits them)

ffi::Error Gemm(Matrix a, Matrix b, ffi::Result<Matrix> c, bool ta, bool tb, int32_t threads) {
  auto da = a.dimensions(), db = b.dimensions(), dc = c->dimensions();
  const blasint M = dc[0], N = dc[1], K = ta ? da[0] : da[1];
  if ((ta ? da[1] : da[0]) != M || (tb ? db[0] : db[1]) != N || (tb ? db[1] : db[0]) != K) {
    return ffi::Error::InvalidArgument("minillm_gemm: operand shapes do not match the result");
  }
  if (threads > 0 && scipy_openblas_get_num_threads() != threads) {
    scipy_openblas_set_num_threads(threads);  // global in OpenBLAS; every caller of one step asks the same
  }
  scipy_cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, M, N, K, 1.0f,
                    a.typed_data(), da[1], b.typed_data(), db[1], 0.0f, c->typed_data(), N);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MinillmGemm, Gemm,
                              ffi::Ffi::Bind()
                                  .Arg<Matrix>()
                                  .Arg<Matrix>()
                                  .Ret<Matrix>()
                                  .Attr<bool>("ta")
                                  .Attr<bool>("tb")
                                  .Attr<int32_t>("threads"));
