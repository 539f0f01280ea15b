"""The trained models in checkpoints/: each file is what checkpoints/README.md says it is (its
sha256), loads with torch.load(weights_only=True) as half-precision weights only, and scores on
the fixed val windows what the record claims, within 1e-3 nats.

    uv run pytest tests/test_bundled.py
"""
import math

import pytest
import torch

from lab.bundle import recorded, score, sha256
from nanoebm.checkpoint import BUNDLED

NAMES = ["bundled", "bundled_baseline"]


@pytest.mark.parametrize("name", NAMES)
def test_file_is_the_recorded_one(name):
    path = BUNDLED[name]
    assert sha256(path) == recorded()[path.name]["sha256"]
    ck = torch.load(path, weights_only=True)
    assert set(ck) == {"model", "model_config", "meta", "config", "step", "sampler"}  # no optimizer
    assert {v.dtype for v in ck["model"].values() if v.is_floating_point()} == {torch.float16}
    assert path.stat().st_size < 4e6 and ck["step"] == 2000
    assert (ck["model_config"]["think_steps"] > 0) == (name == "bundled")


@pytest.mark.slow  # scores 20 batches with thinking and best-of-4
@pytest.mark.parametrize("name", NAMES)
def test_score_equals_the_record(name):
    path = BUNDLED[name]
    row = recorded()[path.name]
    got = score(torch.load(path, weights_only=True))
    assert set(got) == ({"s1", "think", "bon"} if name == "bundled" else {"s1", "think"})
    for k, nats in got.items():
        assert abs(nats - float(row[k]) * math.log(2)) < 1e-3, (k, nats, row[k])
