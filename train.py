"""Train an Energy-Based Transformer (or, with model.think_steps=0, its plain-transformer baseline).

    uv run python train.py                                # GPU defaults, bundled Shakespeare
    uv run python train.py experiment=cpu                 # the small CPU preset
    uv run python train.py model.think_steps=2 train.max_steps=500 --train.seed=7
    torchrun --nproc_per_node=8 train.py ...              # DDP (nccl on GPU, gloo on CPU)

train() reads top to bottom: setup, data, model and optimizer, resume, run folder, the loop.
Options live in nanoebm/config.py (typos fail); `python train.py --cfg job` prints them.
"""
from __future__ import annotations

import dataclasses
import math
import random
import time
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from nanoebm import runtime as rt
from nanoebm.checkpoint import (atomic_save, carry_metrics, load_checkpoint, point_link,
                                restore_training, resume_config)
from nanoebm.config import TrainRunConfig
from nanoebm.cli import apply_cli_shims, register_configs
from nanoebm.console import Clock, eval_line, fmt_time, train_line, train_row
from nanoebm.data import continue_record, load_data, new_segment
from nanoebm.losses import curve_metrics, forward_backward, thinking_curve
from nanoebm.memory import fit_batch
from nanoebm.model import EBT
from nanoebm.shaping import EnergyShaping, val_energy_margin


class TrainingDiverged(RuntimeError):
    """A non-finite loss: stop before the bad state reaches a checkpoint."""


def train(cfg: TrainRunConfig, cli_keys: frozenset = frozenset()) -> dict:
    """The whole training run; returns a summary dict (run_dir, steps, last eval metrics).
    cli_keys: the options the command line set (a resume keeps the checkpoint's other ones)."""
    # ---------------------------------------------------------------------------- setup
    # One process per device. Under torchrun every rank runs this same function on its own
    # rows of each batch; the gradients are averaged by hand after each backward (see below).
    tc = cfg.train
    rank, _, world, device = rt.ddp_setup(rt.pick_device(tc.device))
    master = rank == 0  # rank 0 alone writes files and prints
    autocast, dtype = rt.autocast_for(device, tc.dtype)  # bf16 on CUDA, plain fp32 on CPU
    torch.manual_seed(tc.seed)  # same seed on every rank: identical initial weights
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # ----------------------------------------------------------------------------- data
    # The corpus as one memory-mapped token array per split. A resumed run takes its model
    # config from the checkpoint (not the command line), so the data must have its vocabulary.
    data = load_data(cfg.data, rank=rank, world=world)
    resume = load_checkpoint(cfg.load_checkpoint) if cfg.load_checkpoint else None
    if resume is not None:
        cfg = resume_config(cfg, resume, data.meta, cli_keys)
    B, T, accum = cfg.data.batch_size, cfg.data.block_size, tc.grad_accum_steps

    # --------------------------------------------------------------- model and optimizer
    model = EBT(cfg.model.resolved(data.vocab_size, T)).to(device)
    rt.set_threads(tc.threads, model.num_params())
    torch.manual_seed(tc.seed + rank)  # from here on: per-rank noise, dropout, random K
    random.seed(tc.seed + rank)
    # AdamW with weight decay on matrices only; the step size alpha gets its own learning rate
    groups = model.optim_groups(tc.weight_decay, tc.learning_rate, model.cfg.think_lr_lr_multiplier)
    opt = torch.optim.AdamW(groups, lr=tc.learning_rate, betas=(tc.beta1, tc.beta2),
                            fused=device.startswith("cuda"))
    # contrastive chains, fast weights, replay buffer: state beside the model, checkpointed too
    shaping = EnergyShaping(model.cfg, model)
    # one data order for all ranks: each keeps its rows of the global batch (world x B windows)
    data_gen = torch.Generator().manual_seed(tc.seed)

    # ---------------------------------------------------------------------------- resume
    # Weights, AdamW moments, every random stream and the shaping state come back, so the
    # losses continue exactly. The sampler's record gets a segment per start or resume:
    # replaying it gives every window the run trained on (lab/coverage.py).
    step = restore_training(resume, model, opt, data_gen, shaping, rank, device) if resume else 0
    if master and device == "cpu" and model.num_params() > rt.SMALL_MODEL:  # GPU-sized, on a CPU
        print(cpu_time_note(cfg, model, data, autocast, step))
    cfg = fit_batch(cfg, model, data, device, autocast, verbose=master)  # too big: stop or split
    B, accum = cfg.data.batch_size, cfg.train.grad_accum_steps
    sampler = continue_record(resume.get("sampler"), step) if resume is not None else []
    if sampler is not None:
        sampler.append(new_segment(data_gen, step, accum, world * B, len(data.train) - T - 1, T))
    if tc.compile:  # only the context stream: torch.compile has no double backward
        model.context = torch.compile(model.context)
    # Fixed val batches: every evaluation, and every k of its thinking curve, sees the same
    # windows, so differences between evaluations are the model's, not the sample's.
    eval_gen = torch.Generator().manual_seed(tc.seed + 12345)
    val_batches = [data.get_batch("val", B, T, eval_gen, device) for _ in range(tc.eval_iters)]
    run_dir, log = start_run(cfg, model, data, step, device, dtype, world) if master else (None, None)

    # -------------------------------------------------------------------------- the loop
    clock, start_step, last_eval, pace_from = Clock(), step, {}, None
    try:
        while True:
            # Evaluate every eval_interval steps and at the end. The clock is paused, so
            # elapsed_s and tokens/s count training time only.
            if step % tc.eval_interval == 0 or step == tc.max_steps:
                elapsed = clock.elapsed()
                with clock.paused():
                    last_eval = estimate_loss(model, val_batches, tc.seed, data.bits_name, autocast, step,
                                              tc.think_neutral)
                    if master:
                        log.write({"step": step, "elapsed_s": elapsed, **last_eval})
                        print(eval_line(step, last_eval, data.bits_name))
            if step >= tc.max_steps:
                break

            # Learning rate: linear warm-up, then cosine decay to min_lr (alpha: x its multiplier).
            lr = rt.scheduled_lr(step, tc)
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_mult"]

            # Forward, think, backward. The backward happens inside forward_backward (step by
            # step where that gives the same gradients), so micro-batches accumulate in .grad.
            log_now = master and (step % tc.log_interval == 0 or step == tc.max_steps - 1)
            for micro in range(accum):
                x, y = data.get_batch("train", B, T, data_gen, device, rank, world)
                with autocast:
                    loss, m = forward_backward(model, x, y, scale=1.0 / accum, shaping=shaping,
                                               want_metrics=log_now and micro == accum - 1)

            # Average the gradients over ranks, clip, step.
            rt.allreduce_grads(model.parameters(), world)
            if tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step == start_step + 3:  # the pace is measured from here: first steps warm up
                pace_from = (clock.elapsed(), step)

            # Log and checkpoint. loss.item() waits for the device: the loop's only host sync,
            # so it happens only here, and a non-finite loss stops before anything is saved.
            save_now = tc.save_interval > 0 and step % tc.save_interval == 0
            if (log_now or save_now) and not math.isfinite(loss.item()):
                raise TrainingDiverged(f"loss is {loss.item()} at step {step}")
            if log_now:
                n_tok = B * T * accum * world  # tokens per step, all ranks
                tok_s = n_tok * (tc.log_interval if step > start_step + 1 else 1) / max(clock.lap(), 1e-9)
                row = train_row(step, loss.item(), m, lr, model.alpha.item(),
                                data.bits_name, tok_s, step * n_tok, clock.elapsed())
                log.write(row)
                eta = None if pace_from is None or step == pace_from[1] else (
                    (clock.elapsed() - pace_from[0]) / (step - pace_from[1]) * (tc.max_steps - step))
                print(train_line(row, tc.max_steps, data.bits_name, eta))
            if save_now:
                save(run_dir, f"ckpt_step_{step:06d}.pt", step, model, opt, cfg, data.meta,
                     data_gen, shaping, sampler, world)
    except TrainingDiverged as e:
        raise SystemExit(f"error: training diverged: {e}. No checkpoint was written from the bad "
                         "state; lower train.learning_rate or model.think_lr, or raise "
                         "train.grad_clip, and resume from the last ckpt_step_*.pt") from None

    # ---------------------------------------------------------------------------- finish
    # out_dir/final.pt always points at the newest finished run (sample.py's default).
    final = save(run_dir, "final.pt", step, model, opt, cfg, data.meta, data_gen, shaping,
                 sampler, world)
    if master:
        point_link(Path(cfg.out_dir).expanduser() / "final.pt", final)
        print(f"done: {step} steps in {fmt_time(clock.total())} | wrote {final} "
              f"(and {Path(cfg.out_dir) / 'final.pt'})")
        if log.wandb is not None:
            log.wandb.finish()
    return {"run_dir": run_dir, "step": step, **last_eval}


def estimate_loss(model: EBT, val_batches: list, seed: int, bits: str, autocast, step: int,
                  neutral: bool = True) -> dict:
    """Val metrics on the fixed windows: loss after k = 0..K think steps (the thinking curve),
    the S1 loss and, for a model with an energy, the energy margin."""
    K, trained = model.cfg.eval_think_steps, model.cfg
    # the curve thinks as sample.py does: sharpening-neutral steps (train.think_neutral=false:
    # plain ones), whatever model.think_neutral trains with
    model.cfg = dataclasses.replace(trained, think_neutral=neutral)
    try:
        m = curve_metrics(thinking_curve(model, val_batches, K, seed=seed, autocast=autocast), bits)
        if model.has_energy:  # is the true token's energy below the prediction's and the negatives'?
            em = val_energy_margin(model, val_batches, K, seed=seed, autocast=autocast)
            m.update({f"val_{k}": v for k, v in em.items()})
    finally:
        model.cfg = trained
    if not math.isfinite(m["val_loss"]):
        raise TrainingDiverged(f"val loss is {m['val_loss']} at step {step}")
    return m


def cpu_time_note(cfg: TrainRunConfig, model: EBT, data, autocast, step: int) -> str:
    """How long this run would take here, from a training step on one window (timed the second
    time: the first pays one-off allocations; random streams and gradients are left as they
    were), and the CPU preset's command."""
    B, T, tc = cfg.data.batch_size, cfg.data.block_size, cfg.train
    x, y = data.get_batch("train", 1, T, torch.Generator().manual_seed(0))
    py_state = random.getstate()
    with torch.random.fork_rng():
        for _ in range(2):
            t0 = time.perf_counter()
            with autocast:
                forward_backward(model, x, y, shaping=EnergyShaping(model.cfg, model))
    random.setstate(py_state)
    model.zero_grad(set_to_none=True)
    total = (time.perf_counter() - t0) * B * tc.grad_accum_steps * (tc.max_steps - step)
    return (f"note: this model ({model.num_params() / 1e6:.1f}M parameters, batch {B} x {T}) is "
            f"sized for a GPU: {tc.max_steps - step} steps would take about {fmt_time(total)} on "
            "this CPU (one window timed: batches run a little faster per window); the CPU preset "
            "trains in about 13 min on two threads: uv run python train.py experiment=cpu")


def start_run(cfg: TrainRunConfig, model: EBT, data, step: int, device, dtype, world: int):
    """Rank 0: the run folder (config.yaml, metrics.jsonl, W&B) and the opening console line.
    A resumed run's metrics.jsonl starts with the old run's history up to the resume point."""
    run_dir = rt.new_run_dir(cfg.out_dir)
    # config.yaml records what ran, with the vocabulary and block sizes filled in from the data
    cfg_dict = OmegaConf.to_container(OmegaConf.structured(cfg))
    cfg_dict["model"] = dataclasses.asdict(model.cfg)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg_dict))
    if cfg.load_checkpoint:
        carry_metrics(cfg.load_checkpoint, run_dir, step)
    log = rt.MetricsLog(run_dir / "metrics.jsonl",
                        rt.init_wandb(cfg.wandb_project, cfg.wandb_name, cfg_dict, run_dir))
    mc = model.cfg
    print(f"device {device} | dtype {dtype} | threads {torch.get_num_threads()} | world {world} | params {model.num_params() / 1e6:.2f}M"
          f" | vocab {data.vocab_size} | think_steps {mc.think_steps} ({mc.think_init} start, "
          f"{mc.think_grad} grad) | run {run_dir}")
    return run_dir, log


def save(run_dir: Path | None, name: str, step: int, model: EBT, opt, cfg: TrainRunConfig,
         meta: dict, data_gen, shaping: EnergyShaping, sampler, world: int) -> Path | None:
    """Write run_dir/name on rank 0 (atomically). Every rank's random streams and chains go in,
    so a DDP resume restores each rank's own state; all ranks must call this together."""
    states = rt.gather((rt.rng_state(data_gen), shaping.state_dict()), world)
    if run_dir is None:  # not rank 0
        return None
    path = run_dir / name
    # plain tensors and Python values only, so it loads with torch.load(weights_only=True)
    atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                 "model_config": dataclasses.asdict(model.cfg),
                 "config": OmegaConf.to_container(OmegaConf.structured(cfg)), "meta": meta,
                 "step": step, "rng": [s[0] for s in states], "shaping": [s[1] for s in states],
                 "sampler": sampler}, path)
    return path


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg) -> None:
    # Hydra composed configs/train.yaml, the presets and the command line; to_object turns that
    # into the dataclasses of nanoebm/config.py, which check every value as they are built.
    try:
        from hydra.core.hydra_config import HydraConfig
        given = frozenset(o.split("=")[0].lstrip("+~") for o in HydraConfig.get().overrides.task)
        train(OmegaConf.to_object(cfg), given)
    except (FileNotFoundError, ValueError) as e:  # bad input: one clear line, no traceback
        raise SystemExit(f"error: {e}") from None
    finally:
        if dist.is_initialized():  # torchrun: leave the process group cleanly
            dist.destroy_process_group()


if __name__ == "__main__":
    # --key=value and legacy option names are rewritten before Hydra reads sys.argv
    apply_cli_shims(schema=TrainRunConfig)
    register_configs()
    main()
