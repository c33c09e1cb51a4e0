// The CUDA invertible-block kernels (csrc/invertible/coupling_cuda.cu, groupnorm_silu_cuda.cu) run
// on the CPU emulator (emu.h) through their host entry points, against float64 host computations of
// the formulas in csrc/include/pydiff/invertible.h:
//
//   coupling:       y = A x + B f, A = a c[0], B = b c[1] (fp32 compute, float64 when x or f is
//                   float64); y may alias x. Tolerance: 4 * 2^-24 (fp32) / 4 * 2^-53 (float64)
//                   times |A x| + |B f|, plus one unit of y's dtype.
//   coupling_fixed: y = x + rint(f s) clamped to +-2^62, NaN -> 0, int64 modulo 2^64: exact, and the
//                   update with -s undoes it exactly (in place too).
//   groupnorm_silu: mean / rstd (biased variance, float64), y = silu((x - mean) rstd w + b); the
//                   backward grad_w, grad_b, grad_x. fp32 compute: tolerances of a few hundred fp32
//                   units of the magnitudes involved (the reductions sum in float64).
// Cases: sizes 1, primes, non-multiples of the vector width, misaligned pointers (the scalar
// kernels), every dtype pairing, coefficient vectors in fp32 / float64 or none, in place; groupnorm
// shapes with HW = 1, odd HW, HW a multiple of the vector width (vector kernels), one / many groups,
// the warp-per-row and block-per-row backward reductions, weight / bias present or not, the
// outputs of the backward present or not. Outputs are poisoned before the call; every buffer sits
// against guard pages with canaries.
#include "emu.h"

#include "../../invertible/coupling_cuda.cu"
// both .cu files define the helpers Vec and load_vec in pydiff::{anonymous}: rename the second set
#define Vec gn_Vec
#define load_vec gn_load_vec
#include "../../invertible/groupnorm_silu_cuda.cu"
#undef Vec
#undef load_vec
#include "host_ref.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace {

using namespace emu_test;

// A typed device buffer of n elements, `align`-byte aligned or one element past such a boundary.
struct Tensor {
  cuda_emu::Buffer buf;
  std::vector<double> v;
  Tensor() = default;
  Tensor(FloatType t, int64_t n, bool misaligned, Rng* rng, double scale = 1.0, double mean = 0.0, size_t align = 16)
      : buf(std::max<size_t>(size_t(n) * type_size(t), 1), align, misaligned ? type_size(t) : 0), v(size_t(n)) {
    buf.fill(0xFF);  // poison: NaN
    if (rng)
      for (int64_t i = 0; i < n; ++i) v[size_t(i)] = store(t, buf.data(), i, mean + scale * rng->normal());
  }
  void* p() const { return buf.data(); }
};

double unit(FloatType t) {
  switch (t) {
    case FloatType::kBF16: return 0x1p-8;
    case FloatType::kF16: return 0x1p-11;
    case FloatType::kF64: return 0x1p-53;
    default: return 0x1p-24;
  }
}

// ---------------------------------------------------------------- coupling
struct CouplingCase {
  FloatType xt, ft;
  int64_t n;
  int coeffs;  // 0: none, 1: fp32, 2: float64
  bool inplace = false;
  int misalign = 0;  // 1: x (and y), 2: f, 3: y only
};

// Whether f is one of the scalar (VEC 1) coupling kernels.
template <typename TX, typename TF>
bool is_scalar_coupling_of(const void* f) {
  using Acc = std::conditional_t<sizeof(TX) == 8 || sizeof(TF) == 8, double, float>;
  return f == reinterpret_cast<const void*>(&pydiff::coupling_kernel<TX, TF, Acc, 1>);
}
template <typename TX>
bool is_scalar_coupling_x(const void* f) {
  return is_scalar_coupling_of<TX, float>(f) || is_scalar_coupling_of<TX, __half>(f) ||
         is_scalar_coupling_of<TX, __nv_bfloat16>(f) || is_scalar_coupling_of<TX, double>(f);
}
bool is_scalar_coupling(const void* f) {
  return is_scalar_coupling_x<float>(f) || is_scalar_coupling_x<__half>(f) || is_scalar_coupling_x<__nv_bfloat16>(f) ||
         is_scalar_coupling_x<double>(f);
}

void run_coupling(const CouplingCase& C, Rng& rng) {
  const std::string tag = std::string("coupling [x ") + type_name(C.xt) + " f " + type_name(C.ft) +
                          " n=" + std::to_string(C.n) + " coeffs=" + std::to_string(C.coeffs) +
                          (C.inplace ? " in place" : "") + " misalign=" + std::to_string(C.misalign) + "]";
  // 64-byte aligned unless misaligned: the vector kernel needs f aligned to VEC f-elements (up to 64 bytes)
  Tensor x(C.xt, C.n, C.misalign == 1, &rng, 1.0, 0.0, 64), f(C.ft, C.n, C.misalign == 2, &rng, 1.0, 0.0, 64);
  Tensor y;
  if (!C.inplace) y = Tensor(C.xt, C.n, C.misalign == 1 || C.misalign == 3, nullptr, 1.0, 0.0, 64);
  const std::vector<double> x0 = x.v;
  const double a = rng.uniform(-2, 2), b = rng.uniform(-2, 2);
  cuda_emu::Buffer cb(16, 16, 0);
  double c0 = 1, c1 = 1;
  if (C.coeffs == 1) {
    c0 = store(FloatType::kF32, cb.data(), 0, rng.uniform(0.1, 1));
    c1 = store(FloatType::kF32, cb.data(), 1, rng.uniform(0.1, 1));
  } else if (C.coeffs == 2) {
    c0 = store(FloatType::kF64, cb.data(), 0, rng.uniform(0.1, 1));
    c1 = store(FloatType::kF64, cb.data(), 1, rng.uniform(0.1, 1));
  }
  pydiff::CouplingArgs A{};
  A.x_dtype = C.xt;
  A.f_dtype = C.ft;
  A.numel = C.n;
  A.x = x.p();
  A.f = f.p();
  A.y = C.inplace ? x.p() : y.p();
  A.a = a;
  A.b = b;
  A.coeffs = C.coeffs ? cb.data() : nullptr;
  A.coeffs_dtype = C.coeffs == 1 ? FloatType::kF32 : FloatType::kF64;
  const size_t nl = cuda_emu::launches().size();
  const int rc = pydiff::coupling_update_cuda(A, nullptr);
  CHECK(rc == 0, "%s: returned %d", tag.c_str(), rc);
  CHECK(cuda_emu::launches().size() == nl + 1, "%s: expected one launch", tag.c_str());
  if (cuda_emu::launches().size() == nl + 1) {
    const bool vec_kernel = !is_scalar_coupling(cuda_emu::launches().back().func);
    // VEC elements per thread: x / y aligned to VEC x-elements and f to VEC f-elements (VEC f64: 2, else 16 bytes of x)
    const size_t vec = type_size(C.xt) == 8 ? 2 : 16 / type_size(C.xt);
    auto al = [](const void* p, size_t b) { return reinterpret_cast<uintptr_t>(p) % b == 0; };
    const bool want = al(A.x, vec * type_size(C.xt)) && al(A.y, vec * type_size(C.xt)) && al(A.f, vec * type_size(C.ft));
    CHECK(vec_kernel == want && want == (C.misalign == 0), "%s: the %s kernel ran", tag.c_str(),
          vec_kernel ? "vector" : "scalar");
  }
  const bool f64 = C.xt == FloatType::kF64 || C.ft == FloatType::kF64;
  const double eps = f64 ? 0x1p-53 : 0x1p-24;
  const double AA = a * c0, BB = b * c1;
  int bad = 0;
  for (int64_t i = 0; i < C.n && bad < 5; ++i) {
    const double ref = AA * x0[size_t(i)] + BB * f.v[size_t(i)];
    const double mag = std::fabs(AA * x0[size_t(i)]) + std::fabs(BB * f.v[size_t(i)]);
    const double got = load(C.xt, C.inplace ? x.p() : y.p(), i);
    const double tol = 4 * eps * mag + unit(C.xt) * 2 * (std::fabs(ref) + 4 * eps * mag) +
                       (C.xt == FloatType::kF16 ? 0x1p-24 : 0.0);
    if (!(std::fabs(got - ref) <= tol)) {
      CHECK(false, "%s: y[%lld] = %.17g, expected %.17g (tol %.3g)", tag.c_str(), (long long)i, got, ref, tol);
      ++bad;
    }
  }
  CHECK(x.buf.intact() && f.buf.intact() && (C.inplace || y.buf.intact()), "%s: canary overwritten", tag.c_str());
}

struct FixedCase {
  FloatType ft;
  int64_t n;
  bool inplace = false;
  int misalign = 0;  // 1: x, 2: f, 3: y
};

int64_t fixed_ref(int64_t x, double f, double s) {
  double v = std::nearbyint(f * s);
  v = std::isnan(v) ? 0.0 : std::min(std::max(v, -0x1p62), 0x1p62);
  return int64_t(uint64_t(x) + uint64_t(int64_t(v)));
}

void run_fixed(const FixedCase& C, Rng& rng) {
  const std::string tag = std::string("coupling_fixed [f ") + type_name(C.ft) + " n=" + std::to_string(C.n) +
                          (C.inplace ? " in place" : "") + " misalign=" + std::to_string(C.misalign) + "]";
  cuda_emu::Buffer xb(size_t(C.n) * 8, 16, C.misalign == 1 ? 8 : 0), yb;
  if (!C.inplace) yb = cuda_emu::Buffer(size_t(C.n) * 8, 16, C.misalign == 3 ? 8 : 0);
  Tensor f(C.ft, C.n, C.misalign == 2, &rng, 3.0);
  std::vector<int64_t> x0(size_t(C.n));
  const double s = 0.5 * 2048.0;  // 2^frac_bits scaled
  for (int64_t i = 0; i < C.n; ++i) {
    x0[size_t(i)] = xb.as<int64_t>()[i] = int64_t(rng.g());  // any int64, wrap-around included
    const int64_t kind = rng.integer(0, 15);
    // special f: rounding ties (f s = k + 1/2), NaN, +-inf and huge values (clamped), -0
    if (kind == 0) f.v[size_t(i)] = store(C.ft, f.p(), i, (double(rng.integer(-50, 50)) + 0.5) / s);
    if (kind == 1) f.v[size_t(i)] = store(C.ft, f.p(), i, NAN);
    if (kind == 2) f.v[size_t(i)] = store(C.ft, f.p(), i, rng.integer(0, 1) ? INFINITY : -INFINITY);
    if (kind == 3 && C.ft != FloatType::kF16) f.v[size_t(i)] = store(C.ft, f.p(), i, rng.integer(0, 1) ? 3e38 : -3e38);
    if (kind == 4) f.v[size_t(i)] = store(C.ft, f.p(), i, -0.0);
  }
  pydiff::CouplingFixedArgs A{};
  A.f_dtype = C.ft;
  A.numel = C.n;
  A.x = xb.as<int64_t>();
  A.f = f.p();
  A.y = C.inplace ? xb.as<int64_t>() : yb.as<int64_t>();
  A.scale = s;
  const int rc = pydiff::coupling_fixed_cuda(A, nullptr);
  CHECK(rc == 0, "%s: returned %d", tag.c_str(), rc);
  int64_t* y = C.inplace ? xb.as<int64_t>() : yb.as<int64_t>();
  int bad = 0;
  for (int64_t i = 0; i < C.n && bad < 5; ++i) {
    const int64_t ref = fixed_ref(x0[size_t(i)], f.v[size_t(i)], s);
    if (y[i] != ref) {
      CHECK(false, "%s: y[%lld] = %lld, expected %lld (f %.17g)", tag.c_str(), (long long)i, (long long)y[i],
            (long long)ref, f.v[size_t(i)]);
      ++bad;
    }
  }
  // the inverse update restores x bit for bit
  A.x = y;
  A.y = y;
  A.scale = -s;
  CHECK(pydiff::coupling_fixed_cuda(A, nullptr) == 0, "%s: inverse returned nonzero", tag.c_str());
  for (int64_t i = 0; i < C.n; ++i)
    if (y[i] != x0[size_t(i)]) {
      CHECK(false, "%s: inverse y[%lld] = %lld, expected %lld", tag.c_str(), (long long)i, (long long)y[i],
            (long long)x0[size_t(i)]);
      break;
    }
  CHECK(xb.intact() && f.buf.intact() && (C.inplace || yb.intact()), "%s: canary overwritten", tag.c_str());
}

// ---------------------------------------------------------------- groupnorm + silu
struct GnCase {
  FloatType t;
  int64_t N, C, G, HW;
  bool weight = true, bias = true;
  bool gx = true, gw = true, gb = true;
  bool misalign = false;  // x (and y / grad_x) one element off a 16-byte boundary: scalar kernels
  double mean = 0.0, scale = 1.0;
};

void run_groupnorm(const GnCase& C, Rng& rng) {
  const FloatType t = C.t;
  const FloatType pt = t == FloatType::kF64 ? FloatType::kF64 : FloatType::kF32;  // weight / stats dtype
  const std::string tag = std::string("groupnorm_silu [") + type_name(t) + " N=" + std::to_string(C.N) +
                          " C=" + std::to_string(C.C) + " G=" + std::to_string(C.G) + " HW=" + std::to_string(C.HW) +
                          (C.misalign ? " misaligned" : "") + (C.weight ? "" : " no-w") + (C.bias ? "" : " no-b") + "]";
  const int64_t N = C.N, Cn = C.C, G = C.G, HW = C.HW, Cg = Cn / G, M = Cg * HW, tot = N * Cn * HW;
  const double eps = 1e-5;
  const double e = t == FloatType::kF64 ? 0x1p-53 : 0x1p-24;
  const double u = unit(t), habs = t == FloatType::kF16 ? 0x1p-24 : 0.0;
  Tensor x(t, tot, C.misalign, &rng, C.scale, C.mean), y(t, tot, C.misalign, nullptr);
  Tensor w, b;
  if (C.weight) w = Tensor(pt, Cn, false, &rng, 0.5, 1.0);
  if (C.bias) b = Tensor(pt, Cn, false, &rng, 0.5);
  auto W = [&](int64_t c) { return C.weight ? w.v[size_t(c)] : 1.0; };
  auto Bi = [&](int64_t c) { return C.bias ? b.v[size_t(c)] : 0.0; };
  Tensor mean(pt, N * G, false, nullptr), rstd(pt, N * G, false, nullptr);

  pydiff::GroupNormSiluArgs a{};
  a.dtype = t;
  a.N = N;
  a.C = Cn;
  a.HW = HW;
  a.groups = G;
  a.eps = eps;
  a.x = x.p();
  a.weight = C.weight ? w.p() : nullptr;
  a.bias = C.bias ? b.p() : nullptr;
  a.y = y.p();
  a.mean = mean.p();
  a.rstd = rstd.p();
  cuda_emu::Buffer ws(size_t(std::max<int64_t>(pydiff::groupnorm_silu_cuda_workspace(a), 8)), 16, 0);
  ws.fill(0xFF);
  int rc = pydiff::groupnorm_silu_cuda(a, ws.data(), nullptr);
  CHECK(rc == 0, "%s: forward returned %d", tag.c_str(), rc);

  // reference statistics (float64), then the stored (rounded) ones used by both backward sides
  const size_t ng = size_t(N * G), nct = size_t(N * Cn), nt = size_t(tot);
  std::vector<double> rm(ng), rr(ng), sm(ng), sr(ng);
  int bad = 0;
  for (int64_t gi = 0; gi < N * G; ++gi) {
    double s = 0;
    for (int64_t k = 0; k < M; ++k) s += x.v[size_t(gi * M + k)];
    const double m = s / double(M);
    double v = 0;
    for (int64_t k = 0; k < M; ++k) v += (x.v[size_t(gi * M + k)] - m) * (x.v[size_t(gi * M + k)] - m);
    v /= double(M);
    rm[size_t(gi)] = m;
    rr[size_t(gi)] = 1.0 / std::sqrt(v + eps);
    const double gm = load(pt, mean.p(), gi), gr = load(pt, rstd.p(), gi);
    const double sd = std::sqrt(v);
    // mean: float64 sums of fp32 values shifted by the first element
    const double tm = 64 * e * (std::fabs(m) + sd) + 2 * (pt == FloatType::kF64 ? 0x1p-53 : 0x1p-24) * std::fabs(m);
    if (!(std::fabs(gm - m) <= tm) || !(std::fabs(gr - rr[size_t(gi)]) <= 256 * e * rr[size_t(gi)])) {
      CHECK(false, "%s: mean / rstd[%lld] = %.12g / %.12g, expected %.12g / %.12g", tag.c_str(), (long long)gi, gm, gr,
            m, rr[size_t(gi)]);
      ++bad;
    }
    sm[size_t(gi)] = store(pt, mean.p(), gi, m);
    sr[size_t(gi)] = store(pt, rstd.p(), gi, rr[size_t(gi)]);
  }
  for (int64_t i = 0; i < tot && bad < 5; ++i) {
    const int64_t c = (i / HW) % Cn, gi = i / M;
    const double xh = (x.v[size_t(i)] - rm[size_t(gi)]) * rr[size_t(gi)];
    const double z = xh * W(c) + Bi(c);
    const double ref = z / (1 + std::exp(-z));
    const double got = load(t, y.p(), i);
    // xh's error is absolute (the statistics' rounding, relative to the group's spread): |w| (|xh| + 1 + |m| r)
    const double tol = 64 * e * (std::fabs(W(c)) * (std::fabs(xh) + 1 + std::fabs(rm[size_t(gi)]) * rr[size_t(gi)]) +
                                 std::fabs(Bi(c)) + std::fabs(ref) + 1e-30) +
                       2 * u * std::fabs(ref) + habs;
    if (!(std::fabs(got - ref) <= tol)) {
      CHECK(false, "%s: y[%lld] = %.12g, expected %.12g (tol %.3g)", tag.c_str(), (long long)i, got, ref, tol);
      ++bad;
    }
  }
  CHECK(x.buf.intact() && y.buf.intact() && mean.buf.intact() && rstd.buf.intact() && ws.intact(),
        "%s: forward: canary overwritten", tag.c_str());

  // backward from the stored statistics
  Tensor dy(t, tot, C.misalign, &rng), dx;
  if (C.gx) dx = Tensor(t, tot, C.misalign, nullptr);
  Tensor gw, gb;
  if (C.gw) gw = Tensor(pt, Cn, false, nullptr);
  if (C.gb) gb = Tensor(pt, Cn, false, nullptr);
  a.grad_y = dy.p();
  a.grad_x = C.gx ? dx.p() : nullptr;
  a.grad_weight = C.gw ? gw.p() : nullptr;
  a.grad_bias = C.gb ? gb.p() : nullptr;
  cuda_emu::Buffer wsb(size_t(std::max<int64_t>(pydiff::groupnorm_silu_backward_cuda_workspace(a), 8)), 16, 0);
  wsb.fill(0xFF);
  rc = pydiff::groupnorm_silu_backward_cuda(a, wsb.data(), nullptr);
  CHECK(rc == 0, "%s: backward returned %d", tag.c_str(), rc);
  std::vector<double> dz(nt), xh(nt);
  std::vector<double> A(nct), B(nct), Am(nct), Bm(nct);
  for (int64_t i = 0; i < tot; ++i) {
    const int64_t c = (i / HW) % Cn, gi = i / M, nc = i / HW;
    xh[size_t(i)] = (x.v[size_t(i)] - sm[size_t(gi)]) * sr[size_t(gi)];
    const double z = xh[size_t(i)] * W(c) + Bi(c);
    const double s = 1 / (1 + std::exp(-z));
    dz[size_t(i)] = dy.v[size_t(i)] * s * (1 + z * (1 - s));
    A[size_t(nc)] += dz[size_t(i)];
    B[size_t(nc)] += dz[size_t(i)] * xh[size_t(i)];
    const double dzm = std::fabs(dy.v[size_t(i)]) * (1 + std::fabs(z)) * 2;  // bound on |dz| and its error scale
    Am[size_t(nc)] += dzm;
    Bm[size_t(nc)] += dzm * (std::fabs(xh[size_t(i)]) + 1);
  }
  for (int64_t c = 0; c < Cn && bad < 5; ++c) {
    double rw = 0, rb = 0, mw = 0, mb = 0;
    for (int64_t n = 0; n < N; ++n) {
      rw += B[size_t(n * Cn + c)];
      rb += A[size_t(n * Cn + c)];
      mw += Bm[size_t(n * Cn + c)];
      mb += Am[size_t(n * Cn + c)];
    }
    const double pu = pt == FloatType::kF64 ? 0x1p-53 : 0x1p-24;
    if (C.gw) {
      const double got = load(pt, gw.p(), c);
      if (!(std::fabs(got - rw) <= 64 * e * mw + 2 * pu * std::fabs(rw))) {
        CHECK(false, "%s: grad_w[%lld] = %.12g, expected %.12g", tag.c_str(), (long long)c, got, rw);
        ++bad;
      }
    }
    if (C.gb) {
      const double got = load(pt, gb.p(), c);
      if (!(std::fabs(got - rb) <= 64 * e * mb + 2 * pu * std::fabs(rb))) {
        CHECK(false, "%s: grad_b[%lld] = %.12g, expected %.12g", tag.c_str(), (long long)c, got, rb);
        ++bad;
      }
    }
  }
  if (C.gx) {
    for (int64_t gi = 0; gi < N * G && bad < 5; ++gi) {
      const int64_t n = gi / G, g = gi % G;
      double s1 = 0, s2 = 0, m1 = 0, m2 = 0;
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        s1 += W(c) * A[size_t(n * Cn + c)];
        s2 += W(c) * B[size_t(n * Cn + c)];
        m1 += std::fabs(W(c)) * Am[size_t(n * Cn + c)];
        m2 += std::fabs(W(c)) * Bm[size_t(n * Cn + c)];
      }
      const double r = sr[size_t(gi)];
      const double c1 = r * s1 / double(M), c2 = r * s2 / double(M), c1m = r * m1 / double(M), c2m = r * m2 / double(M);
      for (int64_t k = 0; k < M && bad < 5; ++k) {
        const int64_t i = gi * M + k, c = g * Cg + k / HW;
        const double ref = r * W(c) * dz[size_t(i)] - c1 - c2 * xh[size_t(i)];
        const double dzm = std::fabs(dy.v[size_t(i)]) * (1 + std::fabs(xh[size_t(i)] * W(c) + Bi(c))) * 2;
        const double mag = r * std::fabs(W(c)) * dzm * (1 + std::fabs(sm[size_t(gi)]) * r) + c1m +
                           (std::fabs(xh[size_t(i)]) + 1) * c2m;
        const double got = load(t, dx.p(), i);
        const double tol = 64 * e * mag + 2 * u * std::fabs(ref) + habs;
        if (!(std::fabs(got - ref) <= tol)) {
          CHECK(false, "%s: grad_x[%lld] = %.12g, expected %.12g (tol %.3g)", tag.c_str(), (long long)i, got, ref, tol);
          ++bad;
        }
      }
    }
  }
  CHECK(dy.buf.intact() && (!C.gx || dx.buf.intact()) && (!C.gw || gw.buf.intact()) && (!C.gb || gb.buf.intact()) &&
            wsb.intact(),
        "%s: backward: canary overwritten", tag.c_str());
}

}  // namespace

int main(int argc, char** argv) {
  const int sweep = argc > 1 ? std::atoi(argv[1]) : 200;
  const auto t0 = std::chrono::steady_clock::now();
  Rng rng(5117);
  const FloatType F32 = FloatType::kF32, F16 = FloatType::kF16, BF16 = FloatType::kBF16, F64 = FloatType::kF64;
  const FloatType all[] = {F32, F16, BF16, F64};
  // every dtype pairing, vector and scalar kernels, in place and not
  for (FloatType xt : all)
    for (FloatType ft : all) {
      run_coupling({xt, ft, 1, 0}, rng);
      run_coupling({xt, ft, 1031, 2, false, 0}, rng);
      run_coupling({xt, ft, 263, 1, true, 0}, rng);
      run_coupling({xt, ft, 97, 2, false, 1}, rng);
      run_coupling({xt, ft, 61, 0, true, 1}, rng);
      run_coupling({xt, ft, 130, 1, false, 2}, rng);
      run_coupling({xt, ft, 37, 0, false, 3}, rng);
    }
  {  // a grid capped below the work (grid-stride loop)
    cuda_emu::device(0).sms = 1;
    run_coupling({F32, BF16, 4 * 256 * 8 * 2 + 3, 2, true, 0}, rng);
    run_coupling({F16, F16, 256 * 8 * 2 + 7, 1, false, 2}, rng);
    cuda_emu::device(0).sms = 132;
  }
  for (FloatType ft : all) {
    run_fixed({ft, 1}, rng);
    run_fixed({ft, 1031}, rng);
    run_fixed({ft, 257, true}, rng);
    run_fixed({ft, 97, false, 1}, rng);
    run_fixed({ft, 98, true, 1}, rng);
    run_fixed({ft, 33, false, 2}, rng);
    run_fixed({ft, 34, false, 3}, rng);
  }
  for (int s = 0; s < sweep; ++s) {
    CouplingCase c{all[rng.integer(0, 3)], all[rng.integer(0, 3)], rng.integer(1, 3000), int(rng.integer(0, 2))};
    c.inplace = rng.integer(0, 1);
    c.misalign = rng.integer(0, 1) ? int(rng.integer(1, 3)) : 0;
    if (c.inplace && c.misalign == 3) c.misalign = 1;
    run_coupling(c, rng);
  }
  const GnCase gn[] = {
      {F32, 1, 1, 1, 1},                                      // one element: var 0, rstd 1/sqrt(eps)
      {F32, 2, 6, 3, 1},                                      // HW = 1
      {F16, 3, 8, 2, 7, true, false},                         // odd HW: scalar kernels, no bias
      {BF16, 2, 4, 2, 16, false, true},                       // vector kernels (HW % 8 == 0), no weight
      {F32, 2, 4, 2, 16, true, true, true, false, true},      // vector, no grad_w
      {F32, 1, 32, 32, 5, true, true, false, true, false},    // one channel a group, no grad_x / grad_b
      {F32, 2, 6, 1, 1031, true, true, true, true, true, false, 3.0, 0.5},  // block-per-row reduce, offset mean
      {F16, 1, 2, 2, 2048},                                   // vector, block reduce, several splits
      {F64, 2, 6, 3, 13},                                     // float64
      {F64, 1, 4, 2, 64, true, false},                        // float64 vector (VEC 2)
      {F32, 2, 4, 2, 16, true, true, true, true, true, true},  // misaligned: scalar kernels
      {BF16, 3, 10, 5, 24, true, true, true, true, true, true, -2.0, 3.0},
      {F32, 1, 4, 1, 4096, true, true, true, true, true, false, 1.5},  // 4 splits a group (vector)
      {F32, 2, 3, 1, 5003, false, true, true, true, true, false, -0.5},  // 15 splits a group (scalar)
  };
  for (const GnCase& c : gn) run_groupnorm(c, rng);
  {  // N == 0: the backward zero-fills grad_w and grad_b
    cuda_emu::Buffer gw(3 * 4, 4, 0), gb(3 * 4, 4, 0);
    gw.fill(0xFF);
    gb.fill(0xFF);
    pydiff::GroupNormSiluArgs a{};
    a.dtype = F32;
    a.N = 0;
    a.C = 3;
    a.HW = 5;
    a.groups = 1;
    a.eps = 1e-5;
    a.grad_weight = gw.data();
    a.grad_bias = gb.data();
    CHECK(pydiff::groupnorm_silu_backward_cuda(a, nullptr, nullptr) == 0, "groupnorm N=0 backward failed");
    for (int c = 0; c < 3; ++c)
      CHECK(gw.as<float>()[c] == 0.0f && gb.as<float>()[c] == 0.0f, "groupnorm N=0: grad_w / grad_b not zero");
  }
  {  // bad arguments
    pydiff::CouplingArgs a{};
    a.numel = 4;
    CHECK(pydiff::coupling_update_cuda(a, nullptr) != 0, "coupling: null pointers accepted");
    pydiff::CouplingFixedArgs b{};
    b.numel = 4;
    b.scale = NAN;
    CHECK(pydiff::coupling_fixed_cuda(b, nullptr) != 0, "coupling_fixed: NaN scale accepted");
  }

  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("invertible emu: %d failures, %.1f s\n", pydiff_test::failures, secs);
  return pydiff_test::failures ? 1 : 0;
}
