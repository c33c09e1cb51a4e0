// Fused GroupNorm + SiLU, CPU kernels (forward and backward). Formulas: pydiff/invertible.h.
//
// Forward, two passes over x split into (group, chunk) tasks shared by the OpenMP threads:
//   1. per-chunk sums of (x - x0) and (x - x0)^2 in float64 (x0: the group's first element, a
//      shift that keeps E[x^2] - E[x]^2 exact for data far from zero), summed per group in order;
//   2. y = silu(((x - mean_hi) - mean_lo) rstd w[c] + b[c]) in fp32 (float64 for float64 x), with
//      the float64 mean split into two floats so the subtraction keeps its precision.
// Backward: per (n, c) float64 sums of dz and dz * xhat (one read of x and dy), the per-channel
// parameter gradients from them, then dx in a second read. exp is a vectorisable polynomial
// (Cephes expf, <= 2 ulp) so the element loops vectorise. The kernel's threads run with
// flush-to-zero / denormals-are-zero (restored on exit): the vectorised silu evaluates its
// saturated branch for every lane, and denormal results there cost microcode assists (4-5x slower
// on the AMD build machine). Only results below 1.2e-38 in magnitude change (to 0).
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "pydiff/cpu_types.h"
#include "pydiff/invertible.h"

#if defined(__SSE__) || defined(__x86_64__)
#include <xmmintrin.h>
#define PYDIFF_HAS_MXCSR 1
#endif

namespace pydiff {
namespace {

// Flush-to-zero and denormals-are-zero for the current thread while in scope.
struct FtzGuard {
#ifdef PYDIFF_HAS_MXCSR
  unsigned old;
  FtzGuard() : old(_mm_getcsr()) { _mm_setcsr(old | 0x8040u); }
  ~FtzGuard() { _mm_setcsr(old); }
#endif
};

constexpr int64_t kChunk = 1024;   // elements per buffer
constexpr int64_t kTask = 8192;    // elements per task
constexpr int64_t kParallelMin = int64_t(1) << 15;  // elements: below, a one-thread region (phases share it)

// exp for |x| <= 88: Cephes' expf polynomial after n = round(x log2 e), scaled by 2^n through the
// exponent bits. Inputs outside [-87.3, 88.3] are clamped (silu and sigmoid saturate there).
inline float exp_fast(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
  const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t e = (int32_t(n) + 127) << 23;
  float s;
  std::memcpy(&s, &e, 4);
  return p * s;
}
inline float exp_acc(float x) { return exp_fast(x); }
inline double exp_acc(double x) { return std::exp(x); }

template <typename T>
using AccT = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

template <typename T>
inline AccT<T> ld(const T& v) {
  if constexpr (std::is_same<T, double>::value)
    return v;
  else
    return to_float(v);
}
template <typename T>
inline T st(AccT<T> v) {
  if constexpr (std::is_same<T, double>::value)
    return v;
  else
    return from_float<T>(v);
}

template <typename T>
inline void load(const T* src, int64_t n, AccT<T>* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = ld<T>(src[i]);
}

// ---- forward pass 1: shifted float64 sums of one range ----
template <typename T>
PYDIFF_CLONES void shifted_sums(const T* x, int64_t n, double shift, double* s1, double* s2) {
  using Acc = AccT<T>;
  alignas(64) Acc buf[kChunk];
  double a = 0, b = 0;
  for (int64_t lo = 0; lo < n; lo += kChunk) {
    const int64_t m = std::min(kChunk, n - lo);
    const Acc* X = buf;
    if constexpr (std::is_same<T, Acc>::value)
      X = x + lo;
    else
      load<T>(x + lo, m, buf);
#pragma omp simd reduction(+ : a, b)
    for (int64_t i = 0; i < m; ++i) {
      const double d = double(X[i]) - shift;
      a += d;
      b += d * d;
    }
  }
  *s1 = a;
  *s2 = b;
}

// ---- forward pass 2: y = silu(((x - mh) - ml) sc + bi) on a run of one channel ----
template <typename Acc>
PYDIFF_CLONES void apply_run(int64_t n, const Acc* __restrict__ X, Acc mh, Acc ml, Acc sc, Acc bi,
                             Acc* __restrict__ Y) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const Acc z = ((X[i] - mh) - ml) * sc + bi;
    Y[i] = z / (Acc(1) + exp_acc(-z));
  }
}

template <typename T>
inline double param(const void* p, int64_t c, double dflt) {
  if (!p) return dflt;
  return double(static_cast<const AccT<T>*>(p)[c]);
}

template <typename T>
void forward(const GroupNormSiluArgs& a) {
  using Acc = AccT<T>;
  const int64_t G = a.groups, Cg = a.C / G, HW = a.HW, M = Cg * HW, NG = a.N * G;
  const int64_t per = (M + kTask - 1) / kTask, tasks = NG * per;
  const T* x = static_cast<const T*>(a.x);
  T* y = static_cast<T*>(a.y);
  std::vector<double> part(size_t(tasks) * 2), mean(NG), rstd(NG);
#pragma omp parallel if (a.N * a.C * a.HW >= kParallelMin)
  {
    FtzGuard ftz;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t gi = t / per, lo = (t % per) * kTask, n = std::min(kTask, M - lo);
      const double shift = double(ld<T>(x[gi * M]));
      shifted_sums<T>(x + gi * M + lo, n, shift, &part[2 * t], &part[2 * t + 1]);
    }
#pragma omp single
    for (int64_t gi = 0; gi < NG; ++gi) {
      double s1 = 0, s2 = 0;
      for (int64_t j = 0; j < per; ++j) {
        s1 += part[2 * (gi * per + j)];
        s2 += part[2 * (gi * per + j) + 1];
      }
      const double m = s1 / double(M);
      const double var = std::max(s2 / double(M) - m * m, 0.0);
      mean[gi] = double(ld<T>(x[gi * M])) + m;
      rstd[gi] = 1.0 / std::sqrt(var + a.eps);
      static_cast<Acc*>(a.mean)[gi] = Acc(mean[gi]);
      static_cast<Acc*>(a.rstd)[gi] = Acc(rstd[gi]);
    }
    // (implicit barrier after single)
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
      alignas(64) Acc Xb[kChunk], Yb[kChunk];
      const int64_t gi = t / per, g = gi % G;
      const int64_t lo = (t % per) * kTask, hi = std::min(M, lo + kTask);
      const Acc mh = Acc(mean[gi]), ml = Acc(mean[gi] - double(mh));
      for (int64_t e = lo; e < hi;) {
        const int64_t cl = e / HW, c = g * Cg + cl;
        const int64_t end = std::min(hi, std::min((cl + 1) * HW, e + kChunk));
        const double sc = rstd[gi] * param<T>(a.weight, c, 1.0);
        const double bi = param<T>(a.bias, c, 0.0);
        const int64_t n = end - e;
        if constexpr (std::is_same<T, Acc>::value) {
          apply_run<Acc>(n, x + gi * M + e, mh, ml, Acc(sc), Acc(bi), y + gi * M + e);
        } else {
          load<T>(x + gi * M + e, n, Xb);
          apply_run<Acc>(n, Xb, mh, ml, Acc(sc), Acc(bi), Yb);
          for (int64_t i = 0; i < n; ++i) y[gi * M + e + i] = st<T>(Yb[i]);
        }
        e = end;
      }
    }
  }
}

// ---- backward ----
// Per element: xhat = ((x - mh) - ml) r, z = xhat w + b, s = sigmoid(z), dz = dy s (1 + z (1 - s)).
// Pass 1 sums dz and dz xhat over a run of one channel (float64 accumulators).
template <typename Acc>
PYDIFF_CLONES void dz_sums(int64_t n, const Acc* __restrict__ X, const Acc* __restrict__ DY, Acc mh, Acc ml, Acc r,
                           Acc w, Acc b, double* sa, double* sb) {
  double a = 0, c = 0;
#pragma omp simd reduction(+ : a, c)
  for (int64_t i = 0; i < n; ++i) {
    const Acc xh = ((X[i] - mh) - ml) * r;
    const Acc z = xh * w + b;
    const Acc s = Acc(1) / (Acc(1) + exp_acc(-z));
    const Acc dz = DY[i] * s * (Acc(1) + z * (Acc(1) - s));
    a += double(dz);
    c += double(dz * xh);
  }
  *sa += a;
  *sb += c;
}

// Pass 2: dx = rw dz - c1 - c2 xhat (rw = r w[c]) on a run of one channel.
template <typename Acc>
PYDIFF_CLONES void dx_run(int64_t n, const Acc* __restrict__ X, const Acc* __restrict__ DY, Acc mh, Acc ml, Acc r,
                          Acc w, Acc b, Acc rw, Acc c1, Acc c2, Acc* __restrict__ DX) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const Acc xh = ((X[i] - mh) - ml) * r;
    const Acc z = xh * w + b;
    const Acc s = Acc(1) / (Acc(1) + exp_acc(-z));
    const Acc dz = DY[i] * s * (Acc(1) + z * (Acc(1) - s));
    DX[i] = rw * dz - c1 - c2 * xh;
  }
}

template <typename T>
void backward(const GroupNormSiluArgs& a) {
  using Acc = AccT<T>;
  const int64_t N = a.N, C = a.C, G = a.groups, Cg = C / G, HW = a.HW, M = Cg * HW, NG = N * G;
  const int64_t per = (M + kTask - 1) / kTask, tasks = NG * per;
  const T* x = static_cast<const T*>(a.x);
  const T* dy = static_cast<const T*>(a.grad_y);
  T* dx = static_cast<T*>(a.grad_x);
  const Acc* mean = static_cast<const Acc*>(a.mean);
  const Acc* rstd = static_cast<const Acc*>(a.rstd);
  // per (n, c): A = sum dz, B = sum dz xhat; per group: c1 = r mean_g(w dz), c2 = r mean_g(w dz xhat)
  std::vector<double> A(size_t(N * C)), B(size_t(N * C)), c1(NG), c2(NG);
  auto mean_split = [&](int64_t gi, Acc* mh, Acc* ml) {
    const double m = double(mean[gi]);
    *mh = Acc(m);
    *ml = Acc(m - double(*mh));
  };
#pragma omp parallel if (a.N * a.C * a.HW >= kParallelMin)
  {
    FtzGuard ftz;
#pragma omp for schedule(static)
    for (int64_t nc = 0; nc < N * C; ++nc) {
      alignas(64) Acc Xb[kChunk], Db[kChunk];
      const int64_t n = nc / C, c = nc % C, gi = n * G + c / Cg;
      Acc mh, ml;
      mean_split(gi, &mh, &ml);
      const Acc r = rstd[gi], w = Acc(param<T>(a.weight, c, 1.0)), b = Acc(param<T>(a.bias, c, 0.0));
      double sa = 0, sb = 0;
      for (int64_t lo = 0; lo < HW; lo += kChunk) {
        const int64_t m = std::min(kChunk, HW - lo);
        if constexpr (std::is_same<T, Acc>::value) {
          dz_sums<Acc>(m, x + nc * HW + lo, dy + nc * HW + lo, mh, ml, r, w, b, &sa, &sb);
        } else {
          load<T>(x + nc * HW + lo, m, Xb);
          load<T>(dy + nc * HW + lo, m, Db);
          dz_sums<Acc>(m, Xb, Db, mh, ml, r, w, b, &sa, &sb);
        }
      }
      A[nc] = sa;
      B[nc] = sb;
    }
#pragma omp single
    {
      for (int64_t c = 0; c < C; ++c) {
        double gw = 0, gb = 0;
        for (int64_t n = 0; n < N; ++n) {
          gw += B[n * C + c];
          gb += A[n * C + c];
        }
        if (a.grad_weight) static_cast<Acc*>(a.grad_weight)[c] = Acc(gw);
        if (a.grad_bias) static_cast<Acc*>(a.grad_bias)[c] = Acc(gb);
      }
      for (int64_t gi = 0; gi < NG; ++gi) {
        const int64_t n = gi / G, g = gi % G;
        double s1 = 0, s2 = 0;
        for (int64_t cl = 0; cl < Cg; ++cl) {
          const int64_t c = g * Cg + cl;
          const double w = param<T>(a.weight, c, 1.0);
          s1 += w * A[n * C + c];
          s2 += w * B[n * C + c];
        }
        c1[gi] = double(rstd[gi]) * s1 / double(M);
        c2[gi] = double(rstd[gi]) * s2 / double(M);
      }
    }
    // dx = r w dz - c1 - c2 xhat
#pragma omp for schedule(static)
    for (int64_t t = 0; t < (dx ? tasks : 0); ++t) {
      alignas(64) Acc Xb[kChunk], Db[kChunk], Ob[kChunk];
      const int64_t gi = t / per, g = gi % G;
      const int64_t lo = (t % per) * kTask, hi = std::min(M, lo + kTask);
      Acc mh, ml;
      mean_split(gi, &mh, &ml);
      const Acc r = rstd[gi];
      for (int64_t e = lo; e < hi;) {
        const int64_t cl = e / HW, c = g * Cg + cl;
        const int64_t end = std::min(hi, std::min((cl + 1) * HW, e + kChunk));
        const int64_t m = end - e;
        const Acc w = Acc(param<T>(a.weight, c, 1.0)), b = Acc(param<T>(a.bias, c, 0.0));
        const Acc rw = Acc(double(r) * double(w)), k1 = Acc(c1[gi]), k2 = Acc(c2[gi]);
        if constexpr (std::is_same<T, Acc>::value) {
          dx_run<Acc>(m, x + gi * M + e, dy + gi * M + e, mh, ml, r, w, b, rw, k1, k2, dx + gi * M + e);
        } else {
          load<T>(x + gi * M + e, m, Xb);
          load<T>(dy + gi * M + e, m, Db);
          dx_run<Acc>(m, Xb, Db, mh, ml, r, w, b, rw, k1, k2, Ob);
          for (int64_t i = 0; i < m; ++i) dx[gi * M + e + i] = st<T>(Ob[i]);
        }
        e = end;
      }
    }
  }
}

bool valid(const GroupNormSiluArgs& a) {
  return a.N >= 0 && a.C >= 1 && a.HW >= 1 && a.groups >= 1 && a.C % a.groups == 0 && a.eps >= 0 && a.x;
}

}  // namespace

int groupnorm_silu_cpu(const GroupNormSiluArgs& a) {
  if (a.N == 0 && a.C >= 1 && a.groups >= 1 && a.C % a.groups == 0) return 0;  // nothing to read or write
  if (!valid(a) || !a.y || !a.mean || !a.rstd) return 1;
  switch (a.dtype) {
    case FloatType::kF32: forward<float>(a); return 0;
    case FloatType::kF16: forward<half_t>(a); return 0;
    case FloatType::kBF16: forward<bf16_t>(a); return 0;
    case FloatType::kF64: forward<double>(a); return 0;
  }
  return 1;
}

int groupnorm_silu_backward_cpu(const GroupNormSiluArgs& a) {
  if (a.N == 0 && a.C >= 1 && a.groups >= 1 && a.C % a.groups == 0) {
    // no samples: parameter gradients are zero
    const bool f64 = a.dtype == FloatType::kF64;
    for (int64_t c = 0; c < a.C; ++c) {
      if (a.grad_weight) f64 ? void(static_cast<double*>(a.grad_weight)[c] = 0) : void(static_cast<float*>(a.grad_weight)[c] = 0);
      if (a.grad_bias) f64 ? void(static_cast<double*>(a.grad_bias)[c] = 0) : void(static_cast<float*>(a.grad_bias)[c] = 0);
    }
    return 0;
  }
  if (!valid(a) || !a.grad_y || !a.mean || !a.rstd) return 1;
  switch (a.dtype) {
    case FloatType::kF32: backward<float>(a); return 0;
    case FloatType::kF16: backward<half_t>(a); return 0;
    case FloatType::kBF16: backward<bf16_t>(a); return 0;
    case FloatType::kF64: backward<double>(a); return 0;
  }
  return 1;
}

}  // namespace pydiff
