"""Memory meters for CPU runs, where torch keeps no allocator statistics.

SavedBytes counts what autograd holds for backward: install it with
torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack) around a training step and
read meter.peak. These activations are what grows with think_steps (parameters, gradients and
optimizer state are fixed and counted separately).
"""
from __future__ import annotations

import weakref


class SavedBytes:
    """Peak bytes of the storages autograd holds for backward, each storage counted once (views
    and repeated saves share one) and parameters left out."""

    def __init__(self, params):
        self.skip = {p.untyped_storage().data_ptr() for p in params}
        self.live = {}  # storage pointer -> [bytes, number of saved tensors using it]
        self.now = self.peak = 0

    def pack(self, t):
        st = t.untyped_storage()
        key = st.data_ptr()
        if key not in self.skip:
            if key not in self.live:
                self.live[key] = [st.nbytes(), 0]
                self.now += st.nbytes()
                self.peak = max(self.peak, self.now)
            self.live[key][1] += 1
        holder = _Holder(t)
        if key not in self.skip:
            weakref.finalize(holder, self._free, key)  # runs when autograd drops the tensor
        return holder

    @staticmethod
    def unpack(h):
        return h.t

    def _free(self, key):
        rec = self.live[key]
        rec[1] -= 1
        if rec[1] == 0:
            self.now -= rec[0]
            del self.live[key]


class _Holder:
    def __init__(self, t):
        self.t = t
