"""Build and install pydiff (import name ``pydiff``; distribution name ``pydiff-kernels``).

    pip install --no-build-isolation .          # torch must already be installed

The compiled extension ``pydiff._C`` always gets the C++ CPU kernels; it gets the CUDA kernels when
torch is a CUDA build and nvcc is found (no GPU is needed to compile).  Environment variables:

    PYDIFF_CUDA_ARCHS   CUDA architectures, ';'-separated (default "8.0;9.0a"); "+PTX" adds PTX
    PYDIFF_NO_CUDA=1    build the CPU kernels only
    PYDIFF_NO_EXT=1     build nothing: pure Python (Triton and torch backends only)
    CUDA_HOME           the CUDA toolkit (default /usr/local/cuda when it has bin/nvcc)
    MAX_JOBS            parallel compile jobs (ninja)

The same csrc/ kernels build without Python through CMakeLists.txt (a C++ library and ctest tests).
"""
import glob
import os
import sys
import warnings

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
if not os.environ.get("CUDA_HOME") and os.path.exists("/usr/local/cuda/bin/nvcc"):
    # torch would otherwise follow a symlinked nvcc on PATH to the wrong root
    os.environ["CUDA_HOME"] = "/usr/local/cuda"


def _arch_list(archs: str) -> list:
    """PYDIFF_CUDA_ARCHS ("8.0;9.0a+PTX", ';' or ',' separated) -> ["8.0", "9.0a+PTX"]."""
    return [s.strip() for s in archs.replace(",", ";").split(";") if s.strip()]


def _gencode(archs: str) -> list:
    flags = []
    for a in _arch_list(archs):
        ptx = a.endswith("+PTX")
        a = a.replace("+PTX", "")
        num = a.replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def _extensions():
    if os.environ.get("PYDIFF_NO_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension as ce
    except ImportError:
        warnings.warn("pydiff: torch is not installed at build time; building without the compiled extension")
        return [], {}
    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))  # noqa
    # kernels: csrc/<family>/*_cpu.cpp and *_cuda.cu; registrations: csrc/bindings/*.cpp (*_cuda.cpp with CUDA)
    kernels = lambda pat: [p for p in rel(pat) if not p.startswith(os.path.join("csrc", "tests"))]  # noqa: E731
    sources = kernels("csrc/*/*_cpu.cpp") + [p for p in rel("csrc/bindings/*.cpp") if not p.endswith("_cuda.cpp")]
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math", "-Wno-psabi"]  # torch picks the C++ standard its headers need
    with_cuda = (os.environ.get("PYDIFF_NO_CUDA") != "1" and torch.version.cuda is not None
                 and ce.CUDA_HOME is not None and os.path.exists(os.path.join(ce.CUDA_HOME, "bin", "nvcc")))
    archs = os.environ.get("PYDIFF_CUDA_ARCHS", "8.0;9.0a")
    if with_cuda:
        sources += kernels("csrc/*/*_cuda.cu") + rel("csrc/bindings/*_cuda.cpp")
        cxx += ["-DPYDIFF_WITH_CUDA", f'-DPYDIFF_CUDA_ARCHS="{archs}"']
        # ATen's CUDA headers want cusparse.h, which some toolkits lack: pip's nvidia headers have it
        for p in sys.path:
            inc = os.path.join(p, "nvidia", "cu13", "include")
            if os.path.isdir(inc):
                include_dirs.append(inc)
                break
        nvcc = ["-O3", "-std=c++17"] + _gencode(archs)
        if "9.0a" in [a.replace("+PTX", "") for a in _arch_list(archs)]:
            nvcc.append("-DPYDIFF_CUDA_SM90A")  # the sm_90 image has wgmma (quant_gemm_cuda.cu: use_wgmma)
        ext = ce.CUDAExtension(
            "pydiff._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"])
    else:
        if os.environ.get("PYDIFF_NO_CUDA") != "1" and torch.version.cuda is not None:
            warnings.warn("pydiff: nvcc not found (set CUDA_HOME); building the CPU kernels only")
        ext = ce.CppExtension("pydiff._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx},
                              extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": ce.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="pydiff-kernels",
    version="0.1.0",
    description="Performance kernels for diffusion models: fused solver steps, W4A4, exact categorical sampling",
    packages=find_packages(include=["pydiff", "pydiff.*"]) + ["pydiff.triton_kernels"],
    package_dir={"pydiff.triton_kernels": "triton_kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"test": ["pytest", "diffusers"], "triton": ["triton"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["pydiff=pydiff.cli:main"]},
    zip_safe=False,
)
