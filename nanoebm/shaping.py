"""Energy shaping: contrastive divergence and its persistent variants, Langevin sampling on the
energy, the energy margin, and the replay buffer of the reference System-2 recipe.

The positive is the true next token as a one-hot candidate, the negatives are candidates found
by contrastive_k Langevin steps on the current energy:

    E_pos = E(x, onehot(x_{t+1}))       (B, T), gradient flows into the model
    E_neg = E(x', softmax(z_neg))       z_neg detached: a sample, not part of the graph
    L_cd  = mean(E_pos) - mean(E_neg) + contrastive_reg * (mean(E_pos^2) + mean(E_neg^2))

The first two terms alone are invariant to adding a constant to every energy, so without the
square term energies drift without bound; with it the optimum is E_pos = -1/(2 reg), E_neg =
+1/(2 reg). Where the chains start (contrastive_type):
    cd        the model's own prediction for the same position (its last think step)
    pcd       a buffer of n_persistent records (token window + candidate logits); each step
              continues min(B, n_persistent) of them on their own window, restart_prob restarts
    fast_pcd  n_chains persistent chains, all continued every step while sampling with
              theta + theta_fast (Tieleman & Hinton 2009); theta_fast <- fast_decay*theta_fast -
              fast_lr * d(negative-phase term)/d(theta), taken at the sampling weights

The replay buffer (replay_buffer_size > 0, the reference S2 recipe) appends
replay_fraction * B rows from earlier batches whose thinking restarts from the final candidate
stored for that same window. All of this state lives in EnergyShaping, saved in checkpoints;
ebt_loss (nanoebm/losses.py) calls its three hook methods: before_forward, restart and
after_thinking.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F

from nanoebm.config import ModelConfig
from nanoebm.model import EBT, Context, at_least_f32
from nanoebm.think import initial_logits, think


def last_landscape(cfg: ModelConfig) -> int:
    """Step index of the last think landscape: the one contrastive energies are measured on."""
    return max(0, cfg.eval_think_steps - 1)


# ------------------------------------------------------------------------------- sampling
def langevin(model: EBT, ctx: Context, z: torch.Tensor, steps: int, step_size: float,
             noise_scale: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """`steps` Langevin steps on the candidate logits z (B, T, V), in logit space:
        z <- z - langevin_step_size * dE/dz + langevin_noise_scale * N(0, I)
    on the model's current energy. The result is detached: a sample, not part of any graph."""
    kv = Context(kv=[(k.detach(), v.detach()) for k, v in ctx.kv], s1_logits=None)
    tau, step = model.cfg.softmax_temperature, last_landscape(model.cfg)
    z = z.detach()
    with torch.enable_grad():  # dE/dz only: the keys/values are detached, no parameter graph
        for _ in range(steps):
            z = z.requires_grad_(True)
            E = model.energy(kv, torch.softmax(z / tau, -1), step=step)  # (B, T)
            g, = torch.autograd.grad(E.sum(), z)  # positions are independent: dE_t/dz_t
            z = (z - step_size * g).detach()
            if noise_scale > 0:
                z = z + noise_scale * torch.randn(z.shape, device=z.device, generator=generator)
    return z


@torch.no_grad()
def energy_margin(model: EBT, ctx: Context, y: torch.Tensor, z_final: torch.Tensor,
                  E_neg: torch.Tensor | None = None,
                  generator: torch.Generator | None = None) -> dict:
    """Fraction of positions whose true-token energy is below both the model's own final
    candidate z_final and a negative (contrastive_k Langevin steps from z_final on the same
    window, unless E_neg is given). Returns detached means: margin, E_pos, E_final, E_neg."""
    cfg, step = model.cfg, last_landscape(model.cfg)
    E_pos = model.energy(ctx, F.one_hot(y, cfg.vocab_size).float(), step=step)  # (B, T)
    E_final = model.energy(ctx, torch.softmax(z_final / cfg.softmax_temperature, -1), step=step)
    if E_neg is None:
        z_neg = langevin(model, ctx, z_final, cfg.contrastive_k, cfg.langevin_step_size,
                         cfg.langevin_noise_scale, generator)
        E_neg = model.energy(ctx, torch.softmax(z_neg / cfg.softmax_temperature, -1), step=step)
    below = (E_pos < E_neg) & (E_pos < E_final)  # (B, T)
    return {"energy_margin": below.float().mean(), "E_pos": E_pos.mean(),
            "E_final": E_final.mean(), "E_neg": E_neg.mean()}


@torch.no_grad()
def val_energy_margin(model: EBT, batches, steps: int, *, seed: int = 0, autocast=None) -> dict:
    """energy_margin on fixed val batches after `steps` think steps (no noise, dropout off),
    started like thinking_curve (S1 logits, or seeded noise)."""
    was_training = model.training
    model.eval()
    tot = {}
    for i, (x, y) in enumerate(batches):
        gen = torch.Generator(device=x.device).manual_seed(seed + i)
        with autocast or nullcontext():
            ctx = model.context(x)
            mode = "s1" if steps == 0 and model.has_s1 else None  # as in thinking_curve
            z0 = initial_logits(model, ctx, x.shape[1], mode=mode, generator=gen)
            out = think(model, ctx, z0, steps, noise=0.0, generator=gen)
            m = energy_margin(model, ctx, y, out.final, generator=gen)
        for k, v in m.items():
            tot[k] = tot.get(k, 0.0) + v.item() / len(batches)
    model.train(was_training)
    return tot


def energy_metrics(model: EBT, ctx: Context, y: torch.Tensor, z_pred: torch.Tensor,
                   parts: dict | None = None, shaping: EnergyShaping | None = None) -> dict:
    """Training metrics of the energy: the margin (always on the batch's own positions; for
    pcd the negatives come from a diagnostic CD chain with a private generator, so logging
    never moves the training RNG), the contrastive phases as trained, the buffers' fill."""
    E_neg = parts["E_neg_t"].detach() if parts is not None and parts["aligned"] else None
    gen = torch.Generator(device=y.device).manual_seed(0)
    mm = energy_margin(model, ctx, y, z_pred, E_neg, generator=gen)
    m = {"energy_margin": mm["energy_margin"]}
    if parts is not None:
        m["E_pos"], m["E_neg"] = parts["E_pos_t"].detach().mean(), parts["E_neg_t"].detach().mean()
    if shaping is not None and shaping.n_rec:
        m["buffer_fill"] = torch.tensor(float(shaping.used.float().mean()))
        m["restarts"] = torch.tensor(float(shaping.restarts))
    if shaping is not None and shaping.replay is not None:
        m["replay_fill"] = torch.tensor(shaping.replay.n / shaping.replay.size)
    return m


# ---------------------------------------------------------------------------- the buffers
class ReplayBuffer:
    """FIFO of records from earlier batches: token windows x, targets y and the final candidate
    logits z thinking reached on them (reference S2). Memory: size * T * V * 4 bytes."""

    def __init__(self, size: int, fraction: float):
        self.size, self.fraction = size, fraction
        self.x = self.y = self.z = None  # (N, T), (N, T), (N, T, V), allocated on first push
        self.n, self.ptr = 0, 0          # records held, next slot to overwrite

    def sample(self, batch_size: int) -> torch.Tensor | None:
        """Indices of max(1, replay_fraction * B) records (fewer while filling), no repeats."""
        m = min(max(1, int(self.fraction * batch_size)), self.n)
        return torch.randperm(self.n)[:m] if m > 0 else None

    def push(self, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> None:
        x, y, z = x[-self.size:], y[-self.size:], at_least_f32(z[-self.size:].detach())
        if self.x is None:
            N = self.size
            self.x = x.new_zeros((N,) + x.shape[1:])
            self.y, self.z = y.new_zeros((N,) + y.shape[1:]), z.new_zeros((N,) + z.shape[1:])
        slots = (self.ptr + torch.arange(len(x))) % self.size  # oldest records go first
        self.x[slots], self.y[slots], self.z[slots] = x, y, z
        self.ptr = (self.ptr + len(x)) % self.size
        self.n = min(self.size, self.n + len(x))


class EnergyShaping:
    """Training-time state beside the model: persistent chains (pcd, fast_pcd), fast weights
    (fast_pcd) and the replay buffer. train.py makes one, passes it to every training step and
    saves state_dict() in checkpoints so a resume continues the same chains."""

    def __init__(self, cfg: ModelConfig, model: EBT):
        self.cfg = cfg
        self.kind = cfg.contrastive_type if cfg.use_contrastive else None
        self.replay = ReplayBuffer(cfg.replay_buffer_size, cfg.replay_fraction) \
            if cfg.replay_buffer_size > 0 else None
        self.n_rec = {"pcd": cfg.n_persistent, "fast_pcd": cfg.n_chains}.get(self.kind, 0)
        self.x = self.z = None                   # chain records (N, T) windows, (N, T, V) logits
        self.used = torch.zeros(self.n_rec, dtype=torch.bool)  # slot holds a chain (CPU: no syncs)
        self.restarts, self.restarts_total = 0, 0
        # fast weights: one zero tensor per trainable parameter (fast_pcd only)
        self.fast = {n: torch.zeros_like(p) for n, p in model.named_parameters()
                     if p.requires_grad} if self.kind == "fast_pcd" else {}

    # -- the hook: ebt_loss calls these three, in this order, on every training batch
    def before_forward(self, model: EBT, x: torch.Tensor, y: torch.Tensor):
        """Before the batch's graph exists: continue the persistent negative chains (fast_pcd
        swaps its fast weights into the parameters in place) and append replay rows. Returns
        (x, y) with the replayed records appended, (B + m, T)."""
        self._neg, self._z_replay, self._fresh = None, None, x.shape[0]
        if model.cfg.use_contrastive and self.kind != "cd":
            self._neg = self.persistent_negatives(model, x)
        if self.replay is not None and (idx := self.replay.sample(x.shape[0])) is not None:
            x, y = torch.cat([x, self.replay.x[idx]]), torch.cat([y, self.replay.y[idx]])
            self._z_replay = self.replay.z[idx]  # (m, T, V) where thinking stopped on them
        return x, y

    def restart(self, z0: torch.Tensor) -> torch.Tensor:
        """The think start z0 (B + m, T, V) with each replayed row's stored final candidate."""
        if self._z_replay is None:
            return z0
        return torch.cat([z0[:self._fresh], self._z_replay])

    def after_thinking(self, model: EBT, ctx: Context, x: torch.Tensor, y: torch.Tensor,
                       z_final: torch.Tensor, loss: torch.Tensor, metrics: dict):
        """Store the fresh rows' final candidates for replay and add the contrastive term.
        Returns (loss, parts): parts are the contrastive phases (None without the term)."""
        if self.replay is not None:  # only fresh rows become records
            self.replay.push(x[:self._fresh], y[:self._fresh], z_final[:self._fresh])
        if not model.cfg.use_contrastive:
            return loss, None
        l_cd, parts = self.contrastive(model, ctx, y, z_final.detach(), self._neg)
        metrics["cd_loss"] = l_cd.detach()
        return loss + model.cfg.contrastive_weight * l_cd, parts

    # -- persistent chains
    def _pick_chains(self, x: torch.Tensor) -> torch.Tensor:
        """Slots to continue this step; empty slots get a chain, used ones restart with
        restart_prob. A new chain = a random window of this batch + N(0, buffer_init_std^2)."""
        cfg, (B, T), N = self.cfg, x.shape, self.n_rec
        if self.x is None:
            self.x = x.new_zeros(N, T)
            self.z = torch.zeros(N, T, cfg.vocab_size, device=x.device)
        m = N if self.kind == "fast_pcd" else min(B, N)  # fast_pcd advances every chain
        idx = torch.randperm(N)[:m]
        used = self.used[idx]
        restart = used & (torch.rand(m) < cfg.restart_prob)  # (m,)
        new = idx[~used | restart]
        if len(new):
            self.x[new] = x[torch.randint(B, (len(new),))]
            noise = torch.randn(len(new), T, cfg.vocab_size, device=x.device)  # (n_new, T, V)
            self.z[new] = noise * cfg.buffer_init_std
            self.used[new] = True
        self.restarts = int(restart.sum())
        self.restarts_total += self.restarts
        return idx

    @contextmanager
    def fast_weights(self, model: EBT):
        """Temporarily set theta <- theta + theta_fast in place (restored exactly from a copy).
        Only used before the batch's graph exists, so no saved tensor sees the swap; working on
        the parameters themselves also keeps a torch.compile'd model.context valid."""
        params = [p for n, p in model.named_parameters() if n in self.fast]
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, f in zip(params, self.fast.values()):
                p.add_(f.to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)

    def persistent_negatives(self, model: EBT, x: torch.Tensor):
        """Continue this step's chains contrastive_k steps, each on its own window. Returns
        (ctx, z_neg): the windows' context stream (with graph, at theta) and the detached
        samples. Must run before the batch's own forward (fast weights are swapped in place)."""
        cfg = self.cfg
        idx = self._pick_chains(x)
        x_rec = self.x[idx]  # (m, T) each chain's own window, never re-paired
        ctx = None
        if self.kind == "fast_pcd":
            with self.fast_weights(model):
                ctx_fast = model.context(x_rec)
                z = langevin(model, ctx_fast, self.z[idx], cfg.contrastive_k,
                             cfg.langevin_step_size, cfg.langevin_noise_scale)
                # fast weights learn from the negative phase at the sampling weights. A plain
                # grad call (no retain_graph: a compiled model.context's backward forbids it)
                E = model.energy(ctx_fast, torch.softmax(z / cfg.softmax_temperature, -1),
                                 step=last_landscape(cfg))  # (m, T)
                neg_term = -E.mean() + cfg.contrastive_reg * E.pow(2).mean()
                params = dict(model.named_parameters())
                self.update_fast(torch.autograd.grad(neg_term, [params[n] for n in self.fast],
                                                     allow_unused=True))
        else:
            ctx = model.context(x_rec)
            z = langevin(model, ctx, self.z[idx], cfg.contrastive_k, cfg.langevin_step_size,
                         cfg.langevin_noise_scale)
        self.z[idx] = z  # the chain continues from here next time
        return (ctx if ctx is not None else model.context(x_rec)), z

    def update_fast(self, grads) -> None:
        """theta_fast <- fast_decay * theta_fast - fast_lr * grad (None = zero gradient)."""
        for f, g in zip(self.fast.values(), grads):
            f.mul_(self.cfg.fast_decay)
            if g is not None:
                f.sub_(self.cfg.fast_lr * g.detach().to(f.dtype))

    # -- the loss term
    def contrastive(self, model: EBT, ctx: Context, y: torch.Tensor, z_pred: torch.Tensor, neg):
        """L_cd for this batch. z_pred (B, T, V): the model's prediction (CD's start); neg:
        (ctx, z_neg) from persistent_negatives for pcd/fast_pcd. Returns (loss, parts)."""
        cfg, step, tau = self.cfg, last_landscape(self.cfg), self.cfg.softmax_temperature
        E_pos = model.energy(ctx, F.one_hot(y, cfg.vocab_size).float(), step=step)  # (B, T)
        if neg is None:  # cd: from the prediction at the same position, on the same window
            ctx_neg, z_neg = ctx, langevin(model, ctx, z_pred, cfg.contrastive_k,
                                           cfg.langevin_step_size, cfg.langevin_noise_scale)
        else:
            ctx_neg, z_neg = neg
        E_neg = model.energy(ctx_neg, torch.softmax(z_neg / tau, -1), step=step)  # (m, T)
        neg_term = -E_neg.mean() + cfg.contrastive_reg * E_neg.pow(2).mean()
        loss = E_pos.mean() + cfg.contrastive_reg * E_pos.pow(2).mean() + neg_term
        return loss, {"E_pos_t": E_pos, "E_neg_t": E_neg, "aligned": neg is None}

    # -- checkpoints
    def state_dict(self) -> dict:
        """Plain tensors and ints on CPU (loads with weights_only=True)."""
        cpu = lambda t: None if t is None else t.detach().cpu().clone()  # noqa: E731
        sd = {"x": cpu(self.x), "z": cpu(self.z), "used": self.used.clone(),
              "restarts_total": self.restarts_total,
              "fast": {n: cpu(f) for n, f in self.fast.items()}}
        if self.replay is not None:
            r = self.replay
            sd["replay"] = {"x": cpu(r.x), "y": cpu(r.y), "z": cpu(r.z), "n": r.n, "ptr": r.ptr}
        return sd

    def load_state_dict(self, sd: dict, device="cpu") -> None:
        dev = lambda t: None if t is None else t.to(device)  # noqa: E731
        if len(sd["used"]) != self.n_rec or set(sd["fast"]) != set(self.fast):
            raise ValueError("checkpoint's contrastive state does not match model.contrastive_type"
                             "/n_persistent/n_chains: resume with the checkpoint's settings")
        self.x, self.z, self.used = dev(sd["x"]), dev(sd["z"]), sd["used"].clone()
        self.restarts_total = sd["restarts_total"]
        for n in self.fast:
            self.fast[n] = sd["fast"][n].to(device)
        if self.replay is not None and "replay" in sd:
            r, s = self.replay, sd["replay"]
            r.x, r.y, r.z, r.n, r.ptr = dev(s["x"]), dev(s["y"]), dev(s["z"]), s["n"], s["ptr"]
