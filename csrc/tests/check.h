// A minimal check macro for the C++ tests: prints the failure and counts it (main returns nonzero).
#pragma once
#include <cstdio>

namespace pydiff_test {
inline int failures = 0;
}

#define CHECK(cond, ...)                               \
  do {                                                 \
    if (!(cond)) {                                     \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
      std::printf(__VA_ARGS__);                        \
      std::printf("\n");                               \
      ++pydiff_test::failures;                         \
    }                                                  \
  } while (0)
