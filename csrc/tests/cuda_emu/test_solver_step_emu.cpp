// The CUDA fused solver step and guidance-rescale kernels (csrc/solver/solver_step_cuda.cu) run on
// the CPU emulator (emu.h) through their host entry points pydiff::solver_step_cuda and
// pydiff::cfg_rescale_cuda, against a float64 host computation of csrc/include/pydiff/solver.h:
//
//   m = (u + g (c - u)) r[b] (m = c r[b] without u; 0 without c); d = clamp(px x + pm m, lo, hi)
//   (no clamp when lo >= hi); e = ex x + em m + ed d;
//   out_j = a_j.x x + a_j.m m + a_j.d d + a_j.e e + a_j.z z + sum_k a_j.h[k] h_k   (j = 0, 1)
//   x0_stats[0][i] += d_i, x0_stats[1][i] += d_i^2 (float64, in place: with the kernel's fp32 d
//   recovered from the new S1, both sums must be the exact float64 sums)
//   r[b] = phi std(c_b) / std(u_b + g (c_b - u_b)) + (1 - phi)   (unbiased std)
//
// The kernel computes in fp32 with fp32-rounded coefficients: outputs must agree within
// 64 * 2^-24 * (sum of the magnitudes of the terms) plus one unit of the output dtype (fp16 / bf16
// rounding of a value that is not the reference's). Cases: sizes 1, primes, non-multiples of the
// vector width and of the 256-thread block, misaligned pointers (the scalar kernel), fp32 / fp16 /
// bf16, 0..6 history entries, noise / row_scale / clip / CFG / out_h on and off, the device
// coefficient table with the step counter (clamped below 0 and past the last row), x0_stats on and
// off, a grid capped below the work (grid-stride loop); then a seeded random sweep. Outputs are
// poisoned (NaN) before the call; every buffer sits against guard pages with canaries.
#include "emu.h"

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wsign-compare"  // threadIdx.x < int: nvcc does not warn
#include "../../solver/solver_step_cuda.cu"
#pragma GCC diagnostic pop
#include "host_ref.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace {

using namespace emu_test;
using pydiff::DType;
using pydiff::kHeadCoeffs;
using pydiff::kMaxHistory;
using pydiff::kRowTerms;

FloatType ft(DType d) { return FloatType(int(d)); }
const char* dname(DType d) { return type_name(ft(d)); }

struct Case {
  const char* what = "";
  DType dt = DType::kF32;
  int64_t numel = 1, batch = 1;
  int hist = 0;
  bool cond = true, uncond = true, noise = true, row_scale = true, clip = true, out_h = true;
  bool table = false, stats = false;
  int64_t step = 0, table_rows = 1;
  int misalign = 0;  // 1: x misaligned, 2: out_x misaligned, 3: a history entry misaligned, 4: out_h
  int sms = 132;     // multiprocessor count the emulated device reports (caps the grid)
  int threads = 0, blocks_per_sm = 0;  // launch shape (solver_step_cuda_set_launch; 0: the defaults)
};

// A typed device buffer of n elements filled with N(0, 1) values (as stored) and their values.
struct Tensor {
  cuda_emu::Buffer buf;  // 16-byte aligned, or (misaligned) one element past a 16-byte boundary
  std::vector<double> v;
  Tensor() = default;
  Tensor(FloatType t, int64_t n, bool misaligned, Rng* rng)
      : buf(size_t(n) * type_size(t), 16, misaligned ? type_size(t) : 0), v(size_t(n)) {
    buf.fill(0xFF);  // poison: NaN
    if (rng)
      for (int64_t i = 0; i < n; ++i) v[size_t(i)] = store(t, buf.data(), i, rng->normal());
  }
  void* p(FloatType) const { return buf.data(); }
};

double out_unit(DType d) { return d == DType::kBF16 ? 0x1p-7 : d == DType::kF16 ? 0x1p-10 : 0.0; }
double out_abs(DType d) { return d == DType::kF16 ? 0x1p-24 : 0.0; }

void run_case(const Case& C, Rng& rng) {
  const FloatType t = ft(C.dt);
  const int64_t n = C.numel;
  const int64_t inner = n / C.batch;
  const int k = C.hist;
  const int nc = pydiff::num_step_coeffs(k);
  std::string tag = std::string(C.what) + " [" + dname(C.dt) + " numel=" + std::to_string(n) +
                    " hist=" + std::to_string(k) + "]";
  cuda_emu::device(0).sms = C.sms;
  CHECK(pydiff::solver_step_cuda_set_launch(C.threads, C.blocks_per_sm) == 0, "%s: launch shape refused", tag.c_str());

  Tensor x(t, n, C.misalign == 1, &rng);
  Tensor mc, mu, z;
  if (C.cond) mc = Tensor(t, n, false, &rng);
  if (C.cond && C.uncond) mu = Tensor(t, n, false, &rng);
  if (C.noise) z = Tensor(t, n, false, &rng);
  std::vector<Tensor> h;
  for (int q = 0; q < k; ++q) h.emplace_back(t, n, C.misalign == 3 && q == k - 1, &rng);
  cuda_emu::Buffer rs;
  std::vector<double> r(size_t(C.batch), 1.0);
  if (C.row_scale) {
    rs = cuda_emu::Buffer(size_t(C.batch) * 4, 4, 0);
    for (int64_t b = 0; b < C.batch; ++b) r[size_t(b)] = store(FloatType::kF32, rs.data(), b, rng.uniform(0.5, 1.5));
  }
  Tensor ox(t, n, C.misalign == 2, nullptr), oh;
  if (C.out_h) oh = Tensor(t, n, C.misalign == 4, nullptr);

  // coefficients: host values, or a table of rows with the selected one clamp(step)
  std::vector<double> coef(static_cast<size_t>(nc));
  for (auto& c : coef) c = rng.uniform(-1.5, 1.5);
  cuda_emu::Buffer tab, stepb;
  if (C.table) {
    tab = cuda_emu::Buffer(size_t(C.table_rows * nc) * 8, 8, 0);
    const int64_t row = C.step < 0 ? 0 : (C.step >= C.table_rows ? C.table_rows - 1 : C.step);
    for (int64_t rr = 0; rr < C.table_rows; ++rr)
      for (int q = 0; q < nc; ++q)
        tab.as<double>()[rr * nc + q] = rr == row ? coef[size_t(q)] : rng.uniform(-9.0, 9.0);
    stepb = cuda_emu::Buffer(8, 8, 0);
    *stepb.as<int64_t>() = C.step;
  }
  const float lo = C.clip ? -0.8f : 1.0f, hi = C.clip ? 0.9f : 1.0f;
  cuda_emu::Buffer st;
  std::vector<double> st0;
  if (C.stats) {
    st = cuda_emu::Buffer(size_t(2 * n) * 8, 8, 0);
    st0.resize(size_t(2 * n));
    for (int64_t i = 0; i < 2 * n; ++i) st0[size_t(i)] = st.as<double>()[i] = rng.uniform(0.0, 3.0);
  }

  pydiff::SolverStepArgs a{};
  a.dtype = C.dt;
  a.numel = n;
  a.inner = inner;
  a.x = x.p(t);
  a.model_cond = C.cond ? mc.p(t) : nullptr;
  a.model_uncond = C.cond && C.uncond ? mu.p(t) : nullptr;
  for (int q = 0; q < k; ++q) a.history[q] = h[size_t(q)].p(t);
  a.num_history = k;
  a.noise = C.noise ? z.p(t) : nullptr;
  a.row_scale = C.row_scale ? rs.as<float>() : nullptr;
  a.out_x = ox.p(t);
  a.out_h = C.out_h ? oh.p(t) : nullptr;
  if (C.table) {
    for (auto& c : a.coeffs) c = NAN;  // must not be used
    a.coeff_table = tab.as<double>();
    a.step = stepb.as<int64_t>();
    a.table_rows = C.table_rows;
  } else {
    for (int q = 0; q < nc; ++q) a.coeffs[q] = coef[size_t(q)];
  }
  a.clip_lo = lo;
  a.clip_hi = hi;
  a.x0_stats = C.stats ? st.as<double>() : nullptr;

  const size_t nlaunch = cuda_emu::launches().size();
  const int rc = pydiff::solver_step_cuda(a, nullptr);
  CHECK(rc == 0, "%s: solver_step_cuda returned %d", tag.c_str(), rc);
  CHECK(cuda_emu::launches().size() == nlaunch + 1, "%s: expected one launch", tag.c_str());
  if (cuda_emu::launches().size() == nlaunch + 1) {
    // the instantiation for this dtype, history length and coefficient source, vector or scalar
    const void* ran = cuda_emu::launches().back().func;
    const bool vec_kernel = ran == reinterpret_cast<const void*>(pydiff::solver_step_kernel_for(a, true));
    const bool scalar_kernel = ran == reinterpret_cast<const void*>(pydiff::solver_step_kernel_for(a, false));
    CHECK(vec_kernel || scalar_kernel, "%s: an unexpected kernel ran", tag.c_str());
    CHECK(vec_kernel == (C.misalign == 0), "%s: the %s kernel ran", tag.c_str(), vec_kernel ? "vector" : "scalar");
  }

  const double* g = coef.data();
  const double* r0 = g + kHeadCoeffs;
  const double* r1 = r0 + kRowTerms + k;
  int bad = 0;
  for (int64_t i = 0; i < n && bad < 5; ++i) {
    const double X = x.v[size_t(i)];
    double M = 0, Mm = 0;
    if (C.cond) {
      const double cv = mc.v[size_t(i)];
      if (C.uncond) {
        const double uv = mu.v[size_t(i)];
        M = uv + g[0] * (cv - uv);
        Mm = std::fabs(uv) + std::fabs(g[0]) * (std::fabs(cv) + std::fabs(uv));
      } else {
        M = cv;
        Mm = std::fabs(cv);
      }
      M *= r[size_t(i / inner)];
      Mm *= r[size_t(i / inner)];
    }
    double D = g[1] * X + g[2] * M;
    double Dm = std::fabs(g[1] * X) + std::fabs(g[2]) * Mm;
    if (lo < hi) D = D < lo ? lo : (D > hi ? hi : D);
    const double E = g[3] * X + g[4] * M + g[5] * D;
    const double Em = std::fabs(g[3] * X) + std::fabs(g[4]) * Mm + std::fabs(g[5]) * Dm;
    const double* rows[2] = {r0, r1};
    double ref[2], mag[2];
    for (int j = 0; j < 2; ++j) {
      const double* w = rows[j];
      ref[j] = w[0] * X + w[1] * M + w[2] * D + w[3] * E;
      mag[j] = std::fabs(w[0] * X) + std::fabs(w[1]) * Mm + std::fabs(w[2]) * Dm + std::fabs(w[3]) * Em;
      if (C.noise) {
        ref[j] += w[4] * z.v[size_t(i)];
        mag[j] += std::fabs(w[4] * z.v[size_t(i)]);
      }
      for (int q = 0; q < k; ++q) {
        ref[j] += w[kRowTerms + q] * h[size_t(q)].v[size_t(i)];
        mag[j] += std::fabs(w[kRowTerms + q] * h[size_t(q)].v[size_t(i)]);
      }
    }
    for (int j = 0; j < (C.out_h ? 2 : 1); ++j) {
      const double got = load(t, j == 0 ? ox.p(t) : oh.p(t), i);
      const double tol = 64 * 0x1p-24 * mag[j] + out_unit(C.dt) * (std::fabs(ref[j]) + 64 * 0x1p-24 * mag[j]) +
                         out_abs(C.dt);
      if (!(std::fabs(got - ref[j]) <= tol)) {
        CHECK(false, "%s: out_%s[%lld] = %.9g, expected %.9g (tol %.3g)", tag.c_str(), j ? "h" : "x", (long long)i,
              got, ref[j], tol);
        ++bad;
      }
    }
    if (C.stats) {
      const double td = 64 * 0x1p-24 * Dm;
      const double s1 = st.as<double>()[i], s2 = st.as<double>()[n + i];
      const double e1 = st0[size_t(i)] + D, e2 = st0[size_t(n + i)] + D * D;
      // the kernel's d is an fp32 value: recovered from S1, the float64 sums must hold it exactly
      const double dk = double(float(s1 - st0[size_t(i)]));
      const bool exact = s1 == st0[size_t(i)] + dk && s2 == st0[size_t(n + i)] + dk * dk;
      const bool close = std::fabs(s1 - e1) <= td + 0x1p-50 &&
                         std::fabs(s2 - e2) <= 2 * std::fabs(D) * td + td * td + 0x1p-50;
      if (!exact || !close) {
        CHECK(false, "%s: x0_stats[%lld] = (%.12g, %.12g), expected (%.12g, %.12g)", tag.c_str(), (long long)i, s1, s2,
              e1, e2);
        ++bad;
      }
    }
  }
  CHECK(x.buf.intact() && ox.buf.intact() && (!C.out_h || oh.buf.intact()) && (!C.stats || st.intact()),
        "%s: a canary next to a buffer was overwritten", tag.c_str());
  cuda_emu::device(0).sms = 132;
  pydiff::solver_step_cuda_set_launch(0, 0);
}

void run_rescale(DType dt, int64_t batch, int64_t inner, Rng& rng) {
  const FloatType t = ft(dt);
  const std::string tag = std::string("cfg_rescale [") + dname(dt) + " batch=" + std::to_string(batch) +
                          " inner=" + std::to_string(inner) + "]";
  Tensor c(t, batch * inner, false, &rng), u(t, batch * inner, false, &rng);
  // give the samples different spreads so that r differs per sample
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t i = 0; i < inner; ++i) {
      const int64_t e = b * inner + i;
      c.v[size_t(e)] = store(t, c.p(t), e, c.v[size_t(e)] * (1.0 + b) + 0.25 * b);
    }
  const double guid = 4.5, phi = 0.7;
  cuda_emu::Buffer ws(size_t(pydiff::cfg_rescale_cuda_workspace(batch)), 16, 0), out(size_t(batch) * 4, 4, 0);
  ws.fill(0xFF);
  out.fill(0xFF);
  const int rc = pydiff::cfg_rescale_cuda(dt, batch, inner, c.p(t), u.p(t), guid, phi, out.as<float>(), ws.data(),
                                          nullptr);
  CHECK(rc == 0, "%s: returned %d", tag.c_str(), rc);
  for (int64_t b = 0; b < batch; ++b) {
    double mc = 0, mf = 0;
    for (int64_t i = 0; i < inner; ++i) {
      const double cv = c.v[size_t(b * inner + i)], uv = u.v[size_t(b * inner + i)];
      mc += cv;
      mf += uv + guid * (cv - uv);
    }
    mc /= double(inner);
    mf /= double(inner);
    double vc = 0, vf = 0;
    for (int64_t i = 0; i < inner; ++i) {
      const double cv = c.v[size_t(b * inner + i)], uv = u.v[size_t(b * inner + i)];
      const double fv = uv + guid * (cv - uv);
      vc += (cv - mc) * (cv - mc);
      vf += (fv - mf) * (fv - mf);
    }
    const double ref = phi * std::sqrt(vc / double(inner - 1)) / std::sqrt(vf / double(inner - 1)) + (1 - phi);
    const double got = out.as<float>()[b];
    CHECK(std::fabs(got - ref) <= 1e-6 * std::fabs(ref) + 1e-7, "%s: r[%lld] = %.9g, expected %.9g", tag.c_str(),
          (long long)b, got, ref);
  }
  CHECK(ws.intact() && out.intact(), "%s: a canary was overwritten", tag.c_str());
}

}  // namespace

int main(int argc, char** argv) {
  const int sweep = argc > 1 ? std::atoi(argv[1]) : 400;
  const auto t0 = std::chrono::steady_clock::now();
  Rng rng(20261126);
  const DType F32 = DType::kF32, F16 = DType::kF16, BF16 = DType::kBF16;
  const Case cases[] = {
      {.what = "one element", .dt = F32, .numel = 1, .hist = 2, .stats = true},
      {.what = "one element, bf16", .dt = BF16, .numel = 1, .hist = 0},
      {.what = "prime", .dt = F16, .numel = 13, .batch = 1, .hist = 3, .stats = true},
      {.what = "tail", .dt = F32, .numel = 4099, .batch = 1, .hist = 6, .stats = true},
      {.what = "rows, tail", .dt = BF16, .numel = 3 * 347, .batch = 3, .hist = 1},
      {.what = "rows, vector width", .dt = F16, .numel = 5 * 64, .batch = 5, .hist = 4, .stats = true},
      {.what = "nothing optional", .dt = F32, .numel = 1031, .hist = 0, .cond = false, .noise = false,
       .row_scale = false, .clip = false, .out_h = false},
      {.what = "cond only", .dt = BF16, .numel = 2053, .batch = 1, .hist = 2, .uncond = false, .clip = false},
      {.what = "x misaligned (scalar kernel)", .dt = F32, .numel = 1027, .batch = 1, .hist = 2, .misalign = 1},
      {.what = "out_x misaligned", .dt = F16, .numel = 515, .batch = 5, .hist = 1, .stats = true, .misalign = 2},
      {.what = "history misaligned", .dt = BF16, .numel = 263, .batch = 1, .hist = 5, .misalign = 3},
      {.what = "out_h misaligned", .dt = F32, .numel = 97, .batch = 1, .hist = 6, .misalign = 4},
      {.what = "table, step in range", .dt = F32, .numel = 1031, .hist = 3, .table = true, .stats = true, .step = 4,
       .table_rows = 7},
      {.what = "table, step < 0", .dt = F16, .numel = 77, .hist = 0, .table = true, .step = -3, .table_rows = 5},
      {.what = "table, step past end", .dt = BF16, .numel = 301, .hist = 6, .table = true, .step = 99,
       .table_rows = 4},
      {.what = "grid capped (grid-stride loop)", .dt = F32, .numel = 4 * 256 * 8 * 2 + 5, .batch = 1, .hist = 2,
       .stats = true, .sms = 1},
      {.what = "grid capped, scalar", .dt = F16, .numel = 256 * 8 * 3 + 1, .batch = 1, .hist = 1, .misalign = 1,
       .sms = 1},
      {.what = "grid capped, table (loads before the barrier)", .dt = BF16, .numel = 256 * 8 * 2 * 2 + 3, .hist = 1,
       .table = true, .step = 1, .table_rows = 3, .sms = 1},
      {.what = "launch 128 threads, 1 block per SM (grid-stride)", .dt = F32, .numel = 4 * 128 * 3 * 5 + 7,
       .batch = 1, .hist = 3, .stats = true, .sms = 3, .threads = 128, .blocks_per_sm = 1},
      {.what = "launch 64 threads, 2 blocks per SM, table", .dt = BF16, .numel = 8 * 64 * 2 * 2 * 3 + 1, .hist = 2,
       .table = true, .step = 2, .table_rows = 4, .sms = 2, .threads = 64, .blocks_per_sm = 2},
      {.what = "launch 128 threads, scalar", .dt = F16, .numel = 128 * 4 * 3 + 2, .batch = 1, .hist = 1,
       .misalign = 1, .sms = 2, .threads = 128, .blocks_per_sm = 2},
      {.what = "rows narrower than a vector (row_scale)", .dt = F16, .numel = 50 * 3, .batch = 50, .hist = 1},
      {.what = "rows narrower than a vector, fp32", .dt = F32, .numel = 41 * 2, .batch = 41, .hist = 2},
  };
  for (const Case& c : cases) run_case(c, rng);
  for (int s = 0; s < sweep; ++s) {
    Case c;
    c.what = "sweep";
    c.dt = DType(rng.integer(0, 2));
    c.batch = rng.integer(1, 4);
    c.numel = c.batch * rng.integer(1, 700);
    c.hist = int(rng.integer(0, kMaxHistory));
    c.cond = rng.integer(0, 4) != 0;
    c.uncond = rng.integer(0, 1);
    c.noise = rng.integer(0, 1);
    c.row_scale = rng.integer(0, 1);
    c.clip = rng.integer(0, 1);
    c.out_h = rng.integer(0, 3) != 0;
    c.table = rng.integer(0, 1);
    c.stats = rng.integer(0, 1);
    c.table_rows = rng.integer(1, 9);
    c.step = rng.integer(-2, c.table_rows + 2);
    c.misalign = rng.integer(0, 2) == 0 ? int(rng.integer(1, 4)) : 0;
    if (c.misalign == 3 && c.hist == 0) c.misalign = 1;
    if (c.misalign == 4 && !c.out_h) c.misalign = 2;
    run_case(c, rng);
  }
  // bad arguments
  {
    pydiff::SolverStepArgs a{};
    a.numel = 4;
    a.inner = 4;
    a.num_history = kMaxHistory + 1;
    CHECK(pydiff::solver_step_cuda(a, nullptr) != 0, "num_history > kMaxHistory accepted");
    a.num_history = 0;
    a.inner = 0;
    CHECK(pydiff::solver_step_cuda(a, nullptr) != 0, "inner == 0 accepted");
    CHECK(pydiff::solver_step_cuda_set_launch(512, 0) != 0, "512 threads accepted (launch bounds 256)");
    CHECK(pydiff::solver_step_cuda_set_launch(96, 0) != 0, "96 threads accepted");
    CHECK(pydiff::solver_step_cuda_set_launch(0, -1) != 0, "negative blocks per SM accepted");
  }
  run_rescale(DType::kF32, 1, 2, rng);
  run_rescale(DType::kF32, 3, 1031, rng);
  run_rescale(DType::kF16, 2, 257 * 64 + 3, rng);
  run_rescale(DType::kBF16, 5, 97, rng);
  CHECK(pydiff::cfg_rescale_cuda(DType::kF32, 2, 1, nullptr, nullptr, 1, 1, nullptr, nullptr, nullptr) != 0,
        "cfg_rescale inner == 1 accepted");

  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("solver_step emu: %zu cases + %d sweep, %d failures, %.1f s\n", std::size(cases), sweep,
              pydiff_test::failures, secs);
  return pydiff_test::failures ? 1 : 0;
}
