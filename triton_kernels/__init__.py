"""Triton kernels of pydiff (installed as ``pydiff.triton_kernels``): one file per family, each a
kernel plus its launcher.  They run on any GPU Triton supports, and on CPU tensors in Triton's
interpreter (``TRITON_INTERPRET=1``, set before triton is imported), which is how CI tests them.
"""
