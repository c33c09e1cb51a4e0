"""Activation-memory measurement without a GPU allocator."""
import torch


def saved_bytes(fn):
    """Run ``fn()`` and count the bytes of distinct storages autograd saves for backward while it
    runs (saved-tensor hooks).  Returns ``(fn's output, bytes)``."""
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        seen[(st.data_ptr(), st.nbytes())] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())
