// C++ tests of the CPU solver-step kernel (run by ctest): random inputs of odd sizes, poisoned
// outputs, every dtype, compared with a float64 evaluation of the same formula.
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "check.h"
#include "pydiff/cpu_types.h"
#include "pydiff/solver.h"

using namespace pydiff;

namespace {

template <typename T>
struct Buf {
  std::vector<T> v;
  std::vector<double> d;  // the value after rounding to T, in double
};

template <typename T>
Buf<T> randbuf(std::mt19937_64& rng, int64_t n) {
  std::normal_distribution<double> nd;
  Buf<T> b;
  b.v.resize(n);
  b.d.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    b.v[i] = from_float<T>(float(nd(rng)));
    b.d[i] = to_float(b.v[i]);
  }
  return b;
}

template <typename T>
void run_case(int64_t batch, int64_t inner, int k, bool cond, bool uncond, bool noise, bool rs, bool clip,
              bool table, double rtol, uint64_t seed) {
  std::mt19937_64 rng(seed);
  const int64_t n = batch * inner;
  auto x = randbuf<T>(rng, n), c = randbuf<T>(rng, n), u = randbuf<T>(rng, n), z = randbuf<T>(rng, n);
  std::vector<Buf<T>> h;
  for (int j = 0; j < k; ++j) h.push_back(randbuf<T>(rng, n));
  std::uniform_real_distribution<double> ud(-1.5, 1.5);
  const int nc = num_step_coeffs(k);
  std::vector<double> co(nc);
  for (auto& v : co) v = ud(rng);
  std::vector<float> r(batch);
  for (auto& v : r) v = float(0.5 + 0.5 * (ud(rng) + 1.5) / 3.0);
  SolverStepArgs a{};
  a.dtype = std::is_same<T, float>::value ? DType::kF32 : (std::is_same<T, half_t>::value ? DType::kF16 : DType::kBF16);
  a.numel = n;
  a.inner = inner;
  a.x = x.v.data();
  a.model_cond = cond ? c.v.data() : nullptr;
  a.model_uncond = (cond && uncond) ? u.v.data() : nullptr;
  a.noise = noise ? z.v.data() : nullptr;
  a.row_scale = rs ? r.data() : nullptr;
  a.num_history = k;
  for (int j = 0; j < k; ++j) a.history[j] = h[j].v.data();
  std::vector<int64_t> step = {1};
  std::vector<double> tab(3 * nc, 99.0);
  if (table) {
    for (int i = 0; i < nc; ++i) tab[nc + i] = co[i];
    a.coeff_table = tab.data();
    a.step = step.data();
    a.table_rows = 3;
  } else {
    for (int i = 0; i < nc; ++i) a.coeffs[i] = co[i];
  }
  a.clip_lo = clip ? -0.75f : -std::numeric_limits<float>::infinity();
  a.clip_hi = clip ? 0.5f : std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<T> ox(n, from_float<T>(nan)), oh(n, from_float<T>(nan));  // poisoned outputs
  a.out_x = ox.data();
  a.out_h = oh.data();
  CHECK(solver_step_cpu(a) == 0, "kernel rejected valid args");
  // float64 reference
  double maxabs = 1.0;
  std::vector<double> rx(n), rh(n);
  const double* r0 = co.data() + kHeadCoeffs;
  const double* r1 = r0 + kRowTerms + k;
  for (int64_t i = 0; i < n; ++i) {
    double m = cond ? (uncond ? u.d[i] + co[0] * (c.d[i] - u.d[i]) : c.d[i]) : 0.0;
    if (cond && rs) m *= r[i / inner];
    double d = co[1] * x.d[i] + co[2] * m;
    if (clip) d = d < -0.75 ? -0.75 : (d > 0.5 ? 0.5 : d);
    const double e = co[3] * x.d[i] + co[4] * m + co[5] * d;
    double o0 = r0[0] * x.d[i] + r0[1] * m + r0[2] * d + r0[3] * e + (noise ? r0[4] * z.d[i] : 0.0);
    double o1 = r1[0] * x.d[i] + r1[1] * m + r1[2] * d + r1[3] * e + (noise ? r1[4] * z.d[i] : 0.0);
    for (int j = 0; j < k; ++j) {
      o0 += r0[kRowTerms + j] * h[j].d[i];
      o1 += r1[kRowTerms + j] * h[j].d[i];
    }
    rx[i] = o0;
    rh[i] = o1;
    maxabs = std::fmax(maxabs, std::fmax(std::fabs(o0), std::fabs(o1)));
  }
  for (int64_t i = 0; i < n; ++i) {
    const double ex = std::fabs(to_float(ox[i]) - rx[i]), eh = std::fabs(to_float(oh[i]) - rh[i]);
    const double bx = rtol * std::fabs(rx[i]) + rtol * 0.25 * maxabs, bh = rtol * std::fabs(rh[i]) + rtol * 0.25 * maxabs;
    if (!(ex <= bx) || !(eh <= bh)) {
      CHECK(false, "batch=%lld inner=%lld k=%d dtype=%d elem %lld: got (%g, %g) want (%g, %g)", (long long)batch,
            (long long)inner, k, int(a.dtype), (long long)i, double(to_float(ox[i])), double(to_float(oh[i])), rx[i],
            rh[i]);
      return;
    }
  }
}

void test_conversions() {
  // every fp16 / bf16 bit pattern survives a round trip through float (nan stays nan)
  for (uint32_t b = 0; b < 65536; ++b) {
    const half_t hv{uint16_t(b)};
    const float f = to_float(hv);
    if (std::isnan(f)) continue;
    CHECK(from_float<half_t>(f).bits == hv.bits, "half round trip %u", b);
    const bf16_t bv{uint16_t(b)};
    const float g = to_float(bv);
    if (std::isnan(g)) continue;
    CHECK(from_float<bf16_t>(g).bits == bv.bits, "bf16 round trip %u", b);
  }
  CHECK(to_float(from_float<half_t>(1.0f + 1.0f / 4096)) == 1.0f, "half ties to even");
  CHECK(std::isinf(to_float(from_float<half_t>(70000.f))), "half overflow to inf");
  CHECK(to_float(from_float<bf16_t>(1.0f + 1.0f / 256)) == 1.0f, "bf16 ties to even");
}

void test_bad_args() {
  SolverStepArgs a{};
  a.numel = 10;
  a.inner = 3;  // 10 is not a multiple of 3
  float buf[10];
  a.x = a.out_x = a.out_h = buf;
  CHECK(solver_step_cpu(a) != 0, "numel %% inner != 0 must be rejected");
  a.inner = 5;
  a.num_history = 7;
  CHECK(solver_step_cpu(a) != 0, "too many history entries must be rejected");
  a.num_history = 1;
  a.history[0] = nullptr;
  CHECK(solver_step_cpu(a) != 0, "null history must be rejected");
}
}  // namespace

int main() {
  test_conversions();
  test_bad_args();
  const int64_t sizes[][2] = {{1, 1}, {1, 7}, {3, 13}, {2, 511}, {2, 513}, {1, 1031}, {5, 2053}};
  uint64_t seed = 1;
  for (auto& s : sizes)
    for (int k = 0; k <= kMaxHistory; k += 3)
      for (int flags = 0; flags < 8; ++flags) {
        const bool uncond = flags & 1, noise = flags & 2, rs = flags & 4, clip = (flags & 3) == 3, table = (flags & 5) == 5;
        run_case<float>(s[0], s[1], k, true, uncond, noise, rs, clip, table, 2e-6, seed++);
        run_case<half_t>(s[0], s[1], k, true, uncond, noise, rs, clip, table, 2e-3, seed++);
        run_case<bf16_t>(s[0], s[1], k, true, uncond, noise, rs, clip, table, 1.6e-2, seed++);
      }
  run_case<float>(2, 100, 2, false, false, true, false, false, false, 2e-6, 999);
  if (pydiff_test::failures == 0) std::printf("test_solver_cpu: all checks passed\n");
  return pydiff_test::failures == 0 ? 0 : 1;
}
