"""Memory of a training step, known before the first one: a batch that will not fit is refused
with a split that will (or, with train.auto_accum=true, trained as that split).

Every activation has a batch dimension, so peak(B) = fixed + B * per_window, where fixed is the
weights, gradients, AdamW's two moments and the chain/replay buffers, and per_window is measured
on one real training step of 1-2 windows: on CUDA the allocator's peak; on CPU, which keeps no
allocator statistics, the peak of the storages saved for backward x ALLOC_OVER_SAVED, plus
V_TRANSIENTS fp32 (T, V) temporaries of a think step's backward, x RSS_OVER_ALLOC for what glibc
keeps resident (all three measured, docs/gpu.md).
"""
import contextlib
import dataclasses
import random
import weakref
from collections import Counter

import torch
import torch.distributed as dist

ALLOC_OVER_SAVED = 1.2   # CPU allocation peak / saved bytes, small vocabularies (profiler)
V_TRANSIENTS = 5         # (T, V) fp32 temporaries of a think step's backward (profiler, V=50k)
RSS_OVER_ALLOC = 1.45    # resident set / allocation peak on glibc (measured RSS slopes)
HEADROOM = 0.9           # use at most this share of the free memory


class SavedBytes:
    """pack and unpack, as saved_tensors_hooks, meter the peak bytes of the storages autograd
    saves for backward, each counted once (views share one) and parameters left out."""

    def __init__(self, params):
        self.skip = {p.untyped_storage().data_ptr() for p in params}
        self.users = Counter()  # storage pointer -> saved tensors holding it
        self.now = self.peak = 0

    def pack(self, t):
        st, holder = t.untyped_storage(), lambda: t  # autograd keeps the holder in t's place
        if (key := st.data_ptr()) not in self.skip:
            if not self.users[key]:
                self.now += st.nbytes()
                self.peak = max(self.peak, self.now)
            self.users[key] += 1
            weakref.finalize(holder, self._free, key, st.nbytes())  # when autograd drops it
        return holder

    unpack = staticmethod(lambda holder: holder())

    def _free(self, key, nbytes):
        self.users[key] -= 1
        if not self.users[key]:
            self.now -= nbytes


def step_bytes(model, x, y, autocast) -> int:
    """Peak bytes one training step on x, y (b, T) adds beyond the weights (see module doc),
    leaving no trace: RNG states restored, gradients dropped, chains and replay buffer new."""
    from nanoebm.losses import forward_backward  # late: losses imports the model, not the reverse
    from nanoebm.shaping import EnergyShaping
    cfg, dev, cuda, py_rng = model.cfg, x.device, x.device.type == "cuda", random.getstate()
    meter = SavedBytes(model.parameters())
    hooks = contextlib.nullcontext() if cuda else \
        torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack)
    # the longest chain of think_steps..think_steps+random (the one that needs most memory)
    model.cfg = dataclasses.replace(cfg, think_steps=cfg.think_steps + cfg.think_steps_random,
                                    think_steps_random=0)
    try:
        with torch.random.fork_rng([dev] if cuda else []):
            if cuda:
                torch.cuda.synchronize(dev)
                torch.cuda.reset_peak_memory_stats(dev)
                base = torch.cuda.memory_allocated(dev)
            with hooks, autocast:
                forward_backward(model, x, y, scale=1.0, shaping=EnergyShaping(model.cfg, model))
            if cuda:  # less the gradients, which the fixed bytes count
                torch.cuda.synchronize(dev)
                grads = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
                return torch.cuda.max_memory_allocated(dev) - base - grads
        v_tmp = V_TRANSIENTS * x.numel() * cfg.vocab_size * 4 if model.cfg.think_steps > 0 else 0
        return int(RSS_OVER_ALLOC * (ALLOC_OVER_SAVED * meter.peak + v_tmp))
    finally:
        model.cfg = cfg
        model.zero_grad(set_to_none=True)
        random.setstate(py_rng)


def step_estimate(model, data, T: int, device: str, autocast) -> tuple[int, int]:
    """(per_window, fixed) bytes of a training step on windows of T tokens (see module doc)."""
    gen = torch.Generator().manual_seed(0)  # its own windows: the training order is untouched
    step = lambda b: step_bytes(model, *data.get_batch("train", b, T, gen, device), autocast)
    cuda, mc = device.startswith("cuda"), model.cfg
    if cuda:  # the first step also allocates the cuBLAS workspaces for good
        step(1)
    row, per_step = step(1), 0
    # Some activations do not scale with the batch (autocast's bf16 copies of the weights, CUDA
    # workspaces): there the per-window part is the slope between one window and two.
    if cuda or isinstance(autocast, torch.autocast):
        two = step(2)
        row, per_step = max(two - row, 0), max(2 * row - two, 0)
    if mc.replay_buffer_size > 0:  # replay rows join every micro-batch
        row = int(row * (1 + mc.replay_fraction))
    # fp32 weights, gradients and AdamW's two moments, and fast_pcd's fast weights; replay
    # records and persistent chains hold (T, V) logits each
    n = sum(p.numel() * 4 for p in model.parameters())
    kind = mc.contrastive_type if mc.use_contrastive else None
    records = mc.replay_buffer_size + {"pcd": mc.n_persistent, "fast_pcd": mc.n_chains}.get(kind, 0)
    return row, (4 + (kind == "fast_pcd")) * n + records * T * (mc.vocab_size * 4 + 16) + per_step


def free_bytes(device: str) -> int | None:
    """Memory this process can still take: CUDA free device memory plus what torch's cache holds
    unused; CPU available RAM, capped by a cgroup limit; None where unknown (mps)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return free + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
    if dev.type != "cpu":
        return None
    room = []
    with contextlib.suppress(OSError):  # what Linux can hand out without swapping
        room += [int(line.split()[1]) * 1024 for line in open("/proc/meminfo")
                 if line.startswith("MemAvailable:")]
    with contextlib.suppress(OSError, ValueError):  # a container's cgroup v2 limit ("max": none)
        cg = lambda name: open(f"/sys/fs/cgroup/memory.{name}").read()
        stat = dict(line.split() for line in cg("stat").splitlines())  # file cache is reclaimable
        room.append(int(cg("max")) - int(cg("current")) + int(stat.get("inactive_file", 0)))
    return min(room, default=None)


def largest_fit(rows: int, per_row: float, fixed: float, room: float) -> int:
    """Largest micro-batch b dividing rows (so rows / b micro-batches keep the global batch)
    with fixed + b * per_row <= room; 0 when not even one window fits."""
    return max((b for b in range(1, rows + 1) if rows % b == 0 and fixed + b * per_row <= room),
               default=0)


def fit_batch(cfg, model, data, device: str, autocast, verbose: bool = True):
    """Before the first step: estimate its peak memory and compare it with the free memory. A
    batch that does not fit is a ValueError naming both and a split into accumulated
    micro-batches (same global batch) that fits; with train.auto_accum, cfg with that split."""
    tc, B, T = cfg.train, cfg.data.batch_size, cfg.data.block_size
    free = free_bytes(device)
    if tc.max_steps == 0 or free is None:
        return cfg
    if dist.is_available() and dist.is_initialized():  # DDP: every rank must pick the same split,
        t = torch.tensor(float(free), device=device)  # the one for the tightest device
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        free = int(t.item())
    row, fixed = step_estimate(model, data, T, device, autocast)
    weights = sum(p.nbytes for p in model.parameters())  # allocated already, so not free
    fmt = lambda n: f"{n / 1e6:.1f} MB" if n < 1e8 else f"{n / 1e9:.{2 if n < 1e10 else 1}f} GB"
    room, need, rows = HEADROOM * (free + weights), fixed + B * row, B * tc.grad_accum_steps
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
