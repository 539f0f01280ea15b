"""Memory of a training step, known before the first one: a batch that will not fit is refused
with a split that will (or, with train.auto_accum=true, trained as that split).

Every activation of a step has a batch dimension, so the step's peak is linear in the batch:

    peak(B) = fixed + B * per_window
    fixed      = parameters + gradients + AdamW's two moments + chain/replay buffers
    per_window = what one window of T tokens adds, measured on one training step on 1-2 windows:
                 CUDA: the caching allocator's peak (saved tensors and temporaries alike)
                 CPU:  no allocator statistics, so the saved-bytes meter (the peak of storages
                       autograd holds for backward) x ALLOC_OVER_SAVED, plus V_TRANSIENTS fp32
                       (T, V) tensors alive in a think step's backward, x RSS_OVER_ALLOC for
                       what glibc keeps resident (all three measured, docs/gpu.md)

The measuring step runs on the real model with the real autocast and leaves no trace: RNG
states are restored, gradients dropped, and chain/replay state lives in a throwaway copy.
"""
from __future__ import annotations

import dataclasses
import os
import random
import weakref

import torch
import torch.distributed as dist

ALLOC_OVER_SAVED = 1.2   # CPU allocation peak / saved bytes, small vocabularies (profiler)
V_TRANSIENTS = 5         # (T, V) fp32 temporaries of a think step's backward (profiler, V=50k)
RSS_OVER_ALLOC = 1.45    # resident set / allocation peak on glibc (measured RSS slopes)
HEADROOM = 0.9           # use at most this share of the free memory
GB = 1e9


class SavedBytes:
    """Peak bytes of the storages autograd holds for backward, each storage counted once (views
    and repeated saves share one) and parameters left out (state_bytes counts them). CPU has no
    allocator statistics; these activations are what grows with think_steps."""

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


def state_bytes(model, opt) -> int:
    """Parameters, their gradients and the optimizer's state (AdamW: two moments)."""
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    st = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
             if torch.is_tensor(t))
    return 2 * n + st


def fixed_bytes(model, T: int) -> int:
    """Parameters + gradients + AdamW moments (fp32), and the buffers energy shaping keeps:
    replay records and persistent chains hold (T, V) logits each, fast_pcd a copy of the weights."""
    mc = model.cfg
    n_bytes = sum(p.numel() * 4 for p in model.parameters())
    chains = {"pcd": mc.n_persistent, "fast_pcd": mc.n_chains}.get(mc.contrastive_type, 0) \
        if mc.use_contrastive else 0
    logits_rows = mc.replay_buffer_size + chains
    fast = n_bytes if mc.use_contrastive and mc.contrastive_type == "fast_pcd" else 0
    return 4 * n_bytes + logits_rows * T * (mc.vocab_size * 4 + 16) + fast


def _one_step(model, x, y, autocast) -> None:
    from nanoebm.losses import forward_backward  # late: losses imports the model, not the reverse
    from nanoebm.shaping import EnergyShaping
    shaping = EnergyShaping(model.cfg, model)  # throwaway chains and replay buffer
    with autocast:
        forward_backward(model, x, y, scale=1.0, shaping=shaping)


def step_bytes(model, x, y, autocast) -> int:
    """Peak bytes one training step on x, y (b, T) adds beyond the weights (see module doc).
    RNG states are restored and the gradients dropped (it runs before any training step)."""
    cfg, dev = model.cfg, x.device
    states = (torch.get_rng_state(), random.getstate(),
              torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None)
    # the longest chain of think_steps..think_steps+random (the one that needs most memory)
    model.cfg = dataclasses.replace(cfg, think_steps=cfg.think_steps + cfg.think_steps_random,
                                    think_steps_random=0)
    try:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
            _one_step(model, x, y, autocast)
            torch.cuda.synchronize(dev)
            grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters()
                        if p.grad is not None)  # in fixed_bytes already
            return torch.cuda.max_memory_allocated(dev) - base - grads
        meter = SavedBytes(model.parameters())
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
            _one_step(model, x, y, autocast)
        rows, T = x.shape
        think = cfg.think_steps + cfg.think_steps_random > 0
        v_tmp = V_TRANSIENTS * rows * T * cfg.vocab_size * 4 if think else 0
        return int(RSS_OVER_ALLOC * (ALLOC_OVER_SAVED * meter.peak + v_tmp))
    finally:
        model.cfg = cfg
        model.zero_grad(set_to_none=True)
        torch.set_rng_state(states[0])
        random.setstate(states[1])
        if states[2] is not None:
            torch.cuda.set_rng_state(states[2], dev)


def per_window(model, batch, autocast, two_points: bool) -> tuple[int, int]:
    """(bytes per window, bytes per step) of activations; batch(b) gives b windows. From one
    window, or, where some activations do not scale with the batch (autocast's bf16 copies of
    the weights, CUDA workspaces), from the slope between one window and two."""
    one = step_bytes(model, *batch(1), autocast)
    if not two_points:
        return one, 0
    two = step_bytes(model, *batch(2), autocast)
    return max(two - one, 0), max(2 * one - two, 0)


def free_bytes(device: str) -> int | None:
    """Memory this process can still take: CUDA free device memory plus what torch's cache holds
    unused; CPU available RAM, capped by a cgroup limit; None where unknown (mps)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return free + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
    if dev.type != "cpu":
        return None
    room = [v for v in (_mem_available(), _cgroup_room()) if v is not None]
    return min(room) if room else None


def _mem_available() -> int | None:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_room() -> int | None:
    """cgroup v2 limit minus usage (reclaimable file pages count as free), None if unlimited."""
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        if limit == "max":
            return None
        used = int(open("/sys/fs/cgroup/memory.current").read())
        stat = dict(line.split() for line in open("/sys/fs/cgroup/memory.stat"))
        return int(limit) - used + int(stat.get("inactive_file", 0))
    except (OSError, ValueError):
        return None


def _min_over_ranks(x: int, device: str) -> int:
    """Under DDP every rank must pick the same split: plan for the tightest device."""
    if not (dist.is_available() and dist.is_initialized()):
        return x
    t = torch.tensor(float(x), device=device if device.startswith("cuda") else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def fmt(n: float) -> str:
    if n < 0.1 * GB:
        return f"{n / 1e6:.1f} MB"
    return f"{n / GB:.2f} GB" if n < 10 * GB else f"{n / GB:.1f} GB"


def largest_fit(rows: int, per_row: float, fixed: float, room: float) -> int:
    """Largest micro-batch b dividing rows (so rows / b micro-batches keep the global batch)
    with fixed + b * per_row <= room; 0 when not even one window fits."""
    return max((b for b in range(1, rows + 1) if rows % b == 0 and fixed + b * per_row <= room),
               default=0)


def step_estimate(model, data, T: int, device: str, autocast) -> tuple[int, int]:
    """(bytes per window, fixed bytes) of a training step on windows of T tokens: the peak is
    fixed + B * per_window."""
    gen = torch.Generator().manual_seed(0)  # its own windows: the training order is untouched
    batch = lambda b: data.get_batch("train", b, T, gen, device)  # noqa: E731
    two_points = isinstance(autocast, torch.autocast) or device.startswith("cuda")
    if device.startswith("cuda"):  # the first step also allocates the cuBLAS workspaces for good
        step_bytes(model, *batch(1), autocast)
    row, per_step = per_window(model, batch, autocast, two_points)
    if model.cfg.replay_buffer_size > 0:  # replay rows join every micro-batch
        row = int(row * (1 + model.cfg.replay_fraction))
    return row, fixed_bytes(model, T) + per_step


def fit_batch(cfg, model, data, device: str, autocast, verbose: bool = True):
    """Before the first step: estimate its peak memory and compare it with the free memory.
    Returns cfg, with the batch split into accumulated micro-batches (same global batch) when
    it does not fit and train.auto_accum is set; otherwise a batch that does not fit is a
    ValueError naming the estimate, the free memory and a split that fits."""
    from nanoebm.config import ModelConfig  # the schema's own defaults: the GPU-sized model
    mc, tc, B, T = model.cfg, cfg.train, cfg.data.batch_size, cfg.data.block_size
    default = ModelConfig()
    if verbose and device == "cpu" and (mc.n_layer, mc.n_head, mc.n_embd) == \
            (default.n_layer, default.n_head, default.n_embd):
        print(f"note: the default model ({mc.n_layer} layers x {mc.n_embd} dims, batch {B} x {T}) "
              "is sized for a GPU; on a CPU start with experiment=cpu")
    free = free_bytes(device)
    if tc.max_steps == 0 or free is None:
        return cfg
    free = _min_over_ranks(free, device)
    row, fixed = step_estimate(model, data, T, device, autocast)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # already allocated
    room = HEADROOM * (free + weights)
    need, rows = fixed + B * row, B * tc.grad_accum_steps
    msg = (f"a training step needs about {fmt(need)} ({B} windows x {fmt(row)} + {fmt(fixed)} "
           f"weights and optimizer) and {device} has {fmt(free)} free")
    if need <= room:
        if verbose:
            print(f"memory: {msg}")
        return cfg
    b = largest_fit(rows, row, fixed, room)
    if b == 0:
        raise ValueError(f"{msg}, too little for even one window: lower data.block_size or "
                         "the model size, or use a device with more memory")
    split = f"data.batch_size={b} train.grad_accum_steps={rows // b}"
    if not tc.auto_accum:
        raise ValueError(f"{msg}: use {split} (the same {rows} windows per step), or "
                         "train.auto_accum=true to apply that split")
    if verbose:
        print(f"memory: {msg}: training with {split} (train.auto_accum)")
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=b),
                               train=dataclasses.replace(tc, grad_accum_steps=rows // b))
