"""Ahead-of-time GPU compiles for the tests, without a GPU: Triton compiles a kernel for a target
compute capability, Triton's bundled ptxas assembles the PTX, and the tests read the PTX, the
shared memory, the register count and the spills.  Compile scripts run in a subprocess without
TRITON_INTERPRET (the interpreter's language functions cannot be compiled)."""
import json
import os
import re
import subprocess
import sys
import tempfile


def ptxas_path():
    """Triton's bundled ptxas, or None (no triton, or a build without it)."""
    try:
        import triton
    except ImportError:
        return None
    p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return p if os.path.exists(p) else None


def assemble(kernel, cap) -> dict:
    """Assemble a compiled Triton kernel's PTX for ``sm_XY`` (``sm_90a`` for (9, 0)); returns its
    ``ptx``, ``shared`` memory bytes, ``spills`` (bytes of spill stores) and ``regs``."""
    arch = "sm_%d%d" % tuple(cap) + ("a" if tuple(cap) == (9, 0) else "")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(kernel.asm["ptx"])
        r = subprocess.run([ptxas_path(), "-arch=" + arch, "-v", path, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True, check=True)
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", r.stderr))
    regs = max([int(n) for n in re.findall(r"Used (\d+) registers", r.stderr)] or [0])
    return dict(ptx=kernel.asm["ptx"], shared=kernel.metadata.shared, spills=spills, regs=regs)


def run_script(script: str, timeout: int = 600) -> dict:
    """Run a compile script that prints one JSON object, outside the checkout (so the installed
    pydiff, with pydiff.triton_kernels, is imported) and with this folder importable (``_aot``)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    here = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=timeout,
                       cwd=tempfile.gettempdir())
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout)
