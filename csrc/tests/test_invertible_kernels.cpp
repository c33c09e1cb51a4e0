// C++ tests of the CPU invertible-block kernels (run by ctest; named so that setup.py's csrc/*/*_cpu.cpp
// glob does not link it, and its main(), into the extension): coupling update (every x/f dtype
// pair, in place, device coefficients), fixed-point coupling (bit-exact inverse, half-to-even
// rounding, wrap-around), GroupNorm + SiLU forward and backward against a float64 evaluation of the
// formulas in pydiff/invertible.h, on odd sizes with poisoned outputs.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <type_traits>
#include <vector>

#include "check.h"
#include "pydiff/cpu_types.h"
#include "pydiff/invertible.h"

using namespace pydiff;

namespace {

template <typename T> double tod(T v) { return double(to_float(v)); }
template <> double tod<double>(double v) { return v; }
template <typename T> T fromd(double v) { return from_float<T>(float(v)); }
template <> double fromd<double>(double v) { return v; }
template <> float fromd<float>(double v) { return float(v); }

template <typename T> FloatType ft() {
  if (std::is_same<T, float>::value) return FloatType::kF32;
  if (std::is_same<T, half_t>::value) return FloatType::kF16;
  if (std::is_same<T, bf16_t>::value) return FloatType::kBF16;
  return FloatType::kF64;
}
template <typename T> double eps_of() {
  if (std::is_same<T, float>::value) return 1.2e-7;
  if (std::is_same<T, half_t>::value) return 9.8e-4;
  if (std::is_same<T, bf16_t>::value) return 7.9e-3;
  return 2.3e-16;
}

template <typename T>
std::vector<T> randvec(std::mt19937_64& rng, int64_t n, double mean = 0.0, double sd = 1.0) {
  std::normal_distribution<double> nd(mean, sd);
  std::vector<T> v(n);
  for (auto& e : v) e = fromd<T>(nd(rng));
  return v;
}

template <typename T>
void poison(std::vector<T>& v) {
  for (auto& e : v) e = fromd<T>(std::numeric_limits<double>::quiet_NaN());
}

// ---------------------------------------------------------------- coupling
template <typename TX, typename TF>
void coupling_case(int64_t n, bool in_place, bool dev_coeffs, uint64_t seed) {
  std::mt19937_64 rng(seed);
  auto x = randvec<TX>(rng, n), f = randvec<TF>(rng, n);
  std::vector<TX> y(n);
  poison(y);
  const double a = 0.75, b = -1.25;
  double c[2] = {1.5, -0.5};
  CouplingArgs g{};
  g.x_dtype = ft<TX>();
  g.f_dtype = ft<TF>();
  g.numel = n;
  g.x = x.data();
  g.f = f.data();
  std::vector<TX> x0 = x;
  g.y = in_place ? static_cast<void*>(x.data()) : static_cast<void*>(y.data());
  g.a = a;
  g.b = b;
  if (dev_coeffs) {
    g.coeffs = c;
    g.coeffs_dtype = FloatType::kF64;
  }
  CHECK(coupling_update_cpu(g) == 0, "coupling_update_cpu rejected valid args");
  const std::vector<TX>& out = in_place ? x : y;
  const double A = a * (dev_coeffs ? c[0] : 1.0), B = b * (dev_coeffs ? c[1] : 1.0);
  const double tol = std::max(eps_of<TX>(), (std::is_same<TX, double>::value || std::is_same<TF, double>::value)
                                                ? 1e-15 : 1.2e-7);
  double worst = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double ref = A * tod(x0[i]) + B * tod(f[i]);
    const double err = std::fabs(tod(out[i]) - ref) / (std::fabs(ref) + 1.0);
    worst = std::isnan(err) ? 1e30 : std::max(worst, err);
  }
  CHECK(worst <= 2 * tol, "coupling n=%lld in_place=%d coeffs=%d: rel err %.3e > %.3e", (long long)n, in_place,
        dev_coeffs, worst, 2 * tol);
}

template <typename TX>
void coupling_all_f(int64_t n, uint64_t seed) {
  for (int ip = 0; ip < 2; ++ip)
    for (int dc = 0; dc < 2; ++dc) {
      coupling_case<TX, float>(n, ip, dc, seed);
      coupling_case<TX, half_t>(n, ip, dc, seed + 1);
      coupling_case<TX, bf16_t>(n, ip, dc, seed + 2);
      coupling_case<TX, double>(n, ip, dc, seed + 3);
    }
}

void fixed_tests() {
  // rounding: half to even, symmetric, NaN -> 0, clamp
  const float fv[] = {0.5f, 1.5f, 2.5f, -0.5f, -1.5f, -2.5f, 3.75f, std::numeric_limits<float>::quiet_NaN(), 1e30f,
                      -1e30f};
  const int64_t expect[] = {0, 2, 2, 0, -2, -2, 4, 0, int64_t(1) << 62, -(int64_t(1) << 62)};
  const int n = 10;
  std::vector<int64_t> x(n, 0), y(n, -7);
  CouplingFixedArgs g{};
  g.f_dtype = FloatType::kF32;
  g.numel = n;
  g.x = x.data();
  g.f = fv;
  g.y = y.data();
  g.scale = 1.0;
  CHECK(coupling_fixed_cpu(g) == 0, "coupling_fixed_cpu rejected valid args");
  for (int i = 0; i < n; ++i) CHECK(y[i] == expect[i], "fixed rint(%g) = %lld, expected %lld", fv[i], (long long)y[i],
                                    (long long)expect[i]);
  // bit-exact inverse on random data, with wrap-around near the int64 range
  std::mt19937_64 rng(5);
  for (int64_t len : {1, 7, 1031, 4099}) {
    auto f = randvec<float>(rng, len, 0.0, 3.0);
    std::vector<int64_t> s(len), z(len), w(len);
    for (int64_t i = 0; i < len; ++i) s[i] = int64_t(rng());
    CouplingFixedArgs a{};
    a.f_dtype = FloatType::kF32;
    a.numel = len;
    a.x = s.data();
    a.f = f.data();
    a.y = z.data();
    a.scale = std::ldexp(1.0, 40);
    CHECK(coupling_fixed_cpu(a) == 0, "fixed forward");
    a.x = z.data();
    a.y = w.data();
    a.scale = -a.scale;
    CHECK(coupling_fixed_cpu(a) == 0, "fixed inverse");
    bool same = true;
    for (int64_t i = 0; i < len; ++i) same = same && (w[i] == s[i]);
    CHECK(same, "fixed-point inverse is not bit-exact (len %lld)", (long long)len);
    // in place
    std::vector<int64_t> t = s;
    a.x = t.data();
    a.y = t.data();
    a.scale = std::ldexp(1.0, 40);
    coupling_fixed_cpu(a);
    bool eq = true;
    for (int64_t i = 0; i < len; ++i) eq = eq && (t[i] == z[i]);
    CHECK(eq, "in-place fixed update differs from out-of-place (len %lld)", (long long)len);
  }
}

// ---------------------------------------------------------------- GroupNorm + SiLU
template <typename T>
void gn_case(int64_t N, int64_t C, int64_t HW, int64_t G, bool affine, uint64_t seed) {
  using P = typename std::conditional<std::is_same<T, double>::value, double, float>::type;
  std::mt19937_64 rng(seed);
  const int64_t n = N * C * HW, Cg = C / G, M = Cg * HW;
  auto x = randvec<T>(rng, n, 1.5, 2.0), dy = randvec<T>(rng, n);
  auto w = randvec<P>(rng, C, 1.0, 0.5), b = randvec<P>(rng, C, 0.0, 0.5);
  std::vector<T> y(n), dx(n);
  std::vector<P> mean(N * G), rstd(N * G), gw(C), gb(C);
  poison(y);
  poison(dx);
  poison(gw);
  poison(gb);
  const double eps = 1e-5;
  GroupNormSiluArgs g{};
  g.dtype = ft<T>();
  g.N = N;
  g.C = C;
  g.HW = HW;
  g.groups = G;
  g.eps = eps;
  g.x = x.data();
  g.weight = affine ? w.data() : nullptr;
  g.bias = affine ? b.data() : nullptr;
  g.y = y.data();
  g.mean = mean.data();
  g.rstd = rstd.data();
  CHECK(groupnorm_silu_cpu(g) == 0, "groupnorm_silu_cpu rejected valid args");
  g.grad_y = dy.data();
  g.grad_x = dx.data();
  g.grad_weight = affine ? gw.data() : nullptr;
  g.grad_bias = affine ? gb.data() : nullptr;
  CHECK(groupnorm_silu_backward_cpu(g) == 0, "groupnorm_silu_backward_cpu rejected valid args");
  // float64 reference
  const double tol = std::is_same<T, double>::value ? 1e-12 : 4 * std::max(eps_of<T>(), 1.2e-7);
  double ey = 0, edx = 0, es = 0, ep = 0;
  std::vector<double> refgw(C, 0.0), refgb(C, 0.0);
  for (int64_t gi = 0; gi < N * G; ++gi) {
    const int64_t nn = gi / G, gg = gi % G;
    double s = 0, s2 = 0;
    for (int64_t e = 0; e < M; ++e) s += tod(x[gi * M + e]);
    const double mu = s / double(M);
    for (int64_t e = 0; e < M; ++e) s2 += (tod(x[gi * M + e]) - mu) * (tod(x[gi * M + e]) - mu);
    const double r = 1.0 / std::sqrt(s2 / double(M) + eps);
    es = std::max(es, std::fabs(double(mean[gi]) - mu) / (std::fabs(mu) + 1.0));
    es = std::max(es, std::fabs(double(rstd[gi]) - r) / r);
    double m1 = 0, m2 = 0;
    std::vector<double> dz(M), xh(M);
    for (int64_t e = 0; e < M; ++e) {
      const int64_t c = gg * Cg + e / HW;
      const double wc = affine ? double(w[c]) : 1.0, bc = affine ? double(b[c]) : 0.0;
      xh[e] = (tod(x[gi * M + e]) - mu) * r;
      const double z = xh[e] * wc + bc, sg = 1.0 / (1.0 + std::exp(-z));
      const double yr = z * sg;
      const double err = std::fabs(tod(y[gi * M + e]) - yr) / (std::fabs(yr) + 1.0);
      ey = std::isnan(err) ? 1e30 : std::max(ey, err);
      dz[e] = tod(dy[gi * M + e]) * sg * (1 + z * (1 - sg));
      m1 += wc * dz[e];
      m2 += wc * dz[e] * xh[e];
      refgw[c] += dz[e] * xh[e];
      refgb[c] += dz[e];
    }
    m1 /= double(M);
    m2 /= double(M);
    for (int64_t e = 0; e < M; ++e) {
      const int64_t c = gg * Cg + e / HW;
      const double wc = affine ? double(w[c]) : 1.0;
      const double ref = r * (wc * dz[e] - m1 - xh[e] * m2);
      const double err = std::fabs(tod(dx[gi * M + e]) - ref) / (std::fabs(ref) + 1.0);
      edx = std::isnan(err) ? 1e30 : std::max(edx, err);
    }
    (void)nn;
  }
  if (affine) {
    for (int64_t c = 0; c < C; ++c) {
      const double scale = double(N * HW);
      const double e1 = std::fabs(double(gw[c]) - refgw[c]) / (std::fabs(refgw[c]) + std::sqrt(scale));
      const double e2 = std::fabs(double(gb[c]) - refgb[c]) / (std::fabs(refgb[c]) + std::sqrt(scale));
      ep = std::max(ep, std::isnan(e1 + e2) ? 1e30 : std::max(e1, e2));
    }
  }
  const double stat_tol = std::is_same<T, double>::value ? 1e-13 : 1e-6;
  CHECK(es <= stat_tol, "gn stats N=%lld C=%lld HW=%lld G=%lld: err %.3e", (long long)N, (long long)C, (long long)HW,
        (long long)G, es);
  CHECK(ey <= tol, "gn forward N=%lld C=%lld HW=%lld G=%lld affine=%d: err %.3e > %.3e", (long long)N, (long long)C,
        (long long)HW, (long long)G, affine, ey, tol);
  CHECK(edx <= 2 * tol, "gn backward dx N=%lld C=%lld HW=%lld G=%lld affine=%d: err %.3e > %.3e", (long long)N,
        (long long)C, (long long)HW, (long long)G, affine, edx, 2 * tol);
  CHECK(ep <= 2 * tol, "gn backward params N=%lld C=%lld HW=%lld G=%lld: err %.3e > %.3e", (long long)N, (long long)C,
        (long long)HW, (long long)G, ep, 2 * tol);
}

template <typename T>
void gn_all(uint64_t seed) {
  gn_case<T>(1, 1, 1, 1, true, seed);
  gn_case<T>(2, 6, 7, 3, true, seed + 1);
  gn_case<T>(3, 4, 1031, 2, false, seed + 2);
  gn_case<T>(1, 8, 2053, 1, true, seed + 3);  // a group larger than one task (8192 elements)
  gn_case<T>(2, 32, 13, 8, true, seed + 4);
}

void bad_args() {
  GroupNormSiluArgs g{};
  g.N = 1; g.C = 6; g.HW = 4; g.groups = 4; g.eps = 1e-5;
  float buf[64];
  g.x = buf; g.y = buf; g.mean = buf; g.rstd = buf;
  CHECK(groupnorm_silu_cpu(g) != 0, "groups that do not divide C must be rejected");
  CouplingArgs c{};
  c.numel = 4;
  CHECK(coupling_update_cpu(c) != 0, "null pointers must be rejected");
  CouplingFixedArgs f{};
  f.numel = 1; f.y = reinterpret_cast<int64_t*>(buf); f.x = f.y; f.f = buf; f.scale = INFINITY;
  CHECK(coupling_fixed_cpu(f) != 0, "a non-finite scale must be rejected");
}

}  // namespace

int main() {
  for (int64_t n : {1, 7, 1023, 1025, 4099}) {
    coupling_all_f<float>(n, 11 + n);
    coupling_all_f<half_t>(n, 12 + n);
    coupling_all_f<bf16_t>(n, 13 + n);
    coupling_all_f<double>(n, 14 + n);
  }
  fixed_tests();
  gn_all<float>(100);
  gn_all<half_t>(200);
  gn_all<bf16_t>(300);
  gn_all<double>(400);
  bad_args();
  if (pydiff_test::failures) {
    std::printf("%d failure(s)\n", pydiff_test::failures);
    return 1;
  }
  std::printf("all invertible CPU kernel tests passed\n");
  return 0;
}
