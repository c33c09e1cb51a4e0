// Coupling update, CPU kernels: y = A x + B f (fp32 or float64 compute) and the fixed-point
// y = x + rint(f s). One pass in L1-sized chunks over two OpenMP threads; fp16/bf16 chunks go
// through fp32 buffers, fp32/float64 are read and written in place. Formulas: pydiff/invertible.h.
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "pydiff/cpu_types.h"
#include "pydiff/invertible.h"

namespace pydiff {
namespace {

constexpr int64_t kChunk = 1024;
constexpr int64_t kParallelMin = int64_t(1) << 15;  // elements: below, a parallel region costs more than it saves

inline double to_double(double v) { return v; }
template <typename T>
inline double to_double(T v) { return double(to_float(v)); }

// Load n elements of T at p + off as Acc (Acc = float or double): a pointer into the tensor when
// T == Acc, else converted into buf.
template <typename T, typename Acc>
inline const Acc* view(const void* p, int64_t off, int64_t n, Acc* buf) {
  if constexpr (std::is_same<T, Acc>::value) {
    return static_cast<const Acc*>(p) + off;
  } else {
    const T* src = static_cast<const T*>(p) + off;
    for (int64_t i = 0; i < n; ++i) {
      if constexpr (std::is_same<Acc, double>::value)
        buf[i] = to_double(src[i]);
      else
        buf[i] = to_float(src[i]);
    }
    return buf;
  }
}

template <typename T, typename Acc>
inline void store(void* p, int64_t off, int64_t n, const Acc* src) {
  T* dst = static_cast<T*>(p) + off;
  for (int64_t i = 0; i < n; ++i) {
    if constexpr (std::is_same<T, double>::value || std::is_same<T, float>::value)
      dst[i] = T(src[i]);
    else
      dst[i] = from_float<T>(float(src[i]));
  }
}

// O may alias X (in place): element i is read before it is written, no other element is touched.
template <typename Acc>
PYDIFF_CLONES void axpby(int64_t n, Acc A, const Acc* X, Acc B, const Acc* F, Acc* O) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) O[i] = A * X[i] + B * F[i];
}

template <typename TX, typename TF, typename Acc>
void run(const CouplingArgs& a, Acc A, Acc B) {
  const int64_t nchunks = (a.numel + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (a.numel >= kParallelMin)
  for (int64_t t = 0; t < nchunks; ++t) {
    alignas(64) Acc Xb[kChunk], Fb[kChunk], Ob[kChunk];
    const int64_t lo = t * kChunk;
    const int64_t n = std::min(kChunk, a.numel - lo);
    const Acc* X = view<TX, Acc>(a.x, lo, n, Xb);
    const Acc* F = view<TF, Acc>(a.f, lo, n, Fb);
    if constexpr (std::is_same<TX, Acc>::value) {
      axpby<Acc>(n, A, X, B, F, static_cast<Acc*>(a.y) + lo);
    } else {
      axpby<Acc>(n, A, X, B, F, Ob);
      store<TX, Acc>(a.y, lo, n, Ob);
    }
  }
}

template <typename TX, typename TF>
void dispatch_acc(const CouplingArgs& a, double A, double B) {
  if (std::is_same<TX, double>::value || std::is_same<TF, double>::value)
    run<TX, TF, double>(a, A, B);
  else
    run<TX, TF, float>(a, float(A), float(B));
}

template <typename TX>
int dispatch_f(const CouplingArgs& a, double A, double B) {
  switch (a.f_dtype) {
    case FloatType::kF32: dispatch_acc<TX, float>(a, A, B); return 0;
    case FloatType::kF16: dispatch_acc<TX, half_t>(a, A, B); return 0;
    case FloatType::kBF16: dispatch_acc<TX, bf16_t>(a, A, B); return 0;
    case FloatType::kF64: dispatch_acc<TX, double>(a, A, B); return 0;
  }
  return 1;
}

template <typename TF>
PYDIFF_CLONES void fixed_chunk(int64_t n, const int64_t* X, const TF* F, double s, int64_t* Y) {
  constexpr double kLim = 4611686018427387904.0;  // 2^62
  for (int64_t i = 0; i < n; ++i) {
    double v = std::nearbyint(to_double(F[i]) * s);
    v = v != v ? 0.0 : (v < -kLim ? -kLim : (v > kLim ? kLim : v));
    Y[i] = int64_t(uint64_t(X[i]) + uint64_t(int64_t(v)));
  }
}

template <typename TF>
void run_fixed(const CouplingFixedArgs& a) {
  const int64_t nchunks = (a.numel + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (a.numel >= kParallelMin)
  for (int64_t t = 0; t < nchunks; ++t) {
    const int64_t lo = t * kChunk;
    const int64_t n = std::min(kChunk, a.numel - lo);
    fixed_chunk<TF>(n, a.x + lo, static_cast<const TF*>(a.f) + lo, a.scale, a.y + lo);
  }
}

}  // namespace

int coupling_update_cpu(const CouplingArgs& a) {
  if (a.numel < 0) return 1;
  if (a.numel == 0) return 0;
  if (!a.x || !a.f || !a.y) return 1;
  double A = a.a, B = a.b;
  if (a.coeffs) {
    if (a.coeffs_dtype == FloatType::kF64) {
      A *= static_cast<const double*>(a.coeffs)[0];
      B *= static_cast<const double*>(a.coeffs)[1];
    } else if (a.coeffs_dtype == FloatType::kF32) {
      A *= static_cast<const float*>(a.coeffs)[0];
      B *= static_cast<const float*>(a.coeffs)[1];
    } else {
      return 1;
    }
  }
  switch (a.x_dtype) {
    case FloatType::kF32: return dispatch_f<float>(a, A, B);
    case FloatType::kF16: return dispatch_f<half_t>(a, A, B);
    case FloatType::kBF16: return dispatch_f<bf16_t>(a, A, B);
    case FloatType::kF64: return dispatch_f<double>(a, A, B);
  }
  return 1;
}

int coupling_fixed_cpu(const CouplingFixedArgs& a) {
  if (a.numel < 0 || !std::isfinite(a.scale)) return 1;
  if (a.numel == 0) return 0;
  if (!a.x || !a.f || !a.y) return 1;
  switch (a.f_dtype) {
    case FloatType::kF32: run_fixed<float>(a); return 0;
    case FloatType::kF16: run_fixed<half_t>(a); return 0;
    case FloatType::kBF16: run_fixed<bf16_t>(a); return 0;
    case FloatType::kF64: run_fixed<double>(a); return 0;
  }
  return 1;
}

}  // namespace pydiff
