"""Tests of tools/watch.py and the sampler's on_step callback: the callback changes nothing, it sees
the mask schedule, the pictures' last frames are the sample itself, the command writes both files.

One tiny run (a perturbed tiny TokenBridge with a shuffled channel order, a random tiny
AutoencoderKL) in a temporary folder: no downloads, CPU, seconds.
"""
import json
import os
import shutil
from itertools import pairwise
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import tokenbridge as tb
from lib import data, runs
from tools import watch

LABELS = [0, 7, 3]
SETTINGS = {"num_iter": 4, "cfg": 2.0, "temperature": 1.0, "seed": (0, 0)}


def tiny_vae():
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16, 16),
                         down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3,
                         layers_per_block=1, latent_channels=16, norm_num_groups=8,
                         sample_size=32, scaling_factor=0.5).eval()  # stride 4, as the tiny preset


@pytest.fixture(scope="module")
def run(tmp_path_factory, perturb):
    """A saved run, its model and VAE, and one recorded sampling."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny graphs: one thread is as fast, and spares a busy machine
    torch.manual_seed(0)
    model = tb.TokenBridge(tb.TokenBridgeConfig.preset("tiny")).eval()
    spread = torch.linspace(0.5, 2.0, 16).view(1, -1, 1, 1)
    model.calibrate(torch.randn(32, 16, 8, 8) * spread + spread)   # unequal channel means/stds
    model.quantizer.order.copy_(torch.randperm(16, generator=torch.Generator().manual_seed(3)))
    perturb(model)
    vae = tiny_vae()
    path = tmp_path_factory.mktemp("run")
    runs.atomic_save({"config": model.config.to_dict(), "model": model.state_dict()},
                     path / runs.CHECKPOINT)
    vae.save_pretrained(path / runs.VAE_DIR)
    tokens, steps = watch.record(model, LABELS, **SETTINGS)
    yield SimpleNamespace(path=path, model=model, vae=vae, tokens=tokens, steps=steps)
    torch.set_num_threads(before)


@pytest.mark.parametrize("position_order", ["random", "confidence"])
def test_on_step_changes_no_token(run, position_order):
    """A callback that scribbles on what it gets must not reach the sampler's own tensors."""
    def scribble(s, tokens, mask):
        tokens.fill_(0)
        mask.fill_(True)
    plain = run.model.sample_tokens(LABELS, position_order=position_order, **SETTINGS)
    watched = run.model.sample_tokens(LABELS, position_order=position_order, on_step=scribble,
                                      **SETTINGS)
    assert torch.equal(plain, watched)


def test_on_step_follows_the_mask_schedule(run):
    schedule = tb.mask_schedule(run.model.config.seq_len, SETTINGS["num_iter"])
    assert len(run.steps) == SETTINGS["num_iter"]
    left = [mask.sum(1).tolist() for _, mask in run.steps]
    assert left == [[n] * len(LABELS) for n in schedule]
    for (before, was), (after, now) in pairwise(run.steps):
        assert bool((was | ~now).all())                                   # known stays known
        assert torch.equal(before[~was], after[~was])                     # with the same tokens
    assert torch.equal(run.steps[-1][0], run.tokens)


def test_last_step_frame_is_the_sample(run):
    frames = watch.step_frames(run.model, run.vae, run.steps)
    H = run.model.config.image_size
    assert frames.shape == (SETTINGS["num_iter"] + 1, len(LABELS), H, H, 3)
    sample = data.decode(run.vae, run.model.generate(LABELS, **SETTINGS))
    assert np.array_equal(frames[-1], sample)
    # after step 1: the known positions as decoded, the unknown ones tinted (their 4x4 pixels)
    tokens, mask = run.steps[0]
    plain = data.decode(run.vae, watch.step_latents(run.model, tokens, mask))
    unknown = mask.view(-1, 8, 8).numpy().repeat(4, 1).repeat(4, 2)                # (B, H, W)
    changed = (frames[1] != plain).any(-1)
    assert 0 < unknown.mean() < 1 and not changed[~unknown].any() and changed[unknown].mean() > 0.9


def test_channels_arrive_in_generation_order(run):
    model, tokens = run.model, run.tokens[0]
    channels = watch.channel_frames(model, run.vae, tokens)
    assert channels.shape[0] == model.config.channels
    sample = data.decode(run.vae, tb.unpatchify(model.quantizer.dequantize(run.tokens[:1]), 8))
    assert np.array_equal(channels[-1], sample[0])
    assert not np.array_equal(channels[0], channels[-1])
    # the first image holds the channel of AR slot 0 (not VAE channel 0), the rest at the mean
    first = model.quantizer.order[0]
    values = model.quantizer.mean.expand(64, -1).clone()
    values[:, first] = model.quantizer.dequantize(tokens)[:, first]
    assert np.array_equal(channels[0], data.decode(run.vae, tb.unpatchify(values[None], 8))[0])


def test_command_writes_png_and_gif(run, tmp_path):
    (run.path / "sampling.json").write_text(json.dumps({"num_iter": 5, "cfg": 1.5}))
    try:
        out = tmp_path / "decoding"
        args = watch.get_parser().parse_args(["--run-dir", str(run.path), "--out", str(out),
                                              "--labels", "0,7,3", "--scale", "2",
                                              "--device", "cpu"])
        frames, _ = watch.main(args)
    finally:
        os.remove(run.path / "sampling.json")
    assert len(frames) == 5 + 1                                    # the run's tuned num_iter
    cell = 32 * 2 + watch.GAP
    with Image.open(f"{out}.png") as png:
        assert png.height == 2 * watch.BAND + (len(LABELS) + 1) * cell
        assert 0 < png.width - 16 * cell < 100                     # 16 channel columns, names
    with Image.open(f"{out}.gif") as gif:
        assert gif.n_frames == 6 + 16                              # steps 0..5, channels 1..16
        assert gif.size == (2 * cell, 2 * cell + watch.BAND)       # 3 samples: a 2x2 grid
        assert gif.info["loop"] == 0
    assert sorted(os.listdir(tmp_path)) == ["decoding.gif", "decoding.png"]   # no temp files


def test_bad_input_is_one_line_error(run, tmp_path):
    parse = watch.get_parser().parse_args
    with pytest.raises(ValueError, match="labels must lie in"):
        watch.main(parse(["--run-dir", str(run.path), "--out", str(tmp_path / "x"),
                          "--labels", "12"]))
    with pytest.raises(ValueError, match="folder .* does not exist"):
        watch.main(parse(["--run-dir", str(run.path), "--out", str(tmp_path / "no" / "x")]))
    (tmp_path / "novae").mkdir()
    shutil.copy(run.path / runs.CHECKPOINT, tmp_path / "novae")
    with pytest.raises(ValueError, match="has no VAE"):
        watch.main(parse(["--run-dir", str(tmp_path / "novae"), "--out", str(tmp_path / "x")]))
