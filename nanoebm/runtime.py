"""Runtime plumbing shared by the entry scripts: device/dtype, DDP, run folders, logging."""
from __future__ import annotations

import json
import math
import os
import random
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path

import torch
import torch.distributed as dist


def pick_device(name: str = "auto") -> str:
    """auto: cuda > mps > cpu. An explicit device that is not available is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={name} requested but CUDA is not available: use device=auto")
    return name


def autocast_for(device: str, dtype: str = "auto"):
    """(autocast context, dtype name). auto = bf16 autocast on CUDA, plain float32 elsewhere."""
    dev_type = torch.device(device).type
    if dtype == "auto":
        dtype = "bfloat16" if dev_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if dtype == "float32":
        return nullcontext(), dtype
    if dtype not in ("bfloat16", "float16"):
        raise ValueError(f"dtype={dtype!r}: use auto, float32, bfloat16 or float16")
    return torch.autocast(device_type=dev_type, dtype=getattr(torch, dtype)), dtype


SMALL_MODEL = 5e6  # parameters: below, a CPU runs the model on at most two threads (set_threads)


def set_threads(n: int, n_params: int) -> int:
    """torch's CPU threads: n, or (0 = auto) at most two for a small model, torch's default
    (every core) otherwise. The CPU preset trains 1.4x faster on two threads than on one on an
    idle 2-core CPU (docs/speed.md), but a small model's ops are too short to split many ways,
    and many threads on a machine shared with other work run many times slower."""
    torch.set_num_threads(n or (min(2, torch.get_num_threads()) if n_params < SMALL_MODEL
                                else torch.get_num_threads()))
    return torch.get_num_threads()


# ----------------------------------------------------------------------------------- DDP
def ddp_setup(device: str):
    """Under torchrun (RANK set): init the process group (nccl on CUDA, gloo otherwise).
    Returns (rank, local_rank, world_size, device)."""
    if "RANK" not in os.environ:
        return 0, 0, 1, device
    rank, local, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if torch.device(device).type == "cuda":
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return rank, local, world, device


def allreduce_grads(params, world: int) -> None:
    """Average gradients over ranks in one flat all-reduce. Done by hand (not the DDP wrapper)
    because thinking differentiates inside the forward, which DDP's hooks don't expect."""
    if world == 1:
        return
    params = [p for p in params if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world
    i = 0
    for p in params:
        n = p.numel()
        p.grad = flat[i:i + n].view_as(p).clone()
        i += n


def gather(obj, world: int) -> list:
    """Every rank's obj, in rank order (a list of one without DDP)."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


# ------------------------------------------------------------------------------ run state
def new_run_dir(out_dir: str) -> Path:
    """out_dir/run_YYYYmmdd_HHMMSS (suffix _2, _3.. if two runs start in the same second)."""
    base = Path(os.path.expanduser(out_dir)) / datetime.now().strftime("run_%Y%m%d_%H%M%S")
    path, i = base, 1
    while True:
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            i += 1
            path = base.with_name(f"{base.name}_{i}")


def rng_state(data_gen: torch.Generator) -> dict:
    """This process's random streams: torch (dropout, noise), Python (random K), the data order."""
    st = {"torch": torch.get_rng_state(), "python": random.getstate(), "data": data_gen.get_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict, data_gen: torch.Generator) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(_as_tuple(st["python"]))
    data_gen.set_state(st["data"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _as_tuple(x):  # weights_only loading may return lists where random wants tuples
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


class MetricsLog:
    """Append JSON rows to metrics.jsonl (and W&B when enabled)."""

    def __init__(self, path: Path, wandb_run=None):
        self.path, self.wandb = path, wandb_run

    def write(self, row: dict) -> None:
        row = {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in row.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log(row, step=row.get("step"))


def init_wandb(project, name, config: dict, run_dir: Path):
    """Start W&B if asked. Without credentials it runs offline (never prompts, never hangs);
    any failure is a one-line warning, not a crash."""
    if not project:
        return None
    try:
        import wandb
        mode = os.environ.get("WANDB_MODE")
        if mode is None:
            netrc = Path.home() / ".netrc"
            has_key = os.environ.get("WANDB_API_KEY") or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())
            mode = "online" if has_key else "offline"
            if mode == "offline":
                print("wandb: no credentials found, logging offline (wandb sync later)")
        return wandb.init(project=project, name=name or run_dir.name, config=config,
                          dir=str(run_dir), mode=mode)
    except Exception as e:  # noqa: BLE001 - logging must never kill training
        print(f"warning: wandb disabled ({type(e).__name__}: {e})")
        return None


def scheduled_lr(step: int, tc) -> float:
    """train.learning_rate at this step (tc: TrainConfig): cosine_lr when decay_lr, else flat."""
    if not tc.decay_lr:
        return tc.learning_rate
    return cosine_lr(step, tc.learning_rate, tc.min_lr, tc.warmup_iters,
                     tc.lr_decay_iters or tc.max_steps)


def cosine_lr(step: int, lr: float, min_lr: float, warmup: int, decay_iters: int) -> float:
    """Linear warmup to lr, then cosine down to min_lr at decay_iters, then flat."""
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    if step >= decay_iters:
        return min_lr
    ratio = (step - warmup) / max(1, decay_iters - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)
