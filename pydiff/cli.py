"""The ``pydiff`` command.

    pydiff info                 what this install was built with, and the backends per device
    pydiff bench [args...]      run the benchmarks (bench/run.py of the source checkout in the
                                current directory; same arguments, e.g. --quick)
    pydiff demo [--out PNG]     sampler accuracy vs steps on an analytic Gaussian mixture (CPU,
                                under a minute): prints the tables, writes a PNG plot
"""
from __future__ import annotations

import os
import runpy
import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = argv.pop(0) if argv else "info"
    if cmd == "info":
        import torch

        import pydiff

        print(pydiff.build_info())
        print("cpu backends:", pydiff.available_backends(torch.device("cpu")))
        if torch.cuda.is_available():
            print(f"cuda backends ({torch.cuda.get_device_name()}):", pydiff.available_backends(torch.device("cuda")))
        return 0
    if cmd == "bench":
        path = os.path.join(os.getcwd(), "bench", "run.py")
        if not os.path.exists(path):
            print("pydiff bench: run it from the pydiff source checkout (bench/run.py not found here)", file=sys.stderr)
            return 2
        sys.argv = [path] + argv
        try:
            runpy.run_path(path, run_name="__main__")
        except SystemExit as e:
            return int(e.code or 0)
        return 0
    if cmd == "demo":
        from pydiff.demo import main as demo_main

        return demo_main(argv)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
