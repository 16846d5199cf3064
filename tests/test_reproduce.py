"""reproduce.py against naive truths: token entropy vs a numpy histogram, held_out vs the rows it
must read from a latent cache (tiny, no runs needed)."""
import math
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import reproduce  # noqa: E402


def naive_entropy(tokens, levels):
    out = []
    for c in range(tokens.shape[-1]):
        counts = np.bincount(tokens[..., c].ravel(), minlength=levels)
        p = counts[counts > 0] / counts.sum()
        out.append(float(-(p * np.log2(p)).sum()))
    return np.array(out)


def test_token_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    levels = 16
    tokens = rng.integers(0, levels, size=(7, 5, 3))
    tokens[..., 1] = 4                                   # a constant channel: 0 bits
    tokens[..., 2] = rng.integers(0, 2, size=(7, 5))     # two symbols: about 1 bit
    got = reproduce.token_entropy(torch.from_numpy(tokens), levels).numpy()
    np.testing.assert_allclose(got, naive_entropy(tokens, levels), atol=1e-9)
    assert got[1] == 0.0


def test_gaussian_latents_fill_equiprobable_bins():
    """On Gaussian data the calibrated quantizer's tokens have entropy close to log2(levels)."""
    torch.manual_seed(0)
    q = reproduce.tb.GaussianQuantizer(16, 3.0, 2)
    x = torch.randn(20000, 2) * torch.tensor([2.0, 0.5]) + torch.tensor([1.0, -3.0])
    q.calibrate(x)
    h = reproduce.token_entropy(q.quantize(x), 16)
    assert (h > math.log2(16) - 0.02).all() and (h <= 4.0 + 1e-9).all()


def test_held_out_reads_the_validation_rows_of_the_latent_cache(tmp_path):
    """reproduce.held_out takes train.py's split and reads only those rows of the memory-mapped cache."""
    n = 5000
    moments = np.zeros((n, 1, 2, 1, 1, 1), np.float32)                  # (N, flips, mean|std, C, h, w)
    moments[:, 0, 0] = np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1)  # mean of image i is i
    npy, meta = reproduce.data.cache_paths(tmp_path)
    np.save(npy, moments)
    with pytest.raises(ValueError, match="no complete latent cache"):     # no header: not valid yet
        reproduce.held_out(tmp_path)
    reproduce.runs.atomic_save({"key": {}, "shape": list(moments.shape), "labels": torch.arange(n) % 10,
                                 "unreadable": torch.zeros(0, dtype=torch.long)}, meta)
    images, modes, labels = reproduce.held_out(tmp_path)
    _, val_idx = reproduce.data.split_validation(n, 500)
    assert images.shape == (500, 32, 32, 3) and torch.equal(modes.flatten().long(), val_idx)
    assert torch.equal(labels, val_idx % 10)


def test_guidance_plot_draws_the_run_sweep(tmp_path):
    rows = [{"cfg": c, "temperature": t, "num_iter": 16, "fd": 40 - 5 * c + 10 * t, "class_accuracy": 0.8 + 0.04 * c}
            for c in (1.0, 2.0, 3.0, 4.0) for t in (0.7, 1.0)] + [{"cfg": 4.0, "temperature": 0.7, "num_iter": 4,
                                                                     "fd": 10.0, "class_accuracy": 0.97}]
    reproduce.guidance_plot({**rows[-1], "sweep": rows}, tmp_path / "guidance.png")
    from PIL import Image
    assert Image.open(tmp_path / "guidance.png").size == (675, 252)             # 7.5 x 2.8 inches at 90 dpi
    with pytest.raises(ValueError, match="sampling.json is missing"):
        reproduce.part_guidance(reproduce.get_parser().parse_args(["--ar", str(tmp_path)]), tmp_path, {})
