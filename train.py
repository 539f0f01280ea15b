"""Train an Energy-Based Transformer (or, with model.think_steps=0, its plain-LM baseline).

    uv run python train.py                                # GPU defaults, bundled Shakespeare
    uv run python train.py experiment=cpu                 # a few minutes on a laptop CPU
    uv run python train.py model.think_steps=2 train.max_steps=500 --train.seed=7
    torchrun --nproc_per_node=8 train.py ...              # DDP (nccl on GPU, gloo on CPU)

Options live in nanoebm/config.py (typos fail); `python train.py --cfg job` prints them.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from nanoebm.checkpoint import atomic_save, load_checkpoint, model_config_from_dict, point_link
from nanoebm.coverage import continue_record, new_segment
from nanoebm.config import TrainRunConfig, apply_cli_shims, register_configs
from nanoebm.data import load_data
from nanoebm.evaluate import curve_metrics, thinking_curve
from nanoebm.losses import ebt_loss
from nanoebm.memory import fit_batch
from nanoebm.shaping import EnergyShaping, val_energy_margin
from nanoebm.model import EBT
from nanoebm import runtime as rt


class TrainingDiverged(RuntimeError):
    pass


def build_model(cfg: TrainRunConfig, vocab_size: int) -> EBT:
    """Fill the data-dependent sizes into the model config and build the model."""
    mc = cfg.model
    if mc.vocab_size not in (0, vocab_size):
        raise ValueError(f"model.vocab_size={mc.vocab_size} but the data has {vocab_size} tokens:"
                         " drop the override (0 = take it from the data)")
    if mc.block_size and mc.block_size < cfg.data.block_size:
        raise ValueError(f"model.block_size={mc.block_size} < data.block_size="
                         f"{cfg.data.block_size}: raise it or leave it at 0")
    for name, allowed in (("think_init", ("s1", "noise", "zeros")),
                          ("think_grad", ("probs", "logits", "hybrid")),
                          ("contrastive_type", ("cd", "pcd", "fast_pcd")),
                          ("think_loss", ("mean", "last", "linear"))):
        if getattr(mc, name) not in allowed:
            raise ValueError(f"model.{name}={getattr(mc, name)!r}: choose one of {allowed}")
    mc = dataclasses.replace(mc, vocab_size=vocab_size, block_size=mc.block_size or cfg.data.block_size)
    return EBT(mc)


def train(cfg: TrainRunConfig) -> dict:
    """The whole training run; returns a summary dict (run_dir, steps, last eval metrics)."""
    tc = cfg.train
    rank, _, world, device = rt.ddp_setup(rt.pick_device(tc.device))
    master = rank == 0
    autocast, dtype = rt.autocast_for(device, tc.dtype)
    torch.manual_seed(tc.seed)  # same seed on every rank: identical initial weights
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    data = load_data(cfg.data, rank=rank, world=world)
    resume = load_checkpoint(cfg.load_checkpoint) if cfg.load_checkpoint else None
    if resume is not None:  # the architecture comes from the checkpoint, not the command line
        cfg = dataclasses.replace(cfg, model=model_config_from_dict(resume["model_config"]))
        vocab_id = lambda m: (m.get("tokenizer"), m.get("sha256") or m.get("chars"))  # noqa: E731
        if vocab_id(resume["meta"]) != vocab_id(data.meta):  # same vocabulary, however named
            raise ValueError(f"{cfg.load_checkpoint} was trained on a different vocabulary than "
                             f"{cfg.data.data_path}: resume with the same data.* settings")
    model = build_model(cfg, data.vocab_size).to(device)
    torch.manual_seed(tc.seed + rank)  # from here on: per-rank noise, dropout, random K
    random.seed(tc.seed + rank)
    groups = model.optim_groups(tc.weight_decay, tc.learning_rate, model.cfg.think_lr_lr_multiplier)
    fused = device.startswith("cuda")
    opt = torch.optim.AdamW(groups, lr=tc.learning_rate, betas=(tc.beta1, tc.beta2), fused=fused)
    # one data order for all ranks: each keeps its rows of the global batch (world x B windows)
    data_gen = torch.Generator().manual_seed(tc.seed)
    step = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        rt.set_rng_state(resume["rng"][min(rank, len(resume["rng"]) - 1)], data_gen)
        step = resume["step"]
    cfg = fit_batch(cfg, model, data, device, autocast, verbose=master)  # a batch too big: stop/split
    # the sampler's record: replaying it gives every training window (evaluate.py train_seen)
    B, T, accum = cfg.data.batch_size, cfg.data.block_size, cfg.train.grad_accum_steps
    sampler = continue_record(resume.get("sampler"), step) if resume is not None else []
    if sampler is not None:
        sampler.append(new_segment(data_gen, step, accum, world * B, len(data.train) - T - 1, T))
    # contrastive chains, fast weights, replay buffer: state beside the model, checkpointed too
    shaping = EnergyShaping(model.cfg, model)
    if resume is not None and "shaping" in resume:
        shaping.load_state_dict(resume["shaping"][min(rank, len(resume["shaping"]) - 1)], device)
    if tc.compile:  # only the context stream: torch.compile has no double backward
        model.context = torch.compile(model.context)
    decay_iters = tc.lr_decay_iters or tc.max_steps
    eval_steps = model.cfg.think_steps + model.cfg.think_steps_random
    # fixed val batches: every eval (and every k of the thinking curve) sees the same windows
    eval_gen = torch.Generator().manual_seed(tc.seed + 12345)
    val_batches = [data.get_batch("val", B, T, eval_gen, device) for _ in range(tc.eval_iters)]

    run_dir, log = None, None
    if master:
        run_dir = rt.new_run_dir(cfg.out_dir)
        cfg_dict = OmegaConf.to_container(OmegaConf.structured(cfg))
        cfg_dict["model"] = dataclasses.asdict(model.cfg)  # resolved vocab/block sizes
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg_dict))
        if resume is not None:  # carry the history up to the resume point into the new run
            src = Path(cfg.load_checkpoint).resolve().parent / "metrics.jsonl"
            if src.exists():
                rows = [r for r in src.read_text().splitlines() if json.loads(r).get("step", 0) <= step]
                (run_dir / "metrics.jsonl").write_text("".join(r + "\n" for r in rows))
        log = rt.MetricsLog(run_dir / "metrics.jsonl",
                            rt.init_wandb(cfg.wandb_project, cfg.wandb_name, cfg_dict, run_dir))
        n_params = model.num_params()
        print(f"device {device} | dtype {dtype} | world {world} | params {n_params / 1e6:.2f}M | "
              f"vocab {data.vocab_size} | think_steps {model.cfg.think_steps} "
              f"({model.cfg.think_init} start, {model.cfg.think_grad} grad) | run {run_dir}")

    def save(name: str, step_done: int) -> Path:
        # gather every rank's RNG and chains so a DDP resume restores each rank's own state
        local = (rt.rng_state(data_gen), shaping.state_dict())
        states = [local]
        if world > 1:
            states = [None] * world
            dist.all_gather_object(states, local)
        path = run_dir / name if master else None
        if master:
            atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                         "model_config": dataclasses.asdict(model.cfg),
                         "config": OmegaConf.to_container(OmegaConf.structured(cfg)),
                         "meta": data.meta, "step": step_done, "rng": [s[0] for s in states],
                         "shaping": [s[1] for s in states], "sampler": sampler}, path)
        return path

    last_eval, t0, t_last = {}, time.time(), time.time()
    eval_s = [0.0]  # time spent evaluating, excluded from elapsed_s (training wall-clock)

    def evaluate(step_now: int) -> dict:
        t_eval = time.time()
        curve = thinking_curve(model, val_batches, eval_steps, seed=tc.seed, autocast=autocast)
        m = curve_metrics(curve, data.bits_name)
        if eval_steps > 0 or model.cfg.use_contrastive:  # true token below prediction/negatives?
            em = val_energy_margin(model, val_batches, eval_steps, seed=tc.seed, autocast=autocast)
            m.update({f"val_{k}": v for k, v in em.items()})
        if not math.isfinite(m["val_loss"]):
            raise TrainingDiverged(f"val loss is {m['val_loss']} at step {step_now}")
        if master:
            log.write({"step": step_now, "elapsed_s": t_eval - t0 - eval_s[0], **m})
            s1 = f" | S1 {m['val_loss_s1']:.4f}" if "val_loss_s1" in m else ""
            ks = " ".join(f"{v:.3f}" for v in curve["loss_k"])
            em = f" | margin {m['val_energy_margin']:.3f}" if "val_energy_margin" in m else ""
            print(f"eval step {step_now}: val_loss {m['val_loss']:.4f} | val_{data.bits_name} "
                  f"{m['val_' + data.bits_name]:.4f}{s1}{em} | val_loss by think step k=0..: {ks}")
        nonlocal t_last
        eval_s[0] += time.time() - t_eval
        t_last += time.time() - t_eval  # tokens/s counts training time only
        return m

    start_step = step
    try:
        while True:
            if step % tc.eval_interval == 0 or step == tc.max_steps:
                last_eval = evaluate(step)
            if step >= tc.max_steps:
                break
            lr = rt.cosine_lr(step, tc.learning_rate, tc.min_lr, tc.warmup_iters, decay_iters) \
                if tc.decay_lr else tc.learning_rate
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_mult"]
            log_now = master and (step % tc.log_interval == 0 or step == tc.max_steps - 1)
            for micro in range(accum):
                x, y = data.get_batch("train", B, T, data_gen, device, rank, world)
                with autocast:  # backward inside: per think step when detach_refine
                    loss, m = ebt_loss(model, x, y, want_metrics=log_now and micro == accum - 1,
                                       shaping=shaping, backward_scale=1.0 / accum)
            rt.allreduce_grads(model.parameters(), world)
            if tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            save_now = tc.save_interval > 0 and step % tc.save_interval == 0
            if log_now or save_now:  # the only host syncs of the loop
                if not math.isfinite(loss.item()):
                    raise TrainingDiverged(f"loss is {loss.item()} at step {step}")
            if log_now:
                dt = time.time() - t_last
                t_last = time.time()
                n_steps = tc.log_interval if step > start_step + 1 else 1
                tok_s = B * T * accum * world * n_steps / max(dt, 1e-9)
                eta = (time.time() - t0) / (step - start_step) * (tc.max_steps - step)
                ce_think = (m["ce_think"] if "ce_think" in m else m["ce_s1"]).item()
                alphas = model.alpha.detach().flatten().tolist()  # one per step if per-step
                row = {"step": step, "elapsed_s": time.time() - t0 - eval_s[0], "loss": loss.item(),
                       "ce": ce_think, "ppl": math.exp(min(ce_think, 50)),
                       data.bits_name: ce_think / math.log(2), "lr": lr,
                       "alpha": alphas[0] if len(alphas) == 1 else alphas, "tokens_per_s": tok_s,
                       "tokens": step * B * T * accum * world,  # tokens seen by all ranks
                       **{k: v.item() for k, v in m.items() if k != "ce_think"}}
                log.write(row)
                extra = ""
                if "energy_before" in row:
                    ks = "/".join(f"{row[f'ce_k{k}']:.3f}" for k in range(eval_steps + 1) if f"ce_k{k}" in row)
                    alpha = "/".join(f"{a:.3f}" for a in alphas)
                    extra = (f" | alpha {alpha} | E {row['energy_before']:.3f}->"
                             f"{row['energy_after']:.3f} | ce_k {ks}")
                if "energy_margin" in row:
                    extra += f" | margin {row['energy_margin']:.2f}"
                if "cd_loss" in row:  # contrastive phases, persistent-chain bookkeeping
                    extra += f" | cd {row['cd_loss']:.3f} E+ {row['E_pos']:.2f} E- {row['E_neg']:.2f}"
                    if "buffer_fill" in row:
                        extra += f" fill {row['buffer_fill']:.2f} restarts {row['restarts']:.0f}"
                print(f"step {step:6d}/{tc.max_steps} | loss {row['loss']:.4f} | ppl {row['ppl']:.2f} | "
                      f"{data.bits_name} {row[data.bits_name]:.3f} | lr {lr:.2e}{extra} | "
                      f"{tok_s / 1e3:.1f}k tok/s | eta {rt.fmt_time(eta)}")
            if save_now:
                save(f"ckpt_step_{step:06d}.pt", step)
    except TrainingDiverged as e:
        raise SystemExit(f"error: training diverged: {e}. No checkpoint was written from the bad "
                         "state; lower train.learning_rate or model.think_lr, or raise "
                         "train.grad_clip, and resume from the last ckpt_step_*.pt") from None
    final = save("final.pt", step)
    if master:
        point_link(Path(cfg.out_dir).expanduser() / "final.pt", final)
        print(f"done: {step} steps in {rt.fmt_time(time.time() - t0)} | wrote {final} "
              f"(and {Path(cfg.out_dir) / 'final.pt'})")
        if log.wandb is not None:
            log.wandb.finish()
    return {"run_dir": run_dir, "step": step, **last_eval}


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg) -> None:
    try:
        train(OmegaConf.to_object(cfg))
    except (FileNotFoundError, ValueError) as e:  # bad input: one clear line, no traceback
        raise SystemExit(f"error: {e}") from None
    finally:
        if dist.is_initialized():  # torchrun: leave the process group cleanly
            dist.destroy_process_group()


if __name__ == "__main__":
    apply_cli_shims()
    register_configs()
    main()
