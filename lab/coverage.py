"""Which training tokens a run actually trained on: the sampler's record and its exact replay.

Training windows come from one torch.Generator (`data_gen` in train.py): every micro-batch draws
world * B window starts with torch.randint, and each rank keeps its rows. So the generator's
state at the start of a run, the number of draws and their size determine every window the run
saw. A checkpoint stores that as a list of *segments* (one per start or resume):

    {"state": generator state (uint8 tensor), "start_step": int, "accum": int,
     "n": world * B starts per draw, "high": len(train) - T - 1, "block": T}

and the checkpoint's own `step` ends the last segment (nanoebm/data.py writes them). Replaying the segments reproduces the
window starts bit for bit (same generator, same calls), on any machine and for DDP or resumed
runs alike, without storing one bit per training token.
"""
from __future__ import annotations

import numpy as np
import torch


def replay_starts(record: list, end_step: int):
    """Yield (starts (n,), T) for every training draw, in the order training drew them."""
    for i, seg in enumerate(record):
        stop = record[i + 1]["start_step"] if i + 1 < len(record) else end_step
        gen = torch.Generator().manual_seed(0)
        gen.set_state(seg["state"])
        for _ in range((stop - seg["start_step"]) * seg["accum"]):
            yield torch.randint(seg["high"], (seg["n"],), generator=gen).numpy(), seg["block"]


def target_coverage(record: list, end_step: int, n_tokens: int) -> np.ndarray:
    """(n_tokens,) int32: how many sampled windows had each of the first n_tokens training-split
    positions as a target (n_tokens may be a prefix of the split: the counts there are exact).
    A window starting at i has inputs i..i+T-1 and targets i+1..i+T."""
    diff = np.zeros(n_tokens + 1, dtype=np.int64)
    for starts, T in replay_starts(record, end_step):
        first = starts[starts + 1 < n_tokens] + 1  # windows reaching into the prefix
        np.add.at(diff, first, 1)
        np.add.at(diff, np.minimum(first + T, n_tokens), -1)
    return np.cumsum(diff[:n_tokens]).astype(np.int32)
