// fp16 / bf16 <-> fp32 conversions for the CPU kernels (round to nearest even), no dependencies.
#pragma once
#include <cstdint>
#include <cstring>

// Function multi-versioning for the vectorised CPU loops (gcc on x86-64, resolved once at load time):
// PYDIFF_CLONES adds AVX-512 and AVX2 clones, PYDIFF_CLONES_AVX2 only the AVX2 one.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PYDIFF_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define PYDIFF_CLONES_AVX2 __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define PYDIFF_CLONES
#define PYDIFF_CLONES_AVX2
#endif

namespace pydiff {

struct half_t { uint16_t bits; };
struct bf16_t { uint16_t bits; };

inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline float to_float(float v) { return v; }
inline float to_float(bf16_t v) { return bits_to_float(uint32_t(v.bits) << 16); }
inline float to_float(half_t v) {
  const uint32_t h = v.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (mant << 13));  // inf / nan
  if (exp == 0) {
    if (mant == 0) return bits_to_float(sign);
    // subnormal: value = mant * 2^-24
    float f = float(mant) * 5.9604644775390625e-08f;
    return sign ? -f : f;
  }
  return bits_to_float(sign | ((exp + 112) << 23) | (mant << 13));
}

template <typename T> inline T from_float(float f);
template <> inline float from_float<float>(float f) { return f; }
template <> inline bf16_t from_float<bf16_t>(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{uint16_t((u >> 16) | 0x40)};  // quiet nan
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16_t{uint16_t(u >> 16)};
}
template <> inline half_t from_float<half_t>(float f) {
  uint32_t u = float_to_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return half_t{uint16_t(sign | 0x7e00u)};          // nan
  if (u >= 0x477ff000u) return half_t{uint16_t(sign | 0x7c00u)};         // overflow -> inf (>= 65520)
  if (u < 0x38800000u) {                                                // subnormal or zero
    // round(|f| * 2^24) to nearest even, as an integer count of 2^-24 units
    float a = bits_to_float(u) * 16777216.0f;
    float r = a + 8388608.0f;                                           // forces rounding at integer
    uint32_t q = float_to_bits(r) - float_to_bits(8388608.0f);
    return half_t{uint16_t(sign | q)};
  }
  uint32_t mant_odd = (u >> 13) & 1u;
  u += 0xc8000fffu + mant_odd;                                          // rebias exponent, round
  return half_t{uint16_t(sign | (u >> 13))};
}

}  // namespace pydiff
