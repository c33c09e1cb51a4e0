// The CUDA W4A4 / W8A8 GEMM (csrc/quant/quant_gemm_cuda.cu) run on the CPU emulator (emu.h) through
// its host entry point pydiff::quant_gemm_cuda, against exact host computations of
// pydiff/reference/quant.py's quant_gemm_ref:
//
//   out[m, n] = sum_g sa[m, g] sw[n, g] D[m, n, g] + sum_r lora_act[m, r] lora_up[r, n] + bias[n],
//   D[m, n, g] = sum_{k in group g} qa[m, k] qw[n, k].
//
// Modes: "exact" (small-integer codes, scales, low-rank factors and bias, so every intermediate of
// the kernel's fp32 epilogue is an integer below 2^24: the output must equal the exact result
// rounded to out_dtype, bit for bit), "extreme" (every code at its most negative value, unit scales:
// |D| at the int32 / magic-conversion limits; exact too), "random" (random codes and scales; error
// bound of an fp32 epilogue). Shapes cover M / N / K that are not multiples of the 128 x 128 x
// 64-byte tiles, several blocks in both grid dimensions, k-tiles that end mid-tile, misaligned qa /
// qw (the kernel's byte-load path) and out (no paired stores), low-rank ranks around the 32-rank
// staging rounds, every out / bias / low-rank dtype, and a group of 4096 k-steps (the in-group flush
// that keeps int32 sums from overflowing). The host-side checks (bad group sizes, grid limits, fp8
// on an sm_80 image) run too, then a seeded random sweep over shapes, formats, dtypes and offsets.
// Every buffer sits against a guard page with canaries around it (cuda_emu::Buffer); inputs must
// be left unchanged and outputs are poisoned with NaN before the call.
#include "emu.h"

// The kernel's inline-PTX primitives (left out of the .cu under PYDIFF_CUDA_EMU) -> emulated PTX.
inline void ldsm_x4(uint32_t (&r)[4], const void* p) { cuda_emu::ldmatrix_x4(r, p); }
inline void cp_async16(void* dst, const void* src, int src_bytes) { cuda_emu::cp_async(dst, src, 16, src_bytes); }
inline void cp_async_commit() { cuda_emu::cp_async_commit(); }
template <int N> inline void cp_async_wait() { cuda_emu::cp_async_wait(N); }
inline void mma_s8(int (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  cuda_emu::mma_m16n8k32_s8(d, a, b, d);
}
inline void mma_s4(int (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  cuda_emu::mma_m16n8k64_s4(d, a, b, d);
}
inline void mma_e4m3(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  cuda_emu::mma_m16n8k32_e4m3(d, a, b, d);
}
inline uint32_t smem_u32(const void* p) { return cuda_emu::smem_offset(p); }
inline void wgmma_fence() { cuda_emu::wgmma_fence(); }
inline void wgmma_commit() { cuda_emu::wgmma_commit(); }
template <int N> inline void wgmma_wait() { cuda_emu::wgmma_wait(N); }
inline void fence_proxy_async() { cuda_emu::fence_proxy_async(); }
inline void fence_acc(float (&)[64]) {}
inline void wgmma_m64n128k16_f16(float (&d)[64], uint64_t da, uint64_t db, int scale_d) {
  cuda_emu::wgmma_m64n128k16_f16(d, da, db, scale_d);
}

#include "../../quant/quant_gemm_cuda.cu"
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
using pydiff::QuantGemmArgs;

enum class Mode { kRandom, kExact, kExtreme };

struct Case {
  const char* what;
  QuantFormat fmt;
  FloatType out;
  int64_t M, N, K, G;
  int64_t R = 0;
  bool bias = false;
  Mode mode = Mode::kRandom;
  int qa_off = 0, qw_off = 0;  // base address % 16 of qa / qw (nonzero: the kernel's byte loads)
  int out_off = 0;             // out base address % 16 = out_off elements (odd: no paired stores)
  FloatType bias_dt = FloatType::kF32, la_dt = FloatType::kF32, lu_dt = FloatType::kF32;
  int device = 0;
  int int4_mma = -1;  // PYDIFF_CUDA_INT4_MMA for the call: -1 unset, 0 / 1 forced
  bool wgmma = false;  // PYDIFF_CUDA_WGMMA for the call (the Hopper warpgroup-MMA kernel, opt-in): run with
                      // "1" (no-swizzle tiles) and again with "2" (128-byte swizzled tiles)
};

const char* fmt_name(QuantFormat f) {
  return f == QuantFormat::kInt4 ? "int4" : f == QuantFormat::kInt8 ? "int8" : "fp8";
}
const char* mode_name(Mode m) { return m == Mode::kExact ? "exact" : m == Mode::kExtreme ? "extreme" : "random"; }

// Codes of `rows` x K channels -> values and the stored bytes.
void make_codes(Rng& rng, const Case& c, int64_t rows, std::vector<double>& val, std::vector<uint8_t>& bytes) {
  const int64_t K = c.K;
  val.assign(size_t(rows * K), 0.0);
  if (c.fmt == QuantFormat::kInt4) {
    bytes.assign(size_t(rows * K / 2), 0);
    for (int64_t i = 0; i < rows * K; ++i) {
      const int v = c.mode == Mode::kExtreme ? -8 : int(rng.integer(-8, 7));
      val[size_t(i)] = v;
      bytes[size_t(i / 2)] |= uint8_t((v & 0xF) << (4 * (i & 1)));  // even channel in the low nibble
    }
  } else if (c.fmt == QuantFormat::kInt8) {
    bytes.assign(size_t(rows * K), 0);
    for (int64_t i = 0; i < rows * K; ++i) {
      const int v = c.mode == Mode::kExtreme ? -128
                    : c.mode == Mode::kExact ? int(rng.integer(-32, 31))
                                             : int(rng.integer(-128, 127));
      val[size_t(i)] = v;
      bytes[size_t(i)] = uint8_t(int8_t(v));
    }
  } else {
    std::vector<uint8_t> integral;  // e4m3 codes of the integers -16 .. 16
    for (int b = 0; b < 256; ++b) {
      const double v = e4m3_value(uint8_t(b));
      if (std::isfinite(v) && v == std::floor(v) && std::fabs(v) <= 16) integral.push_back(uint8_t(b));
    }
    bytes.assign(size_t(rows * K), 0);
    for (int64_t i = 0; i < rows * K; ++i) {
      uint8_t b;
      if (c.mode == Mode::kExtreme) b = 0xFE;  // -448
      else if (c.mode == Mode::kExact) b = integral[size_t(rng.integer(0, int64_t(integral.size()) - 1))];
      else do b = uint8_t(rng.integer(0, 255)); while ((b & 0x7F) == 0x7F);  // no NaN codes
      bytes[size_t(i)] = b;
      val[size_t(i)] = e4m3_value(b);
    }
  }
}

// A guarded copy at base % align == offset (align = the element size puts the data flush against
// the guard page, so a read one element past the end faults).
cuda_emu::Buffer to_device(const void* src, size_t bytes, size_t align, size_t offset = 0) {
  cuda_emu::Buffer b(bytes, align, offset);
  b.copy_from(src, bytes);
  return b;
}
bool same(const cuda_emu::Buffer& b, const void* host, size_t bytes) {
  return b.intact() && (bytes == 0 || std::memcmp(b.data(), host, bytes) == 0);
}

int wgmma_layout = 1;  // PYDIFF_CUDA_WGMMA value for cases that opt in (1 or 2)

void run_case(const Case& c, uint64_t seed) {
  const auto t0 = std::chrono::steady_clock::now();
  const int64_t M = c.M, N = c.N, K = c.K, G = c.G, R = c.R, Gn = K / G;
  Rng rng(seed);
  std::vector<double> va, vw;
  std::vector<uint8_t> qa_h, qw_h;
  make_codes(rng, c, M, va, qa_h);
  make_codes(rng, c, N, vw, qw_h);
  std::vector<float> sa_h(size_t(M * Gn)), sw_h(size_t(N * Gn));
  auto scale = [&](double magnitude) {
    if (c.mode == Mode::kExact) return float(rng.integer(1, 4));
    return c.mode == Mode::kExtreme ? 1.f : float(rng.uniform(0.5, 2.0) * magnitude);
  };
  for (auto& s : sa_h) s = scale(1e-2);
  for (auto& s : sw_h) s = scale(1e-3);
  auto small = [&](int64_t lim) {
    return c.mode == Mode::kExact ? double(rng.integer(-lim, lim)) : rng.uniform(-1, 1);
  };
  std::vector<unsigned char> la_h(size_t(M * R) * type_size(c.la_dt)), lu_h(size_t(R * N) * type_size(c.lu_dt)),
      bias_h(size_t(N) * type_size(c.bias_dt));
  std::vector<double> la_v(size_t(M * R)), lu_v(size_t(R * N)), bias_v(size_t(N), 0.0);
  for (int64_t i = 0; i < M * R; ++i) la_v[size_t(i)] = store(c.la_dt, la_h.data(), i, small(3));
  for (int64_t i = 0; i < R * N; ++i) lu_v[size_t(i)] = store(c.lu_dt, lu_h.data(), i, small(3));
  if (c.bias)
    for (int64_t i = 0; i < N; ++i) bias_v[size_t(i)] = store(c.bias_dt, bias_h.data(), i, small(8));

  cuda_emu::Buffer qa = to_device(qa_h.data(), qa_h.size(), 16, size_t(c.qa_off));
  cuda_emu::Buffer qw = to_device(qw_h.data(), qw_h.size(), 16, size_t(c.qw_off));
  cuda_emu::Buffer sa = to_device(sa_h.data(), sa_h.size() * 4, 4), sw = to_device(sw_h.data(), sw_h.size() * 4, 4);
  cuda_emu::Buffer la = to_device(la_h.data(), la_h.size(), type_size(c.la_dt));
  cuda_emu::Buffer lu = to_device(lu_h.data(), lu_h.size(), type_size(c.lu_dt));
  cuda_emu::Buffer bias = to_device(bias_h.data(), c.bias ? bias_h.size() : 0, type_size(c.bias_dt));
  const size_t osz = type_size(c.out);
  cuda_emu::Buffer out(size_t(M * N) * osz, 16, size_t(c.out_off) * osz);
  out.fill(0xFF);  // NaN in every float format

  QuantGemmArgs a{};
  a.fmt = c.fmt;
  a.M = M, a.N = N, a.K = K, a.group_size = G;
  a.qa = qa.data(), a.sa = sa.as<float>(), a.qw = qw.data(), a.sw = sw.as<float>();
  a.bias = c.bias ? bias.data() : nullptr, a.bias_dtype = c.bias_dt;
  a.lora_act = R ? la.data() : nullptr, a.lora_act_dtype = c.la_dt;
  a.lora_up = R ? lu.data() : nullptr, a.lora_up_dtype = c.lu_dt;
  a.rank = R;
  a.out = out.data(), a.out_dtype = c.out;
  cudaSetDevice(c.device);
  if (c.int4_mma >= 0) setenv("PYDIFF_CUDA_INT4_MMA", c.int4_mma ? "1" : "0", 1);
  if (c.wgmma) setenv("PYDIFF_CUDA_WGMMA", wgmma_layout == 2 ? "2" : "1", 1);
  const size_t nl = cuda_emu::launches().size();
  const int rc = pydiff::quant_gemm_cuda(a, nullptr);
  unsetenv("PYDIFF_CUDA_INT4_MMA");
  unsetenv("PYDIFF_CUDA_WGMMA");
  cudaSetDevice(0);
  // the warpgroup-MMA kernel: opted in, int4, G = 64, aligned operands, an sm_90 device
  const bool want_wgmma = c.wgmma && c.fmt == QuantFormat::kInt4 && G % 64 == 0 && G <= 16384 && c.qa_off == 0 &&
                          c.qw_off == 0 && cuda_emu::device(c.device).sm == 90;
  // else the native 4-bit MMA runs for int4 with groups of 64k channels on sm_8x (or when forced)
  const bool want_native = !want_wgmma && c.fmt == QuantFormat::kInt4 && G % 64 == 0 &&
                           (c.int4_mma >= 0 ? c.int4_mma == 1 : cuda_emu::device(c.device).sm / 10 == 8);

  char tag[200];
  std::snprintf(tag, sizeof(tag), "%s %s out=%s M=%ld N=%ld K=%ld G=%ld R=%ld bias=%d offs=%d/%d/%d: %s",
                mode_name(c.mode), fmt_name(c.fmt), type_name(c.out), long(M), long(N), long(K), long(G), long(R),
                int(c.bias), c.qa_off, c.qw_off, c.out_off, c.what);
  CHECK(rc == 0, "%s: quant_gemm_cuda returned %d (%s)", tag, rc, cudaGetErrorName(cudaError_t(rc)));
  CHECK(cuda_emu::launches().size() == nl + 1, "%s: expected one launch", tag);
  if (cuda_emu::launches().size() == nl + 1) {
    const auto& L = cuda_emu::launches().back();
    CHECK(L.grid.x == unsigned((M + 127) / 128) && L.grid.y == unsigned((N + 127) / 128) && L.block.x == 256,
          "%s: grid (%u, %u) block %u", tag, L.grid.x, L.grid.y, L.block.x);
    const bool ran_native =
        L.func == reinterpret_cast<const void*>(&pydiff::quant_gemm_kernel<QuantFormat::kInt4, float, true>) ||
        L.func == reinterpret_cast<const void*>(&pydiff::quant_gemm_kernel<QuantFormat::kInt4, __half, true>) ||
        L.func == reinterpret_cast<const void*>(&pydiff::quant_gemm_kernel<QuantFormat::kInt4, __nv_bfloat16, true>);
    CHECK(ran_native == want_native, "%s: the %s int4 MMA ran", tag, ran_native ? "native" : "unpacked (int8)");
    const bool sw = wgmma_layout == 2;
    const void* wk[2][3] = {
        {reinterpret_cast<const void*>(&pydiff::quant_gemm_wgmma_kernel<float, false>),
         reinterpret_cast<const void*>(&pydiff::quant_gemm_wgmma_kernel<__half, false>),
         reinterpret_cast<const void*>(&pydiff::quant_gemm_wgmma_kernel<__nv_bfloat16, false>)},
        {reinterpret_cast<const void*>(&pydiff::quant_gemm_wgmma_kernel<float, true>),
         reinterpret_cast<const void*>(&pydiff::quant_gemm_wgmma_kernel<__half, true>),
         reinterpret_cast<const void*>(&pydiff::quant_gemm_wgmma_kernel<__nv_bfloat16, true>)}};
    const bool ran_wgmma = L.func == wk[sw][0] || L.func == wk[sw][1] || L.func == wk[sw][2];
    CHECK(ran_wgmma == want_wgmma, "%s: the warpgroup-MMA kernel (layout %d) %s", tag, wgmma_layout,
          ran_wgmma ? "ran" : "did not run");
  }
  CHECK(same(qa, qa_h.data(), qa_h.size()) && same(qw, qw_h.data(), qw_h.size()) &&
            same(sa, sa_h.data(), sa_h.size() * 4) && same(sw, sw_h.data(), sw_h.size() * 4) &&
            same(la, la_h.data(), la_h.size()) && same(lu, lu_h.data(), lu_h.size()) &&
            same(bias, bias_h.data(), c.bias ? bias_h.size() : 0),
        "%s: an input was modified", tag);
  CHECK(out.intact(), "%s: a write outside out", tag);

  // Reference (float64, exact for int4 / int8 and for e4m3 products) and a bound on |terms|.
  int64_t bad = 0;
  double worst = 0;  // max err / tol (random mode)
  const double two24 = 16777216.0;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double ref = 0, mag = 0;
      for (int64_t g = 0; g < Gn; ++g) {
        double d = 0, dabs = 0;
        const double* pa = &va[size_t(m * K + g * G)];
        const double* pw = &vw[size_t(n * K + g * G)];
        for (int64_t k = 0; k < G; ++k) {
          d += pa[k] * pw[k];
          dabs += std::fabs(pa[k] * pw[k]);
        }
        const double sc = double(sa_h[size_t(m * Gn + g)]) * double(sw_h[size_t(n * Gn + g)]);
        ref += d * sc;
        mag += dabs * std::fabs(sc);
      }
      for (int64_t r = 0; r < R; ++r) {
        const double t = la_v[size_t(m * R + r)] * lu_v[size_t(r * N + n)];
        ref += t;
        mag += std::fabs(t);
      }
      ref += bias_v[size_t(n)];
      mag += std::fabs(bias_v[size_t(n)]);
      const int64_t i = m * N + n;
      bool ok;
      double o;
      if (c.mode != Mode::kRandom) {
        if (c.mode == Mode::kExact && !(mag < two24)) {
          std::printf("FAIL %s: test case not exact in fp32 (sum of |terms| %.17g)\n", tag, mag);
          ++pydiff_test::failures;
          return;
        }
        const float rf = float(ref);  // == ref (exact)
        uint32_t got = 0, want = 0;
        if (c.out == FloatType::kF32) got = out.as<uint32_t>()[i], want = f32_bits(rf);
        else if (c.out == FloatType::kF16) got = out.as<uint16_t>()[i], want = f16_bits(rf);
        else got = out.as<uint16_t>()[i], want = bf16_bits(rf);
        o = load(c.out, out.data(), i);
        ok = got == want && double(rf) == ref;
      } else {
        const double ulp = c.out == FloatType::kF32 ? 0x1p-24 : c.out == FloatType::kF16 ? 0x1p-10 : 0x1p-7;
        const double steps = double(Gn + R + 3 + (c.fmt == QuantFormat::kFp8E4M3 ? G / 32 + 1 : 0));
        const double tol = 2.0 * steps * 0x1p-24 * mag * (1.0 + ulp) + ulp * std::fabs(ref) + 0x1p-24;
        o = load(c.out, out.data(), i);
        const double err = std::fabs(o - ref);
        ok = err <= tol;
        if (ok) worst = std::max(worst, err / tol);
      }
      if (!ok) {
        if (bad < 4) std::printf("   %s: out[%ld, %ld] = %.9g, expected %.9g\n", tag, long(m), long(n), o, ref);
        ++bad;
      }
    }
  CHECK(bad == 0, "%s: %ld of %ld outputs wrong", tag, long(bad), long(M * N));
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  const std::string note = c.mode == Mode::kRandom ? ", max err / bound " + std::to_string(worst) : "";
  if (bad == 0) std::printf("ok   %s (%.0f ms%s)\n", tag, ms, note.c_str());
}

// The host function's own checks (no launch) and fp8 on a device whose kernel image predates sm_89.
void host_checks() {
  static unsigned char dummy[64];
  static float fdummy[8];
  QuantGemmArgs a{};
  a.fmt = QuantFormat::kInt8;
  a.M = 4, a.N = 4, a.K = 64, a.group_size = 32;
  a.qa = dummy, a.qw = dummy, a.sa = fdummy, a.sw = fdummy, a.out = dummy;
  a.out_dtype = FloatType::kF32;
  const size_t nl = cuda_emu::launches().size();
  auto expect = [&](QuantGemmArgs args, cudaError_t want, const char* what) {
    const int rc = pydiff::quant_gemm_cuda(args, nullptr);
    CHECK(rc == int(want), "host check %s: returned %d (%s), expected %s", what, rc, cudaGetErrorName(cudaError_t(rc)),
          cudaGetErrorName(want));
  };
  QuantGemmArgs b = a;
  b.group_size = 48;
  expect(b, cudaErrorInvalidValue, "group_size % 32 != 0");
  b = a;
  b.K = 96, b.group_size = 64;
  expect(b, cudaErrorInvalidValue, "K % group_size != 0");
  b = a;
  b.rank = 2;
  expect(b, cudaErrorInvalidValue, "rank without lora pointers");
  b = a;
  b.M = 0;
  expect(b, cudaSuccess, "M == 0");
  b = a;
  b.N = 65536LL * 128;
  expect(b, cudaErrorInvalidConfiguration, "grid.y > 65535");
  b = a;
  b.fmt = QuantFormat::kFp8E4M3;
  cudaSetDevice(1);  // an sm_80 image: no e4m3 MMA
  expect(b, cudaErrorNotSupported, "fp8 on sm_80");
  expect(b, cudaErrorNotSupported, "fp8 on sm_80 (cached)");
  cudaSetDevice(0);
  CHECK(cuda_emu::launches().size() == nl, "host checks: no launch expected");
  std::printf("ok   host-side argument checks and the fp8 / sm_80 refusal\n");
}

// A random case of the sweep (small enough to take ~10-50 ms): any format / dtype / offset mix,
// M and N up to 3 blocks, up to 6 groups, exact mode where its integer bound allows.
Case random_case(Rng& r) {
  static const QuantFormat fmts[] = {QuantFormat::kInt4, QuantFormat::kInt8, QuantFormat::kFp8E4M3};
  static const FloatType outs[] = {FloatType::kF32, FloatType::kF16, FloatType::kBF16};
  static const FloatType ins[] = {FloatType::kF32, FloatType::kF16, FloatType::kBF16, FloatType::kF64};
  static const int64_t groups[] = {32, 64, 96, 128, 160, 192, 256};
  auto pick = [&](auto& arr) { return arr[size_t(r.integer(0, int64_t(std::size(arr)) - 1))]; };
  Case c{.what = "sweep", .fmt = pick(fmts), .out = pick(outs), .M = 0, .N = 0, .K = 0, .G = pick(groups)};
  auto dim = [&] { return r.integer(0, 3) == 0 ? r.integer(1, 16) : r.integer(1, 300); };
  c.M = dim(), c.N = dim();
  c.K = c.G * r.integer(1, 6);
  c.mode = r.integer(0, 2) == 0 ? Mode::kRandom : Mode::kExact;
  if (c.mode == Mode::kExact && c.fmt == QuantFormat::kInt8)  // sum |qa qw| sa sw < 2^24
    while (c.K * 32 * 32 * 16 >= (1 << 24) - 4096) c.K -= c.G;
  c.R = r.integer(0, 2) == 0 ? 0 : r.integer(1, 70);
  c.bias = r.integer(0, 1) != 0;
  c.qa_off = r.integer(0, 2) == 0 ? int(r.integer(1, 15)) : 0;
  c.qw_off = r.integer(0, 2) == 0 ? int(r.integer(1, 15)) : 0;
  c.out_off = int(r.integer(0, 1));
  c.bias_dt = pick(ins), c.la_dt = pick(ins), c.lu_dt = pick(ins);
  c.device = c.fmt != QuantFormat::kFp8E4M3 && r.integer(0, 3) == 0 ? 1 : 0;
  c.wgmma = r.integer(0, 2) == 0;  // opted in: runs where it applies (int4, G = 64, aligned, sm_90)
  return c;
}

}  // namespace

// Usage: test_quant_gemm_emu [number of random sweep cases (default 300)]
int main(int argc, char** argv) {
  const int sweep = argc > 1 ? std::atoi(argv[1]) : 300;
  cuda_emu::device(1).sm = 80;
  const auto t0 = std::chrono::steady_clock::now();
  const auto I4 = QuantFormat::kInt4, I8 = QuantFormat::kInt8, F8 = QuantFormat::kFp8E4M3;
  const auto f32 = FloatType::kF32, f16 = FloatType::kF16, bf16 = FloatType::kBF16, f64 = FloatType::kF64;
  const auto X = Mode::kExact, E = Mode::kExtreme;
  const Case cases[] = {
      // integer-exact: fragment mapping, group scales, tiles, edges
      {.what = "one element", .fmt = I4, .out = f32, .M = 1, .N = 1, .K = 32, .G = 32, .mode = X},
      {.what = "one element", .fmt = I8, .out = f32, .M = 1, .N = 1, .K = 32, .G = 32, .mode = X},
      {.what = "one element", .fmt = F8, .out = f32, .M = 1, .N = 1, .K = 32, .G = 32, .mode = X},
      {.what = "2 x 2 blocks, 2.5 k-tiles", .fmt = I4, .out = f32, .M = 130, .N = 131, .K = 320, .G = 64, .R = 5,
       .bias = true, .mode = X},
      {.what = "k-tile ends mid-tile", .fmt = I8, .out = bf16, .M = 67, .N = 129, .K = 96, .G = 32, .R = 33,
       .bias = true, .mode = X, .bias_dt = f16, .la_dt = bf16, .lu_dt = f16},
      {.what = "single group of 5 k-steps", .fmt = F8, .out = f16, .M = 129, .N = 67, .K = 160, .G = 160, .R = 3,
       .bias = true, .mode = X, .bias_dt = bf16, .la_dt = f64},
      {.what = "3 blocks along M", .fmt = I8, .out = f32, .M = 257, .N = 20, .K = 64, .G = 64, .R = 32, .mode = X},
      {.what = "3 blocks along N", .fmt = I4, .out = f32, .M = 5, .N = 257, .K = 1024, .G = 256, .bias = true,
       .mode = X},
      {.what = "M, N multiples of the tile", .fmt = I8, .out = f16, .M = 128, .N = 256, .K = 128, .G = 64, .R = 64,
       .bias = true, .mode = X, .la_dt = bf16, .lu_dt = bf16},
      {.what = "3 x 3 blocks", .fmt = I4, .out = bf16, .M = 300, .N = 290, .K = 64, .G = 32, .R = 7, .bias = true,
       .mode = X, .bias_dt = f64},
      // misaligned pointers
      {.what = "qa misaligned, out odd", .fmt = I8, .out = f32, .M = 37, .N = 45, .K = 224, .G = 32, .R = 1, .mode = X,
       .qa_off = 1, .out_off = 1},
      {.what = "qw misaligned, out odd", .fmt = I4, .out = f16, .M = 19, .N = 130, .K = 192, .G = 96, .bias = true,
       .mode = X, .qw_off = 8, .out_off = 1},
      {.what = "both misaligned", .fmt = F8, .out = bf16, .M = 33, .N = 18, .K = 64, .G = 32, .R = 65, .mode = X,
       .qa_off = 4, .qw_off = 12},
      // random codes and scales (fp32 epilogue bound)
      {.what = "random", .fmt = I4, .out = bf16, .M = 7, .N = 67, .K = 96, .G = 32, .R = 3, .bias = true,
       .bias_dt = bf16, .la_dt = f16, .lu_dt = f16},
      {.what = "random", .fmt = I8, .out = f16, .M = 130, .N = 131, .K = 192, .G = 64, .R = 40, .bias = true,
       .la_dt = f64, .lu_dt = bf16},
      {.what = "random", .fmt = F8, .out = f32, .M = 129, .N = 9, .K = 320, .G = 160, .R = 31},
      {.what = "random, N odd", .fmt = I4, .out = f32, .M = 3, .N = 129, .K = 128, .G = 128, .bias = true},
      {.what = "random, 16 groups", .fmt = I8, .out = f32, .M = 64, .N = 72, .K = 2048, .G = 128, .R = 16,
       .bias = true},
      {.what = "random on an sm_80 device", .fmt = I8, .out = f32, .M = 20, .N = 30, .K = 256, .G = 128, .R = 2,
       .device = 1},
      // extremes: every product at its maximum
      {.what = "|D| = 2^22 (magic boundary)", .fmt = I8, .out = f32, .M = 3, .N = 5, .K = 256, .G = 256, .mode = E},
      {.what = "|D| = 2^23, cvt path", .fmt = I8, .out = f32, .M = 3, .N = 5, .K = 512, .G = 512, .mode = E},
      {.what = "|D| = 2^24, cvt path", .fmt = I8, .out = f32, .M = 3, .N = 5, .K = 1024, .G = 1024, .mode = E},
      {.what = "|D| = 2^18 x 4 groups", .fmt = I4, .out = f32, .M = 3, .N = 5, .K = 16384, .G = 4096, .mode = E},
      {.what = "448^2 x 512", .fmt = F8, .out = f32, .M = 3, .N = 5, .K = 512, .G = 512, .mode = E},
      {.what = "misaligned", .fmt = I4, .out = f32, .M = 3, .N = 5, .K = 1024, .G = 64, .mode = E, .qa_off = 3},
      {.what = "|D| = 2^23, in-group flush + magic", .fmt = I4, .out = f32, .M = 1, .N = 1, .K = 131072, .G = 131072,
       .mode = E},
      {.what = "|D| = 2^31: needs the in-group flush", .fmt = I8, .out = f32, .M = 1, .N = 1, .K = 131072, .G = 131072,
       .mode = E},
      // native 4-bit MMA (sm_80 device, or forced): exact, extreme, random; and forced off on sm_80
      {.what = "native s4: 2 x 2 blocks, 2.5 k-tiles", .fmt = I4, .out = f32, .M = 130, .N = 131, .K = 320, .G = 64,
       .R = 5, .bias = true, .mode = X, .device = 1},
      {.what = "native s4: 3 blocks along N, G = 256", .fmt = I4, .out = bf16, .M = 5, .N = 257, .K = 1024, .G = 256,
       .bias = true, .mode = X, .device = 1},
      {.what = "native s4: every product -8 x -8", .fmt = I4, .out = f32, .M = 3, .N = 5, .K = 16384, .G = 4096,
       .mode = E, .device = 1},
      {.what = "native s4: in-group flush + magic", .fmt = I4, .out = f32, .M = 1, .N = 1, .K = 262144, .G = 262144,
       .mode = E, .device = 1},
      {.what = "native s4: random, misaligned, out odd", .fmt = I4, .out = f16, .M = 37, .N = 45, .K = 192, .G = 64,
       .R = 33, .qa_off = 5, .out_off = 1, .device = 1},
      {.what = "native s4 forced on an sm_90 device", .fmt = I4, .out = f32, .M = 67, .N = 129, .K = 384, .G = 128,
       .R = 2, .bias = true, .mode = X, .int4_mma = 1},
      {.what = "G = 96 on sm_80: k64 would straddle groups, unpacked path", .fmt = I4, .out = f32, .M = 19, .N = 20,
       .K = 192, .G = 96, .mode = X, .device = 1},
      {.what = "native s4 forced off on sm_80", .fmt = I4, .out = f32, .M = 19, .N = 20, .K = 256, .G = 64, .mode = X,
       .device = 1, .int4_mma = 0},
      // Hopper warpgroup-MMA kernel (opted in): exact, extreme, random, edges, fallbacks
      {.what = "wgmma: one element", .fmt = I4, .out = f32, .M = 1, .N = 1, .K = 64, .G = 64, .mode = X,
       .wgmma = true},
      {.what = "wgmma: K = 0 (bias and low-rank terms only)", .fmt = I4, .out = f32, .M = 5, .N = 7, .K = 0, .G = 64,
       .R = 3, .bias = true, .mode = X, .wgmma = true},
      {.what = "wgmma: 2 x 2 blocks, 5 groups", .fmt = I4, .out = f32, .M = 130, .N = 131, .K = 320, .G = 64, .R = 5,
       .bias = true, .mode = X, .wgmma = true},
      {.what = "wgmma: 3 blocks along N, bf16 out", .fmt = I4, .out = bf16, .M = 67, .N = 257, .K = 128, .G = 64,
       .R = 33, .bias = true, .mode = X, .bias_dt = f16, .la_dt = bf16, .lu_dt = f64, .wgmma = true},
      {.what = "wgmma: 3 blocks along M, f16 out, odd out", .fmt = I4, .out = f16, .M = 257, .N = 9, .K = 192,
       .G = 64, .R = 64, .mode = X, .out_off = 1, .wgmma = true},
      {.what = "wgmma: M, N multiples of the tile", .fmt = I4, .out = f32, .M = 128, .N = 256, .K = 256, .G = 64,
       .bias = true, .mode = X, .wgmma = true},
      {.what = "wgmma: every product -8 x -8", .fmt = I4, .out = f32, .M = 3, .N = 5, .K = 4096, .G = 64, .mode = E,
       .wgmma = true},
      {.what = "wgmma: random", .fmt = I4, .out = bf16, .M = 37, .N = 140, .K = 448, .G = 64, .R = 3, .bias = true,
       .bias_dt = bf16, .la_dt = f16, .lu_dt = f16, .wgmma = true},
      {.what = "wgmma: random, f32", .fmt = I4, .out = f32, .M = 129, .N = 70, .K = 64, .G = 64, .R = 40,
       .wgmma = true},
      {.what = "wgmma: G = 128, 3 groups", .fmt = I4, .out = f32, .M = 130, .N = 70, .K = 384, .G = 128, .R = 2,
       .bias = true, .mode = X, .wgmma = true},
      {.what = "wgmma: G = 256, random", .fmt = I4, .out = bf16, .M = 37, .N = 129, .K = 512, .G = 256, .R = 3,
       .bias = true, .wgmma = true},
      {.what = "wgmma: G = 16384, every product -8 x -8 (|D| = 2^20)", .fmt = I4, .out = f32, .M = 3, .N = 5,
       .K = 16384, .G = 16384, .mode = E, .wgmma = true},
      {.what = "wgmma opted in, G = 96: mma.sync kernel", .fmt = I4, .out = f32, .M = 19, .N = 20, .K = 192,
       .G = 96, .mode = X, .wgmma = true},
      {.what = "wgmma opted in, G = 32768: mma.sync kernel", .fmt = I4, .out = f32, .M = 3, .N = 5, .K = 32768,
       .G = 32768, .mode = E, .wgmma = true},
      {.what = "wgmma opted in, qa misaligned: mma.sync kernel", .fmt = I4, .out = f32, .M = 19, .N = 20, .K = 128,
       .G = 64, .mode = X, .qa_off = 4, .wgmma = true},
      {.what = "wgmma opted in on sm_80: native s4", .fmt = I4, .out = f32, .M = 19, .N = 20, .K = 128, .G = 64,
       .mode = X, .device = 1, .wgmma = true},
      {.what = "wgmma opted in, int8: mma.sync kernel", .fmt = I8, .out = f32, .M = 19, .N = 20, .K = 128, .G = 64,
       .mode = X, .wgmma = true},
  };
  uint64_t seed = 1;
  for (const Case& c : cases) {
    wgmma_layout = 1;
    run_case(c, seed);
    if (c.wgmma) {  // the same case with the 128-byte swizzled tiles
      wgmma_layout = 2;
      run_case(c, seed);
      wgmma_layout = 1;
    }
    ++seed;
  }
  host_checks();
  const int before = pydiff_test::failures;
  for (int i = 0; i < sweep; ++i) {  // case i: generator seed 1000 + i, data seed 5000 + i
    Rng r(uint64_t(1000 + i));
    Case c = random_case(r);
    const std::string what = "sweep case " + std::to_string(i);
    c.what = what.c_str();
    wgmma_layout = 1 + (i & 1);  // the two tile layouts of the warpgroup-MMA kernel, alternately
    run_case(c, uint64_t(5000 + i));
  }
  if (sweep > 0) std::printf("%s random sweep: %d cases\n", pydiff_test::failures == before ? "ok  " : "FAIL", sweep);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("%d failure(s), %.1f s\n", pydiff_test::failures, s);
  return pydiff_test::failures != 0;
}
