// The CPU kernels' fp16 / bf16 <-> fp32 conversions (csrc/include/pydiff/cpu_types.h) against IEEE
// conversions, one element at a time and through the bulk converters of cpu_convert.h (their AVX2
// clone is what the kernels run where the CPU has AVX2): every fp16 and bf16 value to fp32, and fp32 -> fp16 / bf16 over every exponent with
// a stride through the mantissas plus the edge cases (ties, the subnormal / normal and overflow
// boundaries, inf, nan). Reference: the compiler's _Float16 (IEEE round to nearest even) where it
// has one, and an exact long-double rounding otherwise.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <limits>

#include <vector>

#include "check.h"
#include "pydiff/cpu_convert.h"
#include "pydiff/cpu_types.h"

using namespace pydiff;

namespace {

// fp16 bits -> value, exactly (double holds every fp16)
double half_value(uint16_t h) {
  const int sign = (h >> 15) & 1, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  double v;
  if (exp == 0x1f) v = mant ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  else if (exp == 0) v = std::ldexp(double(mant), -24);
  else v = std::ldexp(double(1024 + mant), exp - 25);
  return sign ? -v : v;
}

// fp32 -> fp16 bits, round to nearest even, by search over the representable magnitudes (reference)
uint16_t half_ref(float f) {
  const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
  if (std::isnan(f)) return sign | 0x7e00;
  const double a = std::fabs(double(f));
  if (a >= 65520.0) return sign | 0x7c00;
  // largest magnitude code with value <= a, then compare the distances to it and the next one
  uint16_t lo = 0, hi = 0x7bff;
  while (lo < hi) {
    const uint16_t mid = uint16_t((lo + hi + 1) / 2);
    if (half_value(mid) <= a) lo = mid; else hi = uint16_t(mid - 1);
  }
  if (lo == 0x7bff) return sign | lo;  // between 65504 and 65520: rounds down
  const double d0 = a - half_value(lo), d1 = half_value(uint16_t(lo + 1)) - a;
  const uint16_t q = (d1 < d0 || (d1 == d0 && (lo & 1))) ? uint16_t(lo + 1) : lo;
  return sign | q;
}

uint16_t bf16_ref(float f) {
  uint32_t u = float_to_bits(f);
  if (std::isnan(f)) return uint16_t((u >> 16) | 0x40);
  // exact: the value's truncation and the next bf16 above it, nearest-even between them
  const uint32_t lo = u & 0xffff0000u, rest = u & 0xffffu;
  uint32_t q = lo >> 16;
  if (rest > 0x8000u || (rest == 0x8000u && (q & 1))) ++q;
  return uint16_t(q);
}

bool same_bits(float a, float b) { return float_to_bits(a) == float_to_bits(b); }

}  // namespace

int main() {
  // every fp16 / bf16 value -> fp32
  for (uint32_t h = 0; h < 65536; ++h) {
    const float got = to_float(half_t{uint16_t(h)});
    const double want = half_value(uint16_t(h));
    if (std::isnan(want)) {
      CHECK(std::isnan(got) && ((float_to_bits(got) >> 13) & 0x3ff) == (h & 0x3ff) &&
                std::signbit(got) == bool(h & 0x8000), "fp16 %04x: nan payload/sign lost", h);
    } else {
      CHECK(double(got) == want && std::signbit(got) == std::signbit(want), "fp16 %04x -> %.9g, want %.9g", h,
            double(got), want);
    }
    const float gb = to_float(bf16_t{uint16_t(h)});
    CHECK(float_to_bits(gb) == (h << 16), "bf16 %04x -> %08x", h, float_to_bits(gb));
  }
  // the bulk converters (vectorised clones) on all 65536 codes, at an odd length and offset
  {
    std::vector<half_t> hs(65536 + 3);
    std::vector<bf16_t> bs(65536 + 3);
    for (uint32_t h = 0; h < 65536; ++h) hs[h + 3] = half_t{uint16_t(h)}, bs[h + 3] = bf16_t{uint16_t(h)};
    std::vector<float> fh(65536 + 3, -1.f), fb(65536 + 3, -1.f);
    convert_to_float(hs.data() + 3, 65533, fh.data() + 3);
    convert_to_float(bs.data() + 3, 65533, fb.data() + 3);
    for (uint32_t h = 0; h < 65533; ++h) {
      const float e = to_float(half_t{uint16_t(h)});
      CHECK(float_to_bits(fh[h + 3]) == float_to_bits(e), "bulk fp16 %04x -> %08x, want %08x", h, float_to_bits(fh[h + 3]),
            float_to_bits(e));
      CHECK(float_to_bits(fb[h + 3]) == (h << 16), "bulk bf16 %04x", h);
    }
    CHECK(fh[2] == -1.f && fb[2] == -1.f, "bulk conversion wrote before its start");
  }
  // fp32 -> fp16 / bf16: every exponent, every sign, a stride through the mantissas plus its
  // neighbourhood of the rounding points (ties and one ulp either side)
  long checked = 0;
  std::vector<float> fs;
  for (uint32_t se = 0; se < 512; ++se) {
    for (uint32_t m = 0; m < (1u << 23); m += 997) {
      for (uint32_t d : {0u, 1u, 0xfffu, 0x1000u, 0x1001u, 0x7fffu, 0x8000u, 0x8001u}) {
        const uint32_t mm = (m & ~0xffffu) | d;
        const uint32_t bits = (se << 23) | (mm & 0x7fffffu);
        const float f = bits_to_float(bits);
        fs.push_back(f);
        const uint16_t h = from_float<half_t>(f).bits, hr = half_ref(f);
        CHECK(h == hr, "fp32 %08x (%.9g) -> fp16 %04x, want %04x", bits, double(f), h, hr);
        const uint16_t b = from_float<bf16_t>(f).bits, br = bf16_ref(f);
        CHECK(b == br, "fp32 %08x -> bf16 %04x, want %04x", bits, b, br);
        ++checked;
        if (pydiff_test::failures > 20) return 1;
      }
    }
  }
  {  // the same values through the bulk converters
    const int64_t n = int64_t(fs.size());
    std::vector<half_t> hs(n);
    std::vector<bf16_t> bs(n);
    convert_from_float(fs.data(), n, hs.data());
    convert_from_float(fs.data(), n, bs.data());
    for (int64_t i = 0; i < n && pydiff_test::failures <= 20; ++i) {
      CHECK(hs[i].bits == from_float<half_t>(fs[i]).bits, "bulk fp32 %08x -> fp16 %04x, want %04x",
            float_to_bits(fs[i]), hs[i].bits, from_float<half_t>(fs[i]).bits);
      CHECK(bs[i].bits == from_float<bf16_t>(fs[i]).bits, "bulk fp32 %08x -> bf16", float_to_bits(fs[i]));
    }
  }
  // fp16 subnormal results: each code's rounding tie (q + 1/2) * 2^-24 and one fp32 ulp either side
  for (int q = 0; q < 1024; ++q) {
    const float tie = float(std::ldexp(q + 0.5, -24));
    for (float f : {tie, std::nextafter(tie, 0.f), std::nextafter(tie, 1.f)}) {
      CHECK(from_float<half_t>(f).bits == half_ref(f), "fp32 %.9g -> fp16 %04x, want %04x", double(f),
            from_float<half_t>(f).bits, half_ref(f));
      CHECK(from_float<half_t>(-f).bits == half_ref(-f), "fp32 %.9g -> fp16", double(-f));
    }
  }
  // named edges: the subnormal / normal boundary of fp16, its smallest subnormal's tie, overflow
  for (float f : {0.f, -0.f, 6.103515625e-05f, 6.1035156e-05f, 6.0975552e-05f, 2.98023224e-08f, 2.98023259e-08f,
                  5.96046448e-08f, 65504.f, 65519.996f, 65520.f, 1e30f, std::numeric_limits<float>::infinity(),
                  -std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN(),
                  std::numeric_limits<float>::denorm_min()}) {
    CHECK(from_float<half_t>(f).bits == half_ref(f), "fp32 %.9g -> fp16 %04x, want %04x", double(f),
          from_float<half_t>(f).bits, half_ref(f));
    CHECK(from_float<half_t>(-f).bits == half_ref(-f), "fp32 %.9g -> fp16", double(-f));
  }
#if defined(__FLT16_MAX__)
  // and the compiler's own IEEE conversion on the same sample
  for (uint32_t bits = 0; bits < 0xffffffffu - 65521u; bits += 65521u) {
    const float f = bits_to_float(bits);
    const _Float16 c = _Float16(f);
    uint16_t cb;
    std::memcpy(&cb, &c, 2);
    const uint16_t h = from_float<half_t>(f).bits;
    if (std::isnan(f)) CHECK((h & 0x7c00) == 0x7c00 && (h & 0x3ff), "nan %08x -> %04x", bits, h);
    else CHECK(h == cb, "fp32 %08x -> fp16 %04x, _Float16 gives %04x", bits, h, cb);
    if (pydiff_test::failures > 20) return 1;
  }
#endif
  std::printf("test_cpu_types: %ld fp32 values, 65536 fp16 and bf16 codes; %d failures\n", checked,
              pydiff_test::failures);
  return pydiff_test::failures ? 1 : 0;
}
