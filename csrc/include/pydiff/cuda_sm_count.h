// The current CUDA device's multiprocessor count for grid sizing, queried once per device: a
// cudaDeviceGetAttribute call per launch is host time on every eager call, and the count never
// changes. (Under the CPU emulator it is queried every time: its tests vary the count.)
#pragma once
#include <cuda_runtime.h>

#include <atomic>

namespace pydiff {

inline int current_sm_count(int fallback = 132) {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return fallback;
#ifndef PYDIFF_CUDA_EMU
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices];
  if (dev >= 0 && dev < kMaxDevices) {
    const int n = cache[dev].load(std::memory_order_relaxed);
    if (n > 0) return n;
  }
#endif
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) return fallback;
#ifndef PYDIFF_CUDA_EMU
  if (dev >= 0 && dev < kMaxDevices) cache[dev].store(n, std::memory_order_relaxed);
#endif
  return n;
}

}  // namespace pydiff
