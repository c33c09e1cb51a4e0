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
// Branch-free (every case computed, then selected), so the conversion loops of the kernels vectorise:
// with branches, an fp16 solver step ran 7.7x slower than fp32. csrc/tests/test_cpu_types.cpp checks
// all 65536 fp16 values and ~10^8 floats against IEEE conversions.
inline float to_float(half_t v) {
  const uint32_t h = v.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;                              // exponent and mantissa
  uint32_t bits = (em << 13) + 0x38000000u;                      // normal: exponent rebiased by 127 - 15
  bits = em >= 0x7c00u ? bits + 0x38000000u : bits;              // inf / nan: exponent 31 -> 255
  const float sub = float(int32_t(em)) * 5.9604644775390625e-08f;  // zero / subnormal: mant * 2^-24 (exact)
  const uint32_t mag = em < 0x0400u ? float_to_bits(sub) : bits;
  return bits_to_float(mag | sign);
}

template <typename T> inline T from_float(float f);
template <> inline float from_float<float>(float f) { return f; }
template <> inline bf16_t from_float<bf16_t>(float f) {  // round to nearest even, branch-free
  const uint32_t u = float_to_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t nan = (u >> 16) | 0x40u;  // quiet nan, sign kept
  return bf16_t{uint16_t((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded)};
}
template <> inline half_t from_float<half_t>(float f) {  // round to nearest even; branch-free as to_float
  const uint32_t x = float_to_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t u = x & 0x7fffffffu;
  // normal: rebias the exponent (-112 << 23) and round the 13 dropped bits to nearest even
  const uint32_t normal = (u + 0xc8000fffu + ((u >> 13) & 1u)) >> 13;
  // subnormal or zero (|f| < 2^-14): |f| * 2^24 rounded to an integer by adding 2^23 (ulp 1 there)
  const uint32_t sub = float_to_bits(bits_to_float(u) * 16777216.0f + 8388608.0f) - 0x4b000000u;
  uint32_t r = u < 0x38800000u ? sub : normal;
  r = u >= 0x477ff000u ? 0x7c00u : r;  // overflow (>= 65520 rounds past the largest fp16) and inf
  r = u > 0x7f800000u ? 0x7e00u : r;   // nan: a quiet nan
  return half_t{uint16_t(sign | r)};
}

}  // namespace pydiff
