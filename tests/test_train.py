"""Tests of train.py: data, VAE checks, the data order, calibration report, exact resume,
DDP on CPU (gloo, 2 processes), checkpoints and every bad-input error.

Tiny everything: a 40-image fake folder (two classes of coloured shapes), a small VAE trained
for a few steps once per session, the `tiny` preset shrunk further. Run: pytest tests/test_train.py
"""
import argparse
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from conftest import SMALL_CFG, run_argv  # noqa: E402

import tokenbridge as tb  # noqa: E402
import train  # noqa: E402
from lib import data, recipe, runs, validation  # noqa: E402

# A tiny VAE in the LDM checkpoint format (kl16.ckpt's): stride 2, 16 latent channels.
LDM_REFERENCE = Path(__file__).parent / "data" / "ldm_vae_tiny_reference.pt"

def run_args(run_dir, data, vae, *extra):
    return train.get_parser().parse_args(run_argv(run_dir, data, vae, *extra))


def resume(run_dir, *extra):
    """train.py --resume RUN on one CPU thread (main's own count of the flags given)."""
    argv = ["--resume", str(run_dir), "--threads", "1", "--device", "cpu", *extra]
    return train.main(train.get_parser().parse_args(argv))


# --- data -------------------------------------------------------------------------------------

def test_digits_are_the_real_mnist_file():
    images, labels, classes = data.load_digits(32)
    assert images.shape == (5000, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.bincount(labels).tolist() == [500] * 10 and classes == [str(k) for k in range(10)]
    # the 2-pixel padding is empty and the digits are where MNIST puts them (centre of mass)
    assert images[:, :, :2].max() == 0 and images[:, :, :, -2:].max() == 0
    ys = torch.arange(32).float()
    mass = images[:, 0].float()
    cy = (mass.sum(2) * ys).sum(1) / mass.sum((1, 2))
    assert abs(cy.mean().item() - 15.5) < 1.5


def test_folder_is_listed_then_decoded_on_access(fake_data):
    images, labels, classes, non_images = data.load_folder(fake_data, 16)
    assert len(images) == 41 and classes == ["disc", "square"]
    assert [p.name for p in non_images] == ["notes.txt"]
    assert torch.bincount(labels).tolist() == [21, 20]          # broken.png is only known when read
    pixels, readable = data.read_images(images, range(len(images)))
    assert pixels.shape == (41, 3, 16, 16) and pixels.dtype == torch.uint8
    unreadable = torch.nonzero(~readable).flatten()
    assert [Path(images.files[i]).name for i in unreadable] == ["broken.png"]
    assert pixels[~readable].max() == 0 and pixels[readable].amax((1, 2, 3)).min() > 0


def test_center_crop_matches_adm_on_a_known_image():
    # 40x20 image, left half black / right half white; short side 20 -> 16: scale 0.8 -> 32x16,
    # crop the middle 16 columns: columns 8..23 of 32, i.e. half black, half white.
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, 20:] = 255
    out = data.center_crop(Image.fromarray(arr), 16)
    assert out.shape == (16, 16, 3)
    assert out[:, :7].max() == 0 and out[:, 9:].min() == 255


def test_empty_folder_is_one_clear_error(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        data.load_folder(tmp_path, 16)


def test_data_order_is_an_epoch_permutation_and_a_function_of_seed_and_step():
    n, b = 10, 4
    seen = torch.cat([data.batch_indices(0, s, n, b) for s in range(5)])    # 20 = two epochs
    assert sorted(seen[:10].tolist()) == list(range(10))
    assert sorted(seen[10:].tolist()) == list(range(10))
    data.epoch_permutation.cache_clear()  # no hidden state: same answer from a cold cache
    assert torch.equal(data.batch_indices(0, 3, n, b), seen[12:16])
    assert not torch.equal(data.batch_indices(1, 0, n, b), seen[:4])


def test_ranks_split_the_global_batch():
    moments = np.zeros((6, 2, 2, 1, 1, 1), np.float32)             # (N, flips, mean|std, C, h, w)
    moments[:, :, 0] = (6 * np.arange(2)[None] + np.arange(6)[:, None]).reshape(6, 2, 1, 1, 1)
    cache = data.LatentCache(moments, torch.arange(6), torch.zeros(0, dtype=torch.long))
    idx = torch.arange(6)
    whole, lab = data.get_batch(cache, idx, 0, 5, 4)
    parts = [data.get_batch(cache, idx, 0, 5, 4, rank=r, world=2) for r in range(2)]
    shared = torch.cat([parts[0][0], parts[1][0]])
    assert torch.equal(shared.flatten().sort().values, whole.flatten().sort().values)
    # std 0: latents are the means, mean[f, i] = 6 f + i, so each latent names its image and flip
    assert torch.equal(whole.flatten().long() % 6, lab)


def test_a_rank_draws_the_noise_of_its_own_rows_only(monkeypatch):
    """2048 images x 8 ranks: each drawing the whole global batch's noise is 8x the work. A row's
    latent is the same on whichever rank draws it."""
    moments = np.zeros((8, 1, 2, 3, 2, 2), np.float32)
    moments[:, :, 1] = 1.0                                                    # std 1: the noise
    cache = data.LatentCache(moments, torch.arange(8), torch.zeros(0, dtype=torch.long))
    drawn, randn = [], torch.randn
    monkeypatch.setattr(torch, "randn", lambda *a, **k: drawn.append(randn(*a, **k)) or drawn[-1])
    whole, _ = data.get_batch(cache, torch.arange(8), 0, 2, 8)
    drawn.clear()
    part, _ = data.get_batch(cache, torch.arange(8), 0, 2, 8, rank=1, world=4)
    assert sum(x.numel() for x in drawn) == part.numel() == 2 * 3 * 2 * 2
    assert torch.equal(part, whole[1::4])


# --- optimizer, schedule, EMA -------------------------------------------------------------------

def test_weight_decay_follows_the_official_rule(small_cfg):
    """MAR's add_weight_decay: no decay for 1-D parameters and biases, decay for all the rest."""
    model = tb.TokenBridge(small_cfg)
    opt = recipe.make_optimizer(model, 1e-3, 0.02)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in opt.param_groups[0]["params"]}
    kept = {names[id(p)] for p in opt.param_groups[1]["params"]}
    assert opt.param_groups[0]["weight_decay"] == 0.02 and opt.param_groups[1]["weight_decay"] == 0
    assert decayed | kept == set(names.values()) and not decayed & kept
    assert {"backbone.class_emb.weight", "backbone.fake_latent", "backbone.mask_token",
            "backbone.encoder_pos_embed", "backbone.output_pos_embed", "head.token_embed",
            "head.slot_pos", "head.out_weight",
            "backbone.encoder_blocks.0.attn.qkv.weight"} <= decayed
    assert {"head.out_bias", "backbone.z_proj.bias", "backbone.encoder_norm.weight",
            "head.norm.weight"} <= kept
    assert all(model.get_parameter(n).dim() == 1 or n.endswith("bias") for n in kept)


def test_lr_schedule_is_the_official_one_in_steps():
    lrs = [recipe.lr_at(s, 1.0, 4, 20) for s in range(21)]
    assert lrs[:5] == [0.0, 0.25, 0.5, 0.75, 1.0]                   # warm-up from 0, as at epoch 0
    assert abs(lrs[12] - 0.5) < 1e-12 and lrs[20] == 0.0      # half way down, then 0 at the end
    assert lrs[4:] == sorted(lrs[4:], reverse=True)             # never up after the warm-up
    assert [recipe.lr_at(s, 1.0, 4, 20, "constant") for s in (2, 4, 19)] == [0.5, 1.0, 1.0]
    assert recipe.lr_at(1, 1.0, 2.5, 20) == 0.4               # fractional warm-up, as in epochs


def test_accumulated_micro_batches_give_the_gradient_of_the_whole_batch(small_cfg):
    """Two micro-batches of 4 accumulated == one batch of 8, when every micro-batch masks as many
    positions (all of them here) and no label is dropped, as for DDP's average over processes."""
    cfg = tb.TokenBridgeConfig(**{**SMALL_CFG, "mask_ratio_min": 1.0, "label_drop_prob": 0.0})
    lat, lab = torch.randn(8, 4, 4, 4), torch.tensor([0, 1] * 4)
    grads = []
    for micro in (8, 4):
        torch.manual_seed(0)
        model = tb.TokenBridge(cfg).calibrate(lat)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        batches = list(zip(lat.split(micro), lab.split(micro), strict=True))
        loss_fn = recipe.TrainingLoss(model)
        recipe.train_step(loss_fn, opt, batches, 0.0, 1e9, torch.device("cpu"))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 20
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)


def test_presets_carry_the_official_recipe():
    def resolved(*argv):
        return recipe.resolve_recipe(train.get_parser().parse_args(list(argv)))
    large = tb.TokenBridgeConfig.preset("large")
    line = recipe.recipe_summary(resolved("--preset", "large"), large)
    for part in ("global batch 2048", "lr 0.0004 = blr 5e-05 x 2048 / 256", "400 epochs",
                 "warm-up 100 epochs", "cosine to 0", "weight decay 0.02", "grad clip 3.0",
                 "EMA 0.9999 constant", "dropout 0.1", "label drop 0.1",
                 "head on every masked position"):
        assert part in line, part
    assert resolved("--preset", "huge").epochs == 800
    mine = resolved("--preset", "large", "--batch", "256")
    assert mine.batch == 256 and mine.blr == 5e-5                    # a flag wins, the rest stays


# --- evaluation truths --------------------------------------------------------------------------

def test_validation_bits_of_a_uniform_model_is_log2_levels(small_cfg, monkeypatch):
    model = tb.TokenBridge(small_cfg)
    lat = torch.randn(6, small_cfg.channels, small_cfg.grid, small_cfg.grid)
    model.calibrate(lat)

    def uniform(latents, labels, mask):
        logits, targets = tb.TokenBridge.token_logits(model, latents, labels, mask)
        return torch.zeros_like(logits), targets
    monkeypatch.setattr(model, "token_logits", uniform)
    lab = torch.zeros(6, dtype=torch.long)
    assert abs(validation.validation_bits(model, lat, lab) - 4.0) < 1e-6               # 16 levels
    state = torch.get_rng_state()
    validation.validation_bits(model, lat, lab)
    assert torch.equal(state, torch.get_rng_state())  # evaluating never moves the training RNG

    def sure_of_slot_0(latents, labels, mask):             # slot 0 certain: 0 bits, the others 4
        logits, targets = uniform(latents, labels, mask)
        logits[:, 0] = 100.0 * F.one_hot(targets[:, 0], small_cfg.levels)
        return logits, targets
    monkeypatch.setattr(model, "token_logits", sure_of_slot_0)
    bits = validation.validation_bits(model, lat, lab, per_channel=True)
    expected = torch.tensor([0.0] + [4.0] * (small_cfg.channels - 1), dtype=torch.float64)
    assert torch.allclose(bits, expected, atol=1e-6)
    assert validation.validation_bits(model, lat, lab) == pytest.approx(bits.mean().item())


def record_unseeded_draws(monkeypatch):
    """A list that every reseeding of a CUDA device and every draw from torch's global generators
    (on a GPU: the training's CUDA stream) is appended to."""
    calls = []

    def recorded(name, real):
        def call(*args, **kwargs):
            if name.startswith("cuda") or kwargs.get("generator") is None:
                calls.append(name)
            return real(*args, **kwargs)
        return call
    for name in ("manual_seed", "manual_seed_all"):
        monkeypatch.setattr(torch.cuda, name, recorded(f"cuda.{name}", getattr(torch.cuda, name)))
    for name in ("rand", "randn", "randint", "randperm"):
        monkeypatch.setattr(torch, name, recorded(name, getattr(torch, name)))
    return calls


def test_validation_touches_no_global_rng_and_not_the_batch_split(small_cfg, perturb,
                                                                   monkeypatch):
    """Masks come from generators of their own: no global state moves (torch.manual_seed would
    reseed every CUDA device, which fork_rng(devices=[]) does not restore), and the number is
    the same twice and at any batch size."""
    torch.manual_seed(0)
    model = perturb(tb.TokenBridge(small_cfg))
    lat = torch.randn(20, small_cfg.channels, small_cfg.grid, small_cfg.grid)
    model.calibrate(lat)
    lab = torch.arange(20) % 2
    state, unseeded = torch.get_rng_state(), record_unseeded_draws(monkeypatch)
    bits = [validation.validation_bits(model, lat, lab, batch=b) for b in (250, 250, 7)]
    assert unseeded == [] and torch.equal(state, torch.get_rng_state())
    assert bits[0] == bits[1] and bits[2] == pytest.approx(bits[0], rel=1e-6)


def test_final_evaluation_validates_at_the_micro_batch_and_the_runs_precision(small_cfg, tmp_path,
                                                                             monkeypatch):
    """250 images at once in fp32 would hold ~50 GB of TokenBridge-L activations: validation runs
    at the run's micro-batch under its autocast precision (fp32: none, CPU numbers unchanged)."""
    model = tb.TokenBridge(small_cfg)
    lat = torch.randn(6, small_cfg.channels, small_cfg.grid, small_cfg.grid)
    model.calibrate(lat)
    lab, seen = torch.zeros(6, dtype=torch.long), []

    def recorded(latents, labels, mask):
        autocast = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu")
        seen.append((len(latents), autocast or None))
        return tb.TokenBridge.token_logits(model, latents, labels, mask)
    monkeypatch.setattr(model, "token_logits", recorded)
    args = argparse.Namespace(micro_batch=4, precision="bf16", sweep=False, data=None,
                              grid_per_class=0, num_iter=4, cfg=1.0, temperature=1.0)
    metrics = {}
    validation.final_evaluation(args, model, None, lat, lab, tmp_path, metrics, log=lambda m: None)
    assert seen == [(4, torch.bfloat16), (2, torch.bfloat16)]
    assert 0 < metrics["val_bits_per_token"] < 8
    seen.clear()
    validation.validation_bits(model, lat, lab)
    assert seen == [(6, None)]                                   # fp32 by default: no autocast
    for bad, message in [({"batch": 0}, "batch must be >= 1"), ({"precision": "fp8"}, "fp8")]:
        with pytest.raises(ValueError, match=message):
            validation.validation_bits(model, lat, lab, **bad)


def test_decode_holds_a_bounded_number_of_latent_positions_at_once(vae_dir, monkeypatch):
    """64 ImageNet images decoded at once hold about 13 GB of kl16 activations: decode splits
    the latents by positions, and the split changes no pixel."""
    vae = runs.load_vae(vae_dir)
    latents = torch.randn(7, vae.config.latent_channels, 4, 4)           # 16 positions each
    whole = data.decode(vae, latents)
    seen = []
    forward = vae.decode
    monkeypatch.setattr(vae, "decode", lambda z: seen.append(len(z)) or forward(z))
    monkeypatch.setattr(data, "DECODE_POSITIONS", 48)                    # 3 images at a time
    assert np.array_equal(data.decode(vae, latents), whole)
    assert seen == [3, 3, 1]


def test_psnr_against_hand_computed_value():
    a = np.zeros((1, 2, 2, 3), np.uint8)
    b = np.full_like(a, 51)                    # 0.2 everywhere: MSE 0.04 -> 10 log10(25) dB
    p, mse = data.psnr(a, b)
    assert abs(mse - 0.04) < 1e-9 and abs(p - 10 * math.log10(25)) < 1e-9


def test_subsampled_loss_equals_full_loss_when_all_positions_kept(small_cfg):
    torch.manual_seed(0)
    model = tb.TokenBridge(small_cfg)
    lat, lab = torch.randn(4, 4, 4, 4), torch.tensor([0, 1, 0, 1])
    model.calibrate(lat)
    torch.manual_seed(1)
    full = model(lat, lab)
    torch.manual_seed(1)
    # head_positions >= N: the forward pass itself
    assert torch.equal(recipe.TrainingLoss(model, small_cfg.seq_len)(lat, lab), full)
    # With the head on every masked position the subset path gives the same loss as forward: it
    # draws the same mask and label drop first, then only a ranking of the masked positions.
    seed = next(s for s in range(100) if torch.manual_seed(s) is not None
                and model.random_mask(4, lat.device)[0].sum() < small_cfg.seq_len)
    torch.manual_seed(seed)
    full = model(lat, lab)
    torch.manual_seed(seed)
    mask_count = int(model.random_mask(4, lat.device)[0].sum())
    torch.manual_seed(seed)
    sub = recipe.TrainingLoss(model, mask_count)(lat, lab)
    assert torch.allclose(sub, full, rtol=1e-5, atol=1e-5)


# --- the pipeline -------------------------------------------------------------------------------

def test_pipeline_writes_the_run_directory(tmp_path, fake_data, vae_dir, small_model, capsys):
    out = train.main(run_args(tmp_path / "run", fake_data, vae_dir, "--sample-every", "4"))
    run = tmp_path / "run"
    assert out["step"] == 6
    err = capsys.readouterr().err                                   # broken.png and notes.txt
    assert err.count("warning") == 1 and "skipped 2" in err
    for name in ("latents.npy", "latents.meta.pt", "reconstruction.json", "reconstruction.png",
                 "checkpoint.pt", "samples.png", "metrics.json"):
        assert (run / name).is_file(), name
    report = json.loads((run / "reconstruction.json").read_text())
    assert set(report) == {"images", "continuous", "levels_16", "levels_64"}
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    assert {"config", "model", "ema", "optimizer", "step", "rng", "horizons"} <= set(ck)
    assert ck["step"] == 6 and tb.TokenBridgeConfig.from_dict(ck["config"]).channels == 4
    cache = data.open_cache(run)
    assert cache.moments.shape == (41, 2, 2, 4, 4, 4)               # both flips, mean and std
    assert cache.unreadable.tolist() == [20] and torch.bincount(cache.labels).tolist() == [21, 20]
    # the cached flipped latents are the encodings of the flipped images
    vae = data.open_vae(vae_dir, 4, 4)
    images, _, _, _ = data.load_folder(fake_data, 16)
    m, s = data.encode_moments(vae, data.read_images(images, range(3))[0].flip(-1), 3, False,
                                vae.config.scaling_factor, torch.device("cpu"))
    assert torch.allclose(cache.read(range(3), 1), torch.stack([m, s], 1), atol=1e-5)
    grid = Image.open(run / "samples.png")
    assert grid.size == (10 * 16, 2 * 16)                                   # 2 classes x 10 samples
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 < metrics["val_bits_per_token"] < 8


def test_a_run_is_complete_before_its_optional_evaluation(tmp_path, fake_data, vae_dir, small_model,
                                                           monkeypatch):
    """The checkpoint written is the run done: metrics.json says so before the evaluation starts,
    so a run killed during a slow sample grid is still complete; --grid-per-class 0 skips it."""
    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed in the final evaluation")
    real = validation.validation_bits
    monkeypatch.setattr(validation, "validation_bits", killed)
    with pytest.raises(KeyboardInterrupt):
        train.main(run_args(tmp_path / "killed", fake_data, vae_dir))
    metrics = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert metrics["complete"] and metrics["step"] == 6 and "val_bits_per_token" not in metrics
    monkeypatch.setattr(validation, "validation_bits", real)
    train.main(run_args(tmp_path / "no-grid", fake_data, vae_dir, "--grid-per-class", "0"))
    metrics = json.loads((tmp_path / "no-grid" / "metrics.json").read_text())
    assert metrics["complete"] and 0 < metrics["val_bits_per_token"] < 8
    assert not (tmp_path / "no-grid" / "samples.png").exists()


def test_the_latent_geometry_comes_from_the_vae(vae_dir, tmp_path):
    """--vae sets the stride and channels whatever the preset says (another VAE needs no code),
    for a diffusers folder and for an LDM checkpoint alike; the truth is the built VAE itself."""
    args = train.get_parser().parse_args(["--preset", "large", "--vae", str(vae_dir)])
    config = train.build_config(train.resolve_flags(args))
    vae = data.open_vae(vae_dir, 4, 4)
    assert config.vae_stride == data.vae_stride(vae)
    assert config.channels == vae.config.latent_channels
    assert config.encoder_width == tb.TokenBridgeConfig.preset("large").encoder_width
    ref = torch.load(LDM_REFERENCE, weights_only=True)
    torch.save({"model": ref["model"]}, tmp_path / "tiny.ckpt")
    from lib import official
    built = official.load_ldm_vae(tmp_path / "tiny.ckpt")
    geometry = (data.vae_stride(built), built.config.latent_channels)
    assert data.vae_geometry(tmp_path / "tiny.ckpt") == geometry


def test_validation_hold_out_defaults_to_the_official_zero_on_a_folder():
    def resolved(*argv):
        return train.resolve_flags(train.get_parser().parse_args(list(argv))).val_size
    assert resolved() == 500 and resolved("--data", "somewhere") == 0
    assert resolved("--data", "somewhere", "--val-size", "50") == 50


def test_one_class_or_unconditional_trains_a_model_of_p_x(tmp_path, fake_data, vae_dir,
                                                          small_model):
    """A folder with one class (or --unconditional) trains with the null class only, and sample.py
    then samples with the null class by default."""
    import shutil

    import sample
    one = tmp_path / "one-class"
    shutil.copytree(fake_data / "square", one / "square")
    argv = run_argv(tmp_path / "run", one, vae_dir)
    train.main(train.get_parser().parse_args(argv + ["--val-size", "0", "--grid-per-class", "2",
                                                     "--num-iter", "2"]))
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    config = tb.TokenBridgeConfig.from_dict(ckpt["config"])
    assert config.unconditional and config.label_drop_prob == 1.0
    npz = tmp_path / "samples.npz"
    sample.main(sample.get_parser().parse_args([
        "--run-dir", str(tmp_path / "run"), "--num-images", "3", "--num-iter", "2", "--out", "",
        "--npz", str(npz), "--threads", "1", "--device", "cpu"]))
    assert np.load(npz)["labels"].tolist() == [config.num_classes] * 3
    train.main(run_args(tmp_path / "two", fake_data, vae_dir, "--unconditional", "--steps", "1",
                        "--grid-per-class", "0"))
    two = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)
    assert two["config"]["label_drop_prob"] == 1.0


def test_resume_is_bit_identical(tmp_path, fake_data, vae_dir, small_model):
    train.main(run_args(tmp_path / "straight", fake_data, vae_dir))
    train.main(run_args(tmp_path / "halves", fake_data, vae_dir, "--stop-after", "3"))
    half = torch.load(tmp_path / "halves" / "checkpoint.pt", weights_only=True)
    assert half["step"] == 3
    resume(tmp_path / "halves")
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "halves" / "checkpoint.pt", weights_only=True)
    assert b["step"] == 6
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    assert not torch.equal(a["model"]["head.out_bias"], half["model"]["head.out_bias"])  # it moved


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_resume_is_bit_identical_at_each_precision(tmp_path, fake_data, vae_dir, small_model,
                                                   precision):
    """--precision is the run's own: recorded, kept on resume (the loss scaler's state too), and a
    split run equals a straight one."""
    flags = ("--precision", precision)
    train.main(run_args(tmp_path / "straight", fake_data, vae_dir, *flags, "--grid-per-class", "0"))
    train.main(run_args(tmp_path / "halves", fake_data, vae_dir, *flags, "--stop-after", "3"))
    resume(tmp_path / "halves", "--grid-per-class", "0")
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "halves" / "checkpoint.pt", weights_only=True)
    assert a["args"]["precision"] == b["args"]["precision"] == precision
    assert (b["scaler"].get("scale", 1.0) > 1) == (precision == "fp16")   # an fp16 scale is saved
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name


def test_fp16_skips_a_step_whose_gradients_overflow():
    """The official fp16 recipe: a step whose scaled gradients overflow changes no weight and
    halves the scale; the next one trains."""
    torch.manual_seed(0)
    model = tb.TokenBridge(tb.TokenBridgeConfig(**SMALL_CFG)).calibrate(torch.randn(8, 4, 4, 4))
    opt = recipe.make_optimizer(model, 1e-3, 0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127)      # overflows float32 at once
    batch = [(torch.randn(4, 4, 4, 4), torch.tensor([0, 1, 0, 1]))]
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def step():
        return recipe.train_step(recipe.TrainingLoss(model), opt, batch, 1e-3, 3.0,
                                   torch.device("cpu"), "fp16", scaler)
    assert math.isfinite(step())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert scaler.get_scale() == 2.0 ** 126
    scaler.update(1.0)
    step()
    assert not torch.equal(before["head.out_bias"], model.state_dict()["head.out_bias"])


def test_resume_keeps_the_runs_own_runtime_flags(tmp_path, fake_data, vae_dir, small_model):
    """A grid switched off (or any runtime flag set) on the first launch stays so on --resume
    unless the resume says otherwise; the launch's own flags (here --stop-after) do not carry."""
    train.main(run_args(tmp_path / "run", fake_data, vae_dir, "--stop-after", "3",
                        "--grid-per-class", "0"))
    out = resume(tmp_path / "run")
    assert out["step"] == 6 and not (tmp_path / "run" / "samples.png").exists()
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["args"]["grid_per_class"] == 0 and ckpt["args"]["stop_after"] is None


def test_sample_grid_caps_decoding_steps_at_the_token_count(tmp_path, vae_dir):
    """The grid's default of 64 steps must work for a model with fewer positions (here 16)."""
    model = tb.TokenBridge(tb.TokenBridgeConfig(**SMALL_CFG)).eval()
    model.calibrate(torch.randn(8, 4, 4, 4))
    vae = data.open_vae(vae_dir, 4, 4)
    validation.sample_grid(model, vae, tmp_path / "grid.png", per_class=3, num_iter=64)
    assert Image.open(tmp_path / "grid.png").size == (3 * 16, 2 * 16)   # 2 classes x 3 samples


def test_ablation_switches_reach_the_model(tmp_path, fake_data, vae_dir, small_model):
    train.main(run_args(tmp_path / "r", fake_data, vae_dir, "--head", "parallel",
                        "--order", "default", "--levels", "8", "--steps", "2"))
    ck = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert ck["config"]["head"] == "parallel" and ck["config"]["levels"] == 8
    assert ck["model"]["quantizer.order"].tolist() == list(range(4))
    report = json.loads((tmp_path / "r" / "reconstruction.json").read_text())
    assert "levels_8" in report


# --- the latent cache: memory-mapped, never half-built ------------------------------------------

def write_sparse_cache(run_dir, n, row_shape, key):
    """A cache file of n rows that takes no disk space (a hole reads as zeros), and its header."""
    npy, meta = data.cache_paths(run_dir)
    with open(npy, "wb") as f:
        header = {"descr": "<f4", "fortran_order": False, "shape": (n, *row_shape)}
        np.lib.format.write_array_header_1_0(f, header)
        f.truncate(f.tell() + 4 * n * math.prod(row_shape))
    runs.atomic_save({"key": key, "shape": [n, *row_shape], "labels": torch.arange(n) % 10,
                       "unreadable": torch.zeros(0, dtype=torch.long)}, meta)


def test_cache_is_memory_mapped_and_read_row_by_row(tmp_path):
    """256 MB of moments (kl16's shape, 4,096 images, 2 flips); a training batch, the calibration
    subset and the validation rows allocate a few MB: nothing reads the file whole."""
    import tracemalloc
    n, row_shape = 4096, (2, 2, 16, 16, 16)
    write_sparse_cache(tmp_path, n, row_shape, {"k": 1})
    assert data.open_cache(tmp_path, {"k": 2}) is None                      # another key: rebuild
    tracemalloc.start()  # numpy reports its buffers to tracemalloc, so a whole read would show
    try:
        cache = data.open_cache(tmp_path, {"k": 1})
        train_idx, val_idx = data.split_validation(n, 100)
        latents, labels = data.get_batch(cache, train_idx, 0, 3, 64)
        modes = data.calibration_modes(cache, train_idx, max_latents=256)
        val = cache.read(val_idx, 0, moment=0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(cache.moments, np.memmap) and cache.moments.shape == (n, *row_shape)
    assert latents.shape == (64, 16, 16, 16) and modes.shape == (256, 16, 16, 16)
    assert val.shape == (100, 16, 16, 16)
    assert peak < 16 * 2 ** 20, peak                                # vs 256 MB for the file


def test_an_incomplete_or_other_cache_is_never_used(tmp_path, fake_data, vae_dir, small_model,
                                                    monkeypatch):
    run, encoder = tmp_path / "r", {"calls": 0}
    real_encode, real_save = data.posterior_moments, runs.atomic_save

    def counted(*a, **k):
        encoder["calls"] += 1
        if encoder["calls"] == encoder.get("crash_at"):
            raise RuntimeError("killed while encoding")
        return real_encode(*a, **k)

    def no_header(obj, path):
        if Path(path).name == "latents.meta.pt":
            raise RuntimeError("killed before the header")
        real_save(obj, path)
    monkeypatch.setattr(data, "posterior_moments", counted)
    train.main(run_args(run, fake_data, vae_dir, "--steps", "2"))   # a complete cache (2 flips)
    done = np.array(data.open_cache(run).moments)
    encoder.update(calls=0, crash_at=3)
    with pytest.raises(RuntimeError, match="killed"):               # a rebuild for 1 flip dies
        train.main(run_args(run, fake_data, vae_dir, "--steps", "2", "--flips", "1",
                            "--encode-batch", "8"))
    assert data.open_cache(run) is None and not (run / "latents.npy.tmp").exists()
    encoder.update(calls=0, crash_at=None)
    monkeypatch.setattr(runs, "atomic_save", no_header)                     # dies after the rename
    with pytest.raises(RuntimeError, match="killed"):
        train.main(run_args(run, fake_data, vae_dir, "--steps", "2", "--flips", "1"))
    assert (run / "latents.npy").is_file() and data.open_cache(run) is None
    monkeypatch.setattr(runs, "atomic_save", real_save)
    encoder.update(calls=0)
    train.main(run_args(run, fake_data, vae_dir, "--steps", "2", "--stop-after", "0"))
    assert encoder["calls"] > 0                                     # encoded again
    assert np.array_equal(data.open_cache(run).moments, done)


# --- errors: one line, nothing lost -------------------------------------------------------------

def test_a_folder_of_unreadable_images_is_one_clear_error(tmp_path, vae_dir, small_model):
    for name in ("a", "b"):
        (tmp_path / "data" / name).mkdir(parents=True)
        (tmp_path / "data" / name / "x.jpg").write_bytes(b"not a jpeg")
    # known once encoded
    with pytest.raises(ValueError, match="none of the 2 image files could be read"):
        train.main(run_args(tmp_path / "r", tmp_path / "data", vae_dir))
    with pytest.raises(ValueError, match="none of the 8 images drawn for a VAE training step"):
        images = data.load_folder(tmp_path / "data", 16)[0]
        data.train_vae(data.build_small_vae(4, 4, width=8), images, steps=1, batch=8, lr=1e-3,
                       kl_weight=1e-3, seed=0, device=torch.device("cpu"))


def test_resume_without_or_with_corrupt_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="no checkpoint to resume at"):
        train.main(train.get_parser().parse_args(["--resume", str(tmp_path)]))
    (tmp_path / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match=r"is not a checkpoint to resume \(truncated"):
        train.main(train.get_parser().parse_args(["--resume", str(tmp_path)]))


def main_cli(argv):
    """train.py's __main__: the parsed flags and the ones argv names."""
    return train.main(train.get_parser().parse_args(argv), train.given_flags(argv))


def test_resume_moves_the_horizon_with_steps_and_refuses_other_changes(tmp_path, fake_data,
                                                                       vae_dir, small_model,
                                                                       capsys):
    run = tmp_path / "r"
    train.main(run_args(run, fake_data, vae_dir, "--steps", "4"))
    resume = ["--resume", str(run), "--threads", "1", "--device", "cpu"]
    with pytest.raises(ValueError, match=r"changes --blr 0.5 \(the run has 0.004\)"):
        main_cli(resume + ["--blr", "0.5"])
    # a default, but given
    with pytest.raises(ValueError, match=r"changes --batch 64 \(the run has 8\)"):
        main_cli(resume + ["--batch", "64"])
    main_cli(resume + ["--batch", "8", "--steps", "6", "--save-every", "1"])  # its own value: fine
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 6 and ck["args"]["steps"] == 6 and ck["args"]["save_every"] == 1
    assert ck["horizons"] == [{"at_step": 4, "steps": [4, 6]}]
    assert "moves the end from 4 to 6" in capsys.readouterr().out
    with pytest.raises(ValueError, match="already at step 6; give a larger --steps"):
        main_cli(resume + ["--steps", "5"])


@pytest.mark.parametrize("flag, value, message", [
    ("--batch", "0", "--batch must be >= 1, got 0"),
    ("--steps", "0", "--steps must be >= 1, got 0"),
    ("--save-every", "0", "--save-every must be >= 1"),
    ("--blr", "-1", "--blr must be > 0"),
    ("--ema", "1", r"--ema must be in \[0, 1\)"),
    ("--num-iter", "0", "--num-iter must be >= 1")])
def test_impossible_numbers_are_refused_before_anything_is_written(tmp_path, flag, value, message):
    with pytest.raises(ValueError, match=message):
        main_cli(["--out", str(tmp_path / "r"), flag, value])
    assert not (tmp_path / "r").exists()


def test_a_launch_that_fails_early_leaves_no_run_folder(tmp_path):
    with pytest.raises(ValueError, match="must split evenly"):
        main_cli(["--out", str(tmp_path / "r"), "--batch", "10", "--micro-batch", "3"])
    assert not (tmp_path / "r").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        main_cli(["--data", str(tmp_path / "empty"), "--out", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()
    (tmp_path / "r").mkdir()                                 # a folder that was there stays
    with pytest.raises(ValueError, match="no images found"):
        main_cli(["--data", str(tmp_path / "empty"), "--out", str(tmp_path / "r")])
    assert (tmp_path / "r").is_dir()


def test_command_line_errors_are_one_line_and_a_failing_exit(tmp_path):
    cases = [["--batch", "0"]] + ([] if torch.cuda.is_available() else [["--device", "cuda"]])
    for argv in cases:
        command = [sys.executable, str(ROOT / "train.py"), "--out", str(tmp_path / "r"), *argv]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode != 0, (argv, proc.stderr)
        assert len(lines) == 1 and "error:" in lines[0], (argv, proc.stderr)
        assert not (tmp_path / "r").exists()
    assert "CUDA does not work here" in proc.stderr or torch.cuda.is_available()


def test_vae_mismatches_and_ckpt_are_clear_errors(vae_dir, tmp_path):
    with pytest.raises(ValueError, match="latent channels"):
        data.open_vae(vae_dir, 4, 16)
    with pytest.raises(ValueError, match="downsamples by 4"):
        data.open_vae(vae_dir, 8, 4)
    ldm = torch.load(LDM_REFERENCE, weights_only=True)
    torch.save({"model": ldm["model"]}, tmp_path / "kl16.ckpt")        # an LDM checkpoint, stride 2
    assert data.open_vae(tmp_path / "kl16.ckpt", 2, 16).config.latent_channels == 16
    with pytest.raises(ValueError, match="has 16 latent channels but the model expects 4"):
        data.open_vae(tmp_path / "kl16.ckpt", 2, 4)
    (tmp_path / "broken.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="broken.ckpt is not a torch checkpoint"):
        data.open_vae(tmp_path / "broken.ckpt", 2, 4)
    args = train.get_parser().parse_args(["--image-size", "30", "--out", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="divisible by vae_stride"):
        train.main(args)
    # a grayscale VAE of the right geometry: refused before any image meets its first conv
    from diffusers import AutoencoderKL
    AutoencoderKL(in_channels=1, out_channels=1, latent_channels=16, block_out_channels=(8,) * 3,
                  down_block_types=("DownEncoderBlock2D",) * 3, layers_per_block=1,
                  up_block_types=("UpDecoderBlock2D",) * 3,
                  norm_num_groups=8).save_pretrained(tmp_path / "gray")               # stride 4
    args = train.get_parser().parse_args(
        ["--vae", str(tmp_path / "gray"), "--out", str(tmp_path / "g"), "--preset", "tiny"])
    with pytest.raises(ValueError, match="encodes 1-channel and decodes 1-channel images, but"):
        train.main(args)


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, fake_data, vae_dir, small_model,
                                                         monkeypatch):
    calls = {"n": 0}
    real = recipe.TrainingLoss.forward

    def poisoned(self, latents, labels):
        calls["n"] += 1
        loss = real(self, latents, labels)
        return loss * float("nan") if calls["n"] == 5 else loss
    monkeypatch.setattr(recipe.TrainingLoss, "forward", poisoned)
    with pytest.raises(ValueError, match="non-finite loss .* at step 5.*last good checkpoint"):
        train.main(run_args(tmp_path / "r", fake_data, vae_dir))
    assert torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)["step"] == 4


def test_disk_full_while_saving_keeps_the_old_checkpoint(tmp_path, fake_data, vae_dir, small_model,
                                                         monkeypatch):
    train.main(run_args(tmp_path / "r", fake_data, vae_dir, "--steps", "2"))
    before = (tmp_path / "r" / "checkpoint.pt").read_bytes()

    def full(obj, f, *a, **k):  # f: the open temp file
        f.write(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(runs.torch, "save", full)
    with pytest.raises(ValueError, match="No space left.*intact"):
        runs.atomic_save({"x": 1}, tmp_path / "r" / "checkpoint.pt")
    assert (tmp_path / "r" / "checkpoint.pt").read_bytes() == before
    assert not (tmp_path / "r" / "checkpoint.pt.tmp").exists()
    assert torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)["step"] == 2


# --- several processes --------------------------------------------------------------------------

DDP_SCRIPT = """
import sys, torch
sys.path.insert(0, {root!r})
import tokenbridge as tb, train
train.build_config = lambda args: tb.TokenBridgeConfig(**{cfg!r})
train.main(train.get_parser().parse_args({argv!r}))
"""


@pytest.mark.slow
def test_ddp_two_processes_gloo(tmp_path, fake_data, vae_dir):
    """torchrun with 2 CPU processes: trains, rank 0 alone writes, both RNG streams are saved."""
    def argv(run):
        return ["--data", str(fake_data), "--vae", str(vae_dir), "--out", str(run),
                "--image-size", "16", "--num-classes", "2", "--levels", "16", "--val-size", "4",
                "--batch", "8", "--steps", "2", "--save-every", "2", "--num-iter", "2",
                "--threads", "1", "--head-positions", "4", "--device", "cpu"]
    script = tmp_path / "ddp_main.py"
    script.write_text(DDP_SCRIPT.format(root=str(ROOT), cfg=SMALL_CFG, argv=argv(tmp_path / "ddp")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--standalone", str(script)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ck = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 2 and len(ck["rng"]) == 2
    assert not torch.equal(ck["rng"][0]["torch"], ck["rng"][1]["torch"])  # each rank its masks


# Two gloo processes forked from one that has imported everything, DDP's torch._dynamo included
# (seconds per process otherwise): each rank computes its own micro-batch's loss, then
# train_step's under DDP, from the same RNG state.
DDP_LOSS_SCRIPT = """
import json, sys, torch
sys.path.insert(0, {root!r})
import torch._dynamo, torch.distributed as dist, tokenbridge as tb
from lib import recipe
from torch.nn.attention import sdpa_kernel
torch.set_num_threads(1)

def rank_losses(rank, out):
    dist.init_process_group("gloo", init_method=f"file://{{out}}/store", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = tb.TokenBridge(tb.TokenBridgeConfig(**{cfg!r})).calibrate(torch.randn(8, 4, 4, 4))
    batch = (torch.randn(4, 4, 4, 4) * (1 + rank), torch.tensor([0, 1, 0, 1]))
    torch.manual_seed(1 + rank)
    with sdpa_kernel(recipe.TRAINING_ATTENTION):
        own = recipe.TrainingLoss(model)(*batch).item()
    torch.manual_seed(1 + rank)
    ddp = torch.nn.parallel.DistributedDataParallel(recipe.TrainingLoss(model))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    logged = recipe.train_step(ddp, opt, [batch], 0.0, 1e9, torch.device("cpu"))
    with open(f"{{out}}/{{rank}}.json", "w") as f:
        json.dump({{"own": own, "logged": logged}}, f)
    dist.destroy_process_group()

torch.multiprocessing.start_processes(rank_losses, (sys.argv[1],), nprocs=2, start_method="fork")
"""


@pytest.mark.slow
def test_ddp_logs_the_mean_loss_of_the_ranks(tmp_path):
    """train_step's loss under 2 processes is the mean of the ranks' own losses, as one process
    over the same global batch would log it, not their sum."""
    script = tmp_path / "ddp_loss.py"
    script.write_text(DDP_LOSS_SCRIPT.format(root=str(ROOT), cfg=SMALL_CFG))
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    own = [r["own"] for r in ranks]
    assert own[0] != pytest.approx(own[1])                      # the ranks saw different data
    for r in ranks:
        assert r["logged"] == pytest.approx(sum(own) / 2, rel=1e-6)


# --- determinism: bit-identical weights on 2 threads, whatever stops the run -------------------

KILLABLE_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {root!r})
import tokenbridge as tb, train
train.build_config = lambda args: tb.TokenBridgeConfig(**{cfg!r})
kill_at_step, kill_in_save = {kill_at_step!r}, {kill_in_save!r}
forward, save, calls = train.TrainingLoss.forward, train.torch.save, {{"steps": 0, "saves": 0}}

def forward_then_die(self, *a):  # SIGKILL in the middle of a step, after its forward pass
    loss = forward(self, *a)
    calls["steps"] += 1
    if calls["steps"] == kill_at_step:
        os.kill(os.getpid(), signal.SIGKILL)
    return loss

def save_then_die(obj, file, *a, **k):  # SIGKILL half-way through writing a checkpoint
    if getattr(file, "name", "").endswith("checkpoint.pt.tmp"):
        calls["saves"] += 1
        if calls["saves"] == kill_in_save:
            save(obj, file, *a, **k)
            file.flush()
            os.truncate(file.name, os.path.getsize(file.name) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
    return save(obj, file, *a, **k)

train.TrainingLoss.forward, train.torch.save = forward_then_die, save_then_die
argv = sys.argv[1:]
train.main(train.get_parser().parse_args(argv), train.given_flags(argv))
"""


def weights(run):
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    tensors = {f"{k}.{n}": t for k in ("model", "ema", "optimizer") for n, t in flat(ckpt[k])}
    return ckpt["step"], tensors


def flat(state, prefix=""):
    """(name, tensor) for every tensor of a nested state dict (the optimizer's holds dicts)."""
    for k, v in state.items():
        if isinstance(v, dict):
            yield from flat(v, f"{prefix}{k}.")
        elif isinstance(v, torch.Tensor):
            yield f"{prefix}{k}", v


def assert_bit_identical(a, b):
    (step_a, wa), (step_b, wb) = weights(a), weights(b)
    assert step_a == step_b and wa.keys() == wb.keys()
    differing = [n for n in wa if not torch.equal(wa[n], wb[n])]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"


# A head wide enough that torch splits its backward between 2 threads (with SMALL_CFG it stays on
# one, and a nondeterministic reduction there would go unseen).
DETERMINISM_CFG = {**SMALL_CFG, "head_width": 64}


@pytest.fixture
def launch(tmp_path, fake_data, vae_dir):
    """train.py with the small model in a fresh process (2 threads by default) (the paper's loss:
    every masked position through the head); kill_at_step / kill_in_save make it SIGKILL itself.
    Returns the finished process."""
    def start(run, *extra, kill_at_step=None, kill_in_save=None, threads=2):
        script = tmp_path / "killable_main.py"
        script.write_text(KILLABLE_SCRIPT.format(root=str(ROOT), cfg=DETERMINISM_CFG,
                                                 kill_at_step=kill_at_step,
                                                 kill_in_save=kill_in_save))
        if "--resume" in extra:
            argv = list(extra)
        else:
            argv = run_argv(tmp_path / run, fake_data, vae_dir, "--steps", "8", "--batch", "16",
                            "--save-every", "100", "--head-positions", "0", *extra)
        command = [sys.executable, str(script), *argv, "--threads", str(threads)]
        return subprocess.run(command, capture_output=True, text=True, timeout=300)
    return start


@pytest.mark.slow
def test_two_threads_straight_split_killed_and_resumed_runs_are_bit_identical(tmp_path, launch):
    assert launch("a").returncode == 0
    assert launch("b").returncode == 0
    assert_bit_identical(tmp_path / "a", tmp_path / "b")                    # the same run twice
    assert launch("every3", "--save-every", "3").returncode == 0
    assert_bit_identical(tmp_path / "a", tmp_path / "every3")       # checkpoints change nothing
    assert launch("split", "--stop-after", "5").returncode == 0
    assert launch(None, "--resume", str(tmp_path / "split")).returncode == 0
    assert_bit_identical(tmp_path / "a", tmp_path / "split")
    killed = launch("step", "--save-every", "3", kill_at_step=5)    # dies in step 5, saved at 3
    assert killed.returncode == -signal.SIGKILL and weights(tmp_path / "step")[0] == 3
    assert launch(None, "--resume", str(tmp_path / "step")).returncode == 0
    assert_bit_identical(tmp_path / "a", tmp_path / "step")
    killed = launch("save", "--save-every", "3", kill_in_save=2)    # dies writing step 6
    assert killed.returncode == -signal.SIGKILL
    assert (tmp_path / "save" / "checkpoint.pt.tmp").exists()
    assert weights(tmp_path / "save")[0] == 3                       # the step-3 file is intact
    assert launch(None, "--resume", str(tmp_path / "save")).returncode == 0
    assert_bit_identical(tmp_path / "a", tmp_path / "save")


MATMUL_AT_1_AND_2_THREADS = """
import os, torch
os.environ["MKL_CBWR"] = "AUTO,STRICT"  # as train.py sets it
x, dy = torch.randn(4096, 256, generator=torch.Generator().manual_seed(0)), torch.randn(4096, 512)
torch.set_num_threads(1); one = dy.t() @ x
torch.set_num_threads(2); print(torch.equal(one, dy.t() @ x))
"""


@pytest.mark.slow
def test_deterministic_training_is_bit_identical_at_any_thread_count(tmp_path, launch):
    """--deterministic: 1 thread and 2 threads give the same weights (without it, LayerNorm's
    fused CPU backward sums its weight gradients per thread). It needs matrix products that round
    the same at any thread count, which MKL's strict CNR mode gives on Intel AVX2 and later."""
    probe = subprocess.run([sys.executable, "-c", MATMUL_AT_1_AND_2_THREADS], capture_output=True,
                           text=True)
    if probe.stdout.strip() != "True":
        pytest.skip("this CPU's matrix products change with the thread count even in MKL's "
                    "strict CNR mode")
    for threads in (1, 2):
        assert launch(f"t{threads}", "--deterministic", threads=threads).returncode == 0
    assert_bit_identical(tmp_path / "t1", tmp_path / "t2")
