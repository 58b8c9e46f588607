"""RNG state saved by training checkpoints restores exactly and loads without pickle."""
import random

import numpy as np
import torch

from train.distributed import rng_state, set_rng_state


def draws():
    return random.random(), float(np.random.rand()), np.random.randn(), torch.rand(3).tolist()


def test_rng_state_round_trip_weights_only(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # leave a cached gaussian in numpy's state
    path = tmp_path / "rng.pt"
    torch.save(rng_state(), path)
    expected = draws()
    set_rng_state(torch.load(path, weights_only=True))
    assert draws() == expected
