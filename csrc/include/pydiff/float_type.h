// Storage type tags shared by the kernel declarations (invertible.h, quant.h). No dependencies.
#pragma once

namespace pydiff {

enum class FloatType : int { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

}  // namespace pydiff
