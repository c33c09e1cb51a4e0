// The CUDA activation quantization kernel (csrc/quant/quantize_cuda.cu) run on the CPU emulator
// (emu.h) through its host entry point pydiff::quantize_cuda, against a host implementation of
// pydiff/reference/quant.py's quantize_ref with the same fp32 rounding steps:
//
//   y = prologue(x) (none | gelu_tanh | layernorm (float64 statistics) * (1 + scale[b]) + shift[b]);
//   y = y / smooth; lora_act = y @ lora_down; per row and group: amax = max |y| (NaN if any NaN),
//   scale = amax / QMAX, q = 0 (scale := NaN) if scale is not finite, q = 0 if scale == 0, else
//   clamp(rint(y / scale), -QMAX - 1, QMAX) (int4 / int8, half to even) or e4m3_rne(clamp(y / scale,
//   -448, 448)) (fp8).
//
// q and scales must match bit for bit (NaN scales as NaN) for the prologues none and gelu_tanh
// (tanhf is the host's in both), and for layernorm on inputs whose statistics are exact. Otherwise
// the kernel's float64 statistics (shifted one-pass sums) round differently from the reference's,
// so y may differ in its last bit: scales must agree to 2^-20 and a q may differ by one step only
// where the reference's y / scale lies within 2^-20 (relative) of the rounding midpoint.
// lora_act: fp32 accumulation bound (K + 8) 2^-24 sum |y lora_down| (NaN where y has a NaN; where
// y has an inf or the terms approach FLT_MAX, fp32 overflow to inf / NaN is accepted).
// Cases include NaN / inf / all-zero / subnormal / huge groups, exact rounding ties (x / scale =
// k + 1/2, and e4m3 midpoints incl. subnormal ones and -0), misaligned x and q (the kernel's scalar
// paths), every x / smooth / lora / adaLN dtype, ranks across the kernel's lora thread layouts (32 /
// 64 / 128 / 256 threads per k-slice), several 16-row blocks, K not a multiple of the 256-channel
// chunk, and > 48 KiB of shared memory (the opt-in path); the host function's own checks; then a
// seeded random sweep over all of these. Outputs are poisoned before the call; all buffers sit
// against guard pages with canaries (cuda_emu::Buffer).
#include "emu.h"

#include "../../quant/quantize_cuda.cu"
#include "host_ref.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iterator>
#include <string>
#include <vector>

namespace {

using namespace emu_test;
using pydiff::QuantFormat;
using pydiff::QuantizeArgs;
using pydiff::QuantPrologue;

enum Special : unsigned {
  kNone = 0,
  kNaN = 1,
  kInf = 2,
  kZeroGroup = 4,
  kTies = 8,
  kTinyHuge = 16,
  kExactStats = 32,  // x in {-3 .. 3} / 4, K a power of two: exact LayerNorm statistics in any order
};

struct Case {
  const char* what;
  QuantFormat fmt;
  FloatType x_dt;
  QuantPrologue pro;
  int64_t M, K, G;
  int64_t R = 0;
  FloatType lora_dt = FloatType::kF32;
  bool smooth = false;
  FloatType smooth_dt = FloatType::kF32;
  bool shift = false, scale = false;
  FloatType mod_dt = FloatType::kF32;
  int64_t B = 1;       // adaLN batches (rows_per_batch = M / B)
  int x_off = 0;       // x base address % 16 (bytes; nonzero: the kernel's scalar loads)
  int q_off = 0;       // q base address % 16 (bytes; not a multiple of 8: scalar stores)
  unsigned special = kNone;
};

const char* fmt_name(QuantFormat f) {
  return f == QuantFormat::kInt4 ? "int4" : f == QuantFormat::kInt8 ? "int8" : "fp8";
}
const char* pro_name(QuantPrologue p) {
  return p == QuantPrologue::kGeluTanh ? "gelu_tanh" : p == QuantPrologue::kLayerNorm ? "layernorm" : "none";
}
float qmax_of(QuantFormat f) { return f == QuantFormat::kInt4 ? 7.0f : f == QuantFormat::kInt8 ? 127.0f : 448.0f; }

// A guarded copy at base % align == offset (align = the element size puts the data flush against
// the guard page, so a read one element past the end faults).
cuda_emu::Buffer to_device(const std::vector<unsigned char>& h, size_t align, size_t offset = 0) {
  cuda_emu::Buffer b(h.size(), align, offset);
  b.copy_from(h.data(), h.size());
  return b;
}
bool same(const cuda_emu::Buffer& b, const std::vector<unsigned char>& h) {
  return b.intact() && (h.empty() || std::memcmp(b.data(), h.data(), h.size()) == 0);
}

float gelu_tanh_ref(float x) {  // quant.py: 0.5 * x * (1 + tanh(c * (x + 0.044715 * x * x * x))), fp32
  const float c = float(0.7978845608028654), k3 = 0.044715f;
  const float inner = x + ((k3 * x) * x) * x;
  return (0.5f * x) * (1.0f + std::tanh(c * inner));
}

// Sets a group of row m to exact rounding ties at scale 2^-3 (int) or 2^-4 (fp8), amax on its first
// element; values exactly representable in bf16 / fp16 / fp32.
void make_ties(Rng& rng, const Case& c, std::vector<double>& x, int64_t m, int64_t g) {
  double* p = &x[size_t(m * c.K + g * c.G)];
  if (c.fmt == QuantFormat::kFp8E4M3) {
    const double s = 0.0625;
    p[0] = -448.0 * s;  // amax 28 -> scale 28 / 448 = 2^-4
    for (int64_t k = 1; k < c.G; ++k) {
      const int code = int(rng.integer(0, 0x7C));  // midpoint of codes code, code + 1 (some subnormal)
      const double mid = 0.5 * (e4m3_value(uint8_t(code)) + e4m3_value(uint8_t(code + 1)));
      const int kind = int(rng.integer(0, 3));
      p[k] = (kind == 3 ? e4m3_value(uint8_t(code)) : mid) * s * (kind & 1 ? -1.0 : 1.0);
      if (k == 1) p[k] = -0.0;
      if (k == 2) p[k] = -0x1p-10 * s;  // tie between -0 and -2^-9: rounds to -0
    }
  } else {
    const int qm = int(qmax_of(c.fmt));
    const double s = 0.125;
    p[0] = qm * s;
    for (int64_t k = 1; k < c.G; ++k) p[k] = (double(rng.integer(-qm, qm - 1)) + 0.5) * s;  // k + 1/2
  }
}

void run_case(const Case& c, uint64_t seed) {
  const auto t0 = std::chrono::steady_clock::now();
  const int64_t M = c.M, K = c.K, G = c.G, R = c.R, Gn = K / G, B = c.B;
  Rng rng(seed);
  // ---- inputs (the values as stored are what the reference uses)
  std::vector<double> xv(size_t(M * K));
  for (auto& v : xv) v = (c.special & kExactStats) ? 0.25 * double(rng.integer(-3, 3)) : rng.normal() * 1.5 + 0.25;
  if (c.special & kTies)
    for (int64_t m = 0; m < M; m += 2) make_ties(rng, c, xv, m, m % Gn);
  if (c.special & kZeroGroup)
    for (int64_t k = 0; k < G; ++k) xv[size_t((M - 1) * K + (Gn - 1) * G + k)] = (k & 1) ? -0.0 : 0.0;
  if (c.special & kTinyHuge) {  // fp32 x, rows 1-3: subnormal groups (scale 2^-149 or 0), huge values
    for (int64_t k = 0; k < G; ++k) {
      xv[size_t(1 * K + k)] = std::ldexp(double(rng.integer(-5, 5)), -149);
      xv[size_t(2 * K + k)] = std::ldexp(double(rng.integer(-3, 3)), -149);  // amax / QMAX rounds to 0
      xv[size_t(3 * K + k)] = rng.uniform(-3e38, 3e38);
    }
    xv[size_t(1 * K + 5)] = -std::ldexp(5.0, -149);
  }
  if (c.special & kNaN) xv[size_t(std::min<int64_t>(3, K - 1))] = NAN;
  if (c.special & kInf) {
    xv[size_t(std::min<int64_t>(1, M - 1) * K + K - 1)] = INFINITY;
    xv[size_t(std::min<int64_t>(2, M - 1) * K + K / 2)] = -INFINITY;
  }
  const size_t xs = type_size(c.x_dt);
  std::vector<unsigned char> x_h(size_t(M * K) * xs), sm_h, ld_h, sh_h, sc_h;
  for (int64_t i = 0; i < M * K; ++i) xv[size_t(i)] = store(c.x_dt, x_h.data(), i, xv[size_t(i)]);
  std::vector<double> smv, ldv, shv, scv;
  auto fill = [&](std::vector<unsigned char>& h, std::vector<double>& v, FloatType t, int64_t n, auto gen) {
    h.assign(size_t(n) * type_size(t), 0);
    v.resize(size_t(n));
    for (int64_t i = 0; i < n; ++i) v[size_t(i)] = store(t, h.data(), i, gen());
  };
  if (c.smooth) fill(sm_h, smv, c.smooth_dt, K, [&] { return std::fabs(rng.normal()) + 0.5; });
  if (R) fill(ld_h, ldv, c.lora_dt, K * R, [&] { return rng.normal() * 0.1; });
  if (c.shift) fill(sh_h, shv, c.mod_dt, B * K, [&] { return rng.normal() * 0.5; });
  if (c.scale) fill(sc_h, scv, c.mod_dt, B * K, [&] { return rng.normal() * 0.2; });

  cuda_emu::Buffer x = to_device(x_h, 16, size_t(c.x_off)), sm = to_device(sm_h, type_size(c.smooth_dt)),
                   ld = to_device(ld_h, type_size(c.lora_dt)), sh = to_device(sh_h, type_size(c.mod_dt)),
                   sc = to_device(sc_h, type_size(c.mod_dt));
  const int64_t qcols = c.fmt == QuantFormat::kInt4 ? K / 2 : K;
  cuda_emu::Buffer q(size_t(M * qcols), 16, size_t(c.q_off)), scales(size_t(M * Gn) * 4, 4), la(size_t(M * R) * 4, 4);
  q.fill(0xAB);
  scales.fill(0xFF);
  la.fill(0xFF);

  QuantizeArgs a{};
  a.fmt = c.fmt, a.prologue = c.pro, a.M = M, a.K = K, a.group_size = G;
  a.x_dtype = c.x_dt, a.x = x.data();
  a.smooth = c.smooth ? sm.data() : nullptr, a.smooth_dtype = c.smooth_dt;
  a.lora_down = R ? ld.data() : nullptr, a.lora_dtype = c.lora_dt, a.rank = R;
  a.shift = c.shift ? sh.data() : nullptr, a.scale = c.scale ? sc.data() : nullptr, a.mod_dtype = c.mod_dt;
  a.rows_per_batch = M / B, a.eps = 1e-6;
  a.q = q.data(), a.scales = scales.as<float>(), a.lora_act = R ? la.as<float>() : nullptr;
  const size_t nl = cuda_emu::launches().size();
  const int rc = pydiff::quantize_cuda(a, nullptr);

  char tag[240];
  std::snprintf(tag, sizeof(tag),
                "%s x=%s %s M=%ld K=%ld G=%ld R=%ld(%s) smooth=%s shift=%d scale=%d(%s) B=%ld offs=%d/%d "
                "special=%u: %s",
                fmt_name(c.fmt), type_name(c.x_dt), pro_name(c.pro), long(M), long(K), long(G), long(R),
                type_name(c.lora_dt), c.smooth ? type_name(c.smooth_dt) : "-", int(c.shift), int(c.scale),
                type_name(c.mod_dt), long(B), c.x_off, c.q_off, c.special, c.what);
  CHECK(rc == 0, "%s: quantize_cuda returned %d (%s)", tag, rc, cudaGetErrorName(cudaError_t(rc)));
  CHECK(cuda_emu::launches().size() == nl + 1, "%s: expected one launch", tag);
  CHECK(same(x, x_h) && same(sm, sm_h) && same(ld, ld_h) && same(sh, sh_h) && same(sc, sc_h),
        "%s: an input was modified", tag);
  CHECK(q.intact() && scales.intact() && la.intact(), "%s: a write outside an output", tag);
  if (rc != 0) return;

  // ---- reference y (fp32, quant.py's order of operations)
  std::vector<float> y(size_t(M * K));
  for (int64_t m = 0; m < M; ++m) {
    const double* xr = &xv[size_t(m * K)];
    float* yr = &y[size_t(m * K)];
    if (c.pro == QuantPrologue::kLayerNorm) {
      double mean = 0, var = 0;
      for (int64_t k = 0; k < K; ++k) mean += xr[k];
      mean /= double(K);
      for (int64_t k = 0; k < K; ++k) var += (xr[k] - mean) * (xr[k] - mean);
      var /= double(K);
      const double rstd = 1.0 / std::sqrt(var + 1e-6);
      const int64_t b = m / (M / B);
      for (int64_t k = 0; k < K; ++k) {
        float t = float((xr[k] - mean) * rstd);
        if (c.scale) t = t * (1.0f + float(scv[size_t(b * K + k)]));
        if (c.shift) t = t + float(shv[size_t(b * K + k)]);
        yr[k] = t;
      }
    } else {
      for (int64_t k = 0; k < K; ++k)
        yr[k] = c.pro == QuantPrologue::kGeluTanh ? gelu_tanh_ref(float(xr[k])) : float(xr[k]);
    }
    if (c.smooth)
      for (int64_t k = 0; k < K; ++k) yr[k] = yr[k] / float(smv[size_t(k)]);
  }

  // layernorm: the kernel's statistics (float64, shifted one-pass sums) round differently from the
  // reference's two-pass ones, except when all of them are exact (kExactStats)
  const bool exact = c.pro != QuantPrologue::kLayerNorm || (c.special & kExactStats);
  const float qmax = qmax_of(c.fmt);
  int64_t bad_s = 0, bad_q = 0, near_ties = 0, bad_l = 0;
  auto report = [&](int64_t& counter, const char* fmt, auto... args) {
    if (counter++ < 4) {
      std::printf("   %s: ", tag);
      std::printf(fmt, args...);
      std::printf("\n");
    }
  };
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < Gn; ++g) {
      const float* yg = &y[size_t(m * K + g * G)];
      float amax = 0.0f;
      bool nan = false;
      for (int64_t k = 0; k < G; ++k) {
        nan |= std::isnan(yg[k]);
        amax = std::max(amax, std::fabs(yg[k]));
      }
      if (nan) amax = NAN;
      float s = amax / qmax;
      const bool ok = std::isfinite(s) && s > 0.0f;
      if (!std::isfinite(s)) s = NAN;
      const float sk = scales.as<float>()[m * Gn + g];
      const bool s_match = std::isnan(s) ? (std::isnan(sk) && f32_bits(sk) != 0xFFFFFFFFu)
                                         : exact ? f32_bits(sk) == f32_bits(s)
                                                 : std::fabs(double(sk) - double(s)) <= 0x1p-20 * double(s);
      if (!s_match)
        report(bad_s, "scales[%ld, %ld] = %.9g (0x%08x), expected %.9g", long(m), long(g), sk, f32_bits(sk), s);
      for (int64_t k = 0; k < G; ++k) {
        const int64_t ch = g * G + k;
        // reference code and the value it rounds
        double v = 0.0;
        int want;
        int got;
        if (c.fmt == QuantFormat::kFp8E4M3) {
          v = ok ? double(std::min(std::max(yg[k] / s, -qmax), qmax)) : 0.0;
          want = ok ? e4m3_round(v) : 0;
          got = q.data()[m * qcols + ch];
        } else {
          v = ok ? double(yg[k] / s) : 0.0;
          want = ok ? int(std::min(std::max(std::nearbyint(float(v)), -qmax - 1.0f), qmax)) : 0;
          if (c.fmt == QuantFormat::kInt4) {
            const int byte = q.data()[m * qcols + ch / 2], nib = (ch & 1) ? byte >> 4 : byte & 15;
            got = nib >= 8 ? nib - 16 : nib;
          } else {
            got = int(int8_t(q.data()[m * qcols + ch]));
          }
        }
        if (got == want) continue;
        // layernorm: a one-step difference at a rounding midpoint is allowed
        if (!exact && ok) {
          double a = c.fmt == QuantFormat::kFp8E4M3 ? e4m3_value(uint8_t(got)) : got;
          double b = c.fmt == QuantFormat::kFp8E4M3 ? e4m3_value(uint8_t(want)) : want;
          const bool adjacent = c.fmt == QuantFormat::kFp8E4M3
                                    ? std::abs((got & 0x7F) - (want & 0x7F)) == 1 && ((got ^ want) & 0x80) == 0
                                    : std::abs(got - want) == 1;
          if (adjacent && std::fabs(v - 0.5 * (a + b)) <= 0x1p-20 * std::max(std::fabs(v), 0x1p-9)) {
            ++near_ties;
            continue;
          }
        }
        report(bad_q, "q[%ld, %ld] = %d, expected %d (y / scale = %.9g)", long(m), long(ch), got, want, v);
      }
    }
  double worst_l = 0;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t r = 0; r < R; ++r) {
      double ref = 0, mag = 0;
      for (int64_t k = 0; k < K; ++k) {
        const double t = double(y[size_t(m * K + k)]) * ldv[size_t(k * R + r)];
        ref += t;
        mag += std::fabs(t);
      }
      const float got = la.as<float>()[m * R + r];
      bool ok;
      const double tol = double(K + 8) * 0x1p-24 * mag + 1e-30, err = std::fabs(double(got) - ref);
      const bool written = f32_bits(got) != 0xFFFFFFFFu;
      if (std::isnan(ref)) {  // a NaN in y
        ok = std::isnan(got) && written;
      } else if (!(mag < 0x1p120)) {  // an inf in y, or terms near FLT_MAX: fp32 sums may overflow
        ok = written && (!std::isfinite(got) || err <= tol);
      } else {
        ok = err <= tol;
        if (ok) worst_l = std::max(worst_l, err / tol);
      }
      if (!ok) report(bad_l, "lora_act[%ld, %ld] = %.9g, expected %.9g", long(m), long(r), got, ref);
    }
  CHECK(bad_s == 0 && bad_q == 0 && bad_l == 0, "%s: %ld scales, %ld q, %ld lora_act wrong", tag, long(bad_s),
        long(bad_q), long(bad_l));
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  const std::string note = near_ties ? ", one-step differences at midpoints: " + std::to_string(near_ties) : "";
  if (bad_s + bad_q + bad_l == 0)
    std::printf("ok   %s (%.0f ms; smem %zu B; max lora_act err / bound %.3f%s)\n", tag, ms,
                cuda_emu::launches().back().smem, worst_l, note.c_str());
}

void host_checks() {
  static unsigned char dummy[64];
  static float fdummy[8];
  QuantizeArgs a{};
  a.fmt = QuantFormat::kInt4, a.prologue = QuantPrologue::kNone;
  a.M = 4, a.K = 64, a.group_size = 32, a.x_dtype = FloatType::kF32, a.x = dummy;
  a.rows_per_batch = 4, a.eps = 1e-6, a.q = dummy, a.scales = fdummy;
  const size_t nl = cuda_emu::launches().size();
  auto expect = [&](QuantizeArgs args, cudaError_t want, const char* what) {
    const int rc = pydiff::quantize_cuda(args, nullptr);
    CHECK(rc == int(want), "host check %s: returned %d (%s), expected %s", what, rc, cudaGetErrorName(cudaError_t(rc)),
          cudaGetErrorName(want));
  };
  QuantizeArgs b = a;
  b.group_size = 48;
  expect(b, cudaErrorInvalidValue, "group_size % 32 != 0");
  b = a;
  b.K = 96, b.group_size = 64;
  expect(b, cudaErrorInvalidValue, "K % group_size != 0");
  b = a;
  b.rows_per_batch = 0;
  expect(b, cudaErrorInvalidValue, "rows_per_batch == 0");
  b = a;
  b.rank = 4;
  expect(b, cudaErrorInvalidValue, "rank without lora pointers");
  b = a;
  b.M = 0;
  expect(b, cudaSuccess, "M == 0");
  b = a;
  b.K = 32 * 14600, b.group_size = 32;  // 4 rows (no lora_down) x 14600 groups x 4 bytes > 227 KiB
  b.prologue = QuantPrologue::kLayerNorm;  // (the two-pass kernel: the one-pass one needs no shared memory)
  expect(b, cudaErrorNotSupported, "shared memory above the opt-in limit");
  CHECK(cuda_emu::launches().size() == nl, "host checks: no launch expected");
  std::printf("ok   host-side argument checks and the shared-memory limit\n");
}

// A random case of the sweep: any format / dtype / prologue / offset mix, up to 5 blocks of rows,
// up to 8 groups, ranks across all lora thread layouts, specials where they apply.
Case random_case(Rng& r) {
  static const QuantFormat fmts[] = {QuantFormat::kInt4, QuantFormat::kInt8, QuantFormat::kFp8E4M3};
  static const FloatType xs[] = {FloatType::kF32, FloatType::kF16, FloatType::kBF16};
  static const FloatType ins[] = {FloatType::kF32, FloatType::kF16, FloatType::kBF16, FloatType::kF64};
  static const int64_t groups[] = {32, 64, 96, 128, 256};
  auto pick = [&](auto& arr) { return arr[size_t(r.integer(0, int64_t(std::size(arr)) - 1))]; };
  const int64_t p = r.integer(0, 3);
  const QuantPrologue pro = p == 3   ? QuantPrologue::kLayerNorm
                            : p == 2 ? QuantPrologue::kGeluTanh
                                     : QuantPrologue::kNone;
  Case c{.what = "sweep", .fmt = pick(fmts), .x_dt = pick(xs), .pro = pro, .M = r.integer(1, 80), .K = 0,
         .G = pick(groups)};
  c.K = c.G * r.integer(1, 8);
  c.R = r.integer(0, 1) == 0 ? 0 : r.integer(1, 300);
  c.lora_dt = pick(xs);
  c.smooth = r.integer(0, 2) == 0;
  c.smooth_dt = pick(ins);
  if (pro == QuantPrologue::kLayerNorm) {
    c.shift = r.integer(0, 1) != 0, c.scale = r.integer(0, 1) != 0, c.mod_dt = pick(ins);
    do c.B = r.integer(1, std::min<int64_t>(c.M, 5));
    while (c.M % c.B != 0);
    if ((c.K & (c.K - 1)) == 0 && r.integer(0, 1) == 0) c.special |= kExactStats;
  }
  const int64_t xsz = int64_t(type_size(c.x_dt));
  c.x_off = r.integer(0, 2) == 0 ? int(xsz * r.integer(1, 16 / xsz - 1)) : 0;
  c.q_off = r.integer(0, 2) == 0 ? int(r.integer(1, 15)) : 0;
  if (r.integer(0, 3) == 0) c.special |= kNaN;
  if (r.integer(0, 3) == 0) c.special |= kInf;
  if (r.integer(0, 3) == 0) c.special |= kZeroGroup;
  if (pro == QuantPrologue::kNone && r.integer(0, 2) == 0) c.special |= kTies;
  if (pro != QuantPrologue::kLayerNorm && c.x_dt == FloatType::kF32 && c.M >= 4 && r.integer(0, 3) == 0)
    c.special |= kTinyHuge;
  return c;
}

}  // namespace

// Usage: test_quantize_emu [number of random sweep cases (default 400)]
int main(int argc, char** argv) {
  const int sweep = argc > 1 ? std::atoi(argv[1]) : 400;
  const auto t0 = std::chrono::steady_clock::now();
  const auto I4 = QuantFormat::kInt4, I8 = QuantFormat::kInt8, F8 = QuantFormat::kFp8E4M3;
  const auto f32 = FloatType::kF32, f16 = FloatType::kF16, bf16 = FloatType::kBF16, f64 = FloatType::kF64;
  const auto none = QuantPrologue::kNone, gelu = QuantPrologue::kGeluTanh, ln = QuantPrologue::kLayerNorm;
  const Case cases[] = {
      {.what = "one group", .fmt = I4, .x_dt = f32, .pro = none, .M = 1, .K = 32, .G = 32},
      {.what = "smoothing, rank 1", .fmt = I8, .x_dt = f16, .pro = none, .M = 7, .K = 96, .G = 32, .R = 1,
       .lora_dt = f16, .smooth = true, .smooth_dt = bf16},
      {.what = "rank 17", .fmt = F8, .x_dt = bf16, .pro = none, .M = 17, .K = 320, .G = 64, .R = 17, .lora_dt = bf16},
      {.what = "NaN / inf / zero groups", .fmt = I4, .x_dt = bf16, .pro = none, .M = 33, .K = 512, .G = 128, .R = 40,
       .smooth = true, .special = kNaN | kInf | kZeroGroup},
      {.what = "rank 300 (256 threads a k-slice, 2 rounds)", .fmt = I8, .x_dt = f32, .pro = none, .M = 5, .K = 192,
       .G = 96, .R = 300},
      {.what = "one 1024-group, NaN / inf", .fmt = F8, .x_dt = f16, .pro = none, .M = 3, .K = 1024, .G = 1024,
       .special = kNaN | kInf | kZeroGroup},
      {.what = "x misaligned", .fmt = I4, .x_dt = bf16, .pro = none, .M = 37, .K = 320, .G = 64, .x_off = 2},
      {.what = "x 8-byte aligned only", .fmt = I4, .x_dt = f32, .pro = none, .M = 3, .K = 64, .G = 64, .x_off = 8,
       .q_off = 4},
      {.what = "x and q misaligned", .fmt = I8, .x_dt = f32, .pro = none, .M = 16, .K = 256, .G = 32, .smooth = true,
       .smooth_dt = f64, .x_off = 4, .q_off = 3},
      {.what = "q misaligned", .fmt = I4, .x_dt = f16, .pro = none, .M = 18, .K = 64, .G = 32, .R = 33, .lora_dt = f16,
       .q_off = 2},
      {.what = "q misaligned", .fmt = F8, .x_dt = f32, .pro = none, .M = 9, .K = 96, .G = 96, .q_off = 12},
      {.what = "ties", .fmt = I4, .x_dt = f32, .pro = none, .M = 20, .K = 256, .G = 32, .special = kTies},
      {.what = "ties", .fmt = I8, .x_dt = bf16, .pro = none, .M = 20, .K = 512, .G = 64, .special = kTies | kZeroGroup},
      {.what = "ties, subnormal and -0 e4m3", .fmt = F8, .x_dt = f16, .pro = none, .M = 20, .K = 256, .G = 128,
       .special = kTies | kZeroGroup},
      {.what = "4 blocks, K % 256 != 0", .fmt = I8, .x_dt = bf16, .pro = none, .M = 50, .K = 288, .G = 96, .R = 129,
       .lora_dt = bf16},
      {.what = "gelu", .fmt = I4, .x_dt = bf16, .pro = gelu, .M = 12, .K = 320, .G = 64, .smooth = true,
       .smooth_dt = f16},
      {.what = "gelu, rank 64, inf", .fmt = F8, .x_dt = f32, .pro = gelu, .M = 19, .K = 256, .G = 32, .R = 64,
       .special = kInf},
      {.what = "layernorm", .fmt = I8, .x_dt = f16, .pro = ln, .M = 12, .K = 320, .G = 64},
      {.what = "layernorm, adaLN", .fmt = F8, .x_dt = f32, .pro = ln, .M = 12, .K = 320, .G = 64, .R = 8, .shift = true,
       .scale = true, .B = 4},
      {.what = "layernorm, exact statistics", .fmt = I8, .x_dt = bf16, .pro = ln, .M = 8, .K = 512, .G = 64, .R = 4,
       .special = kExactStats},
      {.what = "adaLN, exact statistics", .fmt = F8, .x_dt = f16, .pro = ln, .M = 16, .K = 256, .G = 32, .smooth = true,
       .shift = true, .scale = true, .mod_dt = bf16, .B = 4, .special = kExactStats},
      {.what = "adaLN, exact statistics", .fmt = I4, .x_dt = f32, .pro = ln, .M = 6, .K = 1024, .G = 128, .shift = true,
       .scale = true, .B = 3, .special = kExactStats},
      {.what = "layernorm, shift", .fmt = I4, .x_dt = bf16, .pro = ln, .M = 12, .K = 320, .G = 64, .shift = true,
       .mod_dt = bf16},
      {.what = "layernorm, scale, rank 128, NaN row", .fmt = I8, .x_dt = f32, .pro = ln, .M = 18, .K = 96, .G = 32,
       .R = 128, .smooth = true, .scale = true, .mod_dt = f16, .B = 2, .special = kNaN},
      {.what = "subnormal and huge groups", .fmt = I4, .x_dt = f32, .pro = none, .M = 5, .K = 128, .G = 64, .R = 2,
       .special = kTinyHuge},
      {.what = "subnormal and huge groups", .fmt = I8, .x_dt = f32, .pro = none, .M = 4, .K = 64, .G = 32,
       .special = kTinyHuge},
      {.what = "subnormal and huge groups", .fmt = F8, .x_dt = f32, .pro = none, .M = 4, .K = 32, .G = 32,
       .special = kTinyHuge},
      {.what = "random, smoothing, rank 32", .fmt = I4, .x_dt = bf16, .pro = none, .M = 64, .K = 4096, .G = 128,
       .R = 32, .lora_dt = bf16, .smooth = true, .smooth_dt = bf16},
      {.what = "> 48 KiB shared memory with rank 300", .fmt = I8, .x_dt = f32, .pro = none, .M = 5, .K = 8192, .G = 32,
       .R = 300, .lora_dt = f16},
      {.what = "> 48 KiB shared memory (opt-in)", .fmt = I4, .x_dt = f16, .pro = none, .M = 17, .K = 25600, .G = 32},
  };
  uint64_t seed = 100;
  for (const Case& c : cases) run_case(c, seed++);
  host_checks();
  const int before = pydiff_test::failures;
  for (int i = 0; i < sweep; ++i) {  // case i: generator seed 1000 + i, data seed 5000 + i
    Rng r(uint64_t(1000 + i));
    Case c = random_case(r);
    const std::string what = "sweep case " + std::to_string(i);
    c.what = what.c_str();
    run_case(c, uint64_t(5000 + i));
  }
  if (sweep > 0) std::printf("%s random sweep: %d cases\n", pydiff_test::failures == before ? "ok  " : "FAIL", sweep);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("%d failure(s), %.1f s\n", pydiff_test::failures, s);
  return pydiff_test::failures != 0;
}
