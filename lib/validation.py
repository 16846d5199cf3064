"""How a run is judged at its end: the validation NLL, the digits' sampling sweep, a sample grid."""
import math

import numpy as np
import torch
import torch.nn.functional as F

from deploy import save_grid
from lib import digit_metrics, runs
from lib.cli import SAMPLING_FILE
from lib.data import MASK_STREAM, decode, seeded_generator
from lib.files import write_atomic
from lib.recipe import autocast_context

METRICS_FILE = "metrics.json"  # a run's end: "complete" once its last checkpoint is written


# Validation images that share one mask ratio (random_mask draws one per call; a forward pass
# needs one count of masked positions): a fixed number, so the masks do not follow the batch.
VALIDATION_MASK_GROUP = 250


@torch.no_grad()
def validation_bits(model, latents, labels, seed=0, batch=64, per_channel=False,
                    precision="fp32"):
    """Validation NLL in bits per token (one token = one channel index) on held-out latents;
    per_channel: a (C,) tensor, one NLL per channel slot in generation order, instead. The
    forward passes take `batch` images (train.py: the micro-batch) under `precision`'s autocast.

    Each VALIDATION_MASK_GROUP images share a mask ratio, their masks drawn from a generator of
    (seed, group) alone: the number does not depend on `batch`, is comparable across steps and
    runs, and evaluating moves no global random state (the training's CPU and CUDA streams).
    """
    if batch < 1:
        raise ValueError(f"validation batch must be >= 1, got {batch}")
    device = next(model.parameters()).device
    autocast = autocast_context(precision, device)
    total, count = torch.zeros(model.config.channels, dtype=torch.float64), 0
    was_training = model.training
    model.eval()
    try:
        for lat, lab, mask in validation_batches(model, latents, labels, seed, batch, device):
            # logits (M, C, levels), targets (M, C): one NLL per masked position and slot
            with autocast:
                logits, targets = model.token_logits(lat.to(device), lab.to(device), mask)
            nll = F.cross_entropy(logits.transpose(1, 2).float(), targets, reduction="none")
            total += nll.double().sum(0).cpu()           # (C,), in float64: the same at any batch
            count += len(targets)
    finally:
        model.train(was_training)
    bits = total / count / math.log(2)
    return bits if per_channel else bits.mean().item()


def validation_batches(model, latents, labels, seed, batch, device):
    """(latents, labels, mask on `device`) of at most `batch` images, in order; the masks of
    group k (VALIDATION_MASK_GROUP images) from a generator of (seed, k)."""
    group = VALIDATION_MASK_GROUP
    for k, (lat, lab) in enumerate(zip(latents.split(group), labels.split(group), strict=True)):
        masks = model.random_mask(len(lat), device, seeded_generator(seed, k, stream=MASK_STREAM))
        yield from zip(lat.split(batch), lab.split(batch), masks.split(batch), strict=True)


def grid_classes(num_classes, rows=10):
    """At most `rows` classes, evenly spaced: the rows of a sample grid."""
    return torch.linspace(0, num_classes - 1, min(rows, num_classes)).round().long()


@torch.no_grad()
def sample_grid(model, vae, path, per_class=10, num_iter=16, cfg=2.0, temperature=1.0, seed=0,
                progress=False):
    """One row per class (at most 10 classes, evenly spaced), decoded with the VAE; num_iter
    at most the number of token positions (one position per step). Row r draws from seed
    (seed, r); progress: a bar over the rows."""
    from tqdm import tqdm
    config = model.config
    if config.unconditional:
        classes = torch.tensor([config.num_classes])  # the null class
    else:
        classes = grid_classes(config.num_classes)
    num_iter = min(num_iter, config.seq_len)
    rows = []
    was_training = model.training
    model.eval()  # no dropout in sampling
    try:
        for r, c in enumerate(tqdm(classes, desc="sample grid", unit="row", disable=not progress)):
            latents = model.generate(c.repeat(per_class), num_iter=num_iter, cfg=cfg,
                                     temperature=temperature, seed=(seed, r))
            rows.append(decode(vae, latents.cpu()))
    finally:
        model.train(was_training)
    write_atomic(path, lambda f: save_grid(np.concatenate(rows), f, cols=per_class))  # row: class


def final_evaluation(args, ema, vae, val_modes, val_labels, run_dir, metrics, log=print):
    """The end of a run, each phase announced as it starts and added to metrics.json as it ends:
    the validation NLL, the digits' sampling sweep (--sweep), the sample grid (--grid-per-class;
    0 skips it: at ImageNet size on a CPU it takes hours)."""
    if len(val_labels):
        log("[eval] validation NLL of the EMA weights")
        metrics["val_bits_per_token"] = validation_bits(ema, val_modes, val_labels,
                                                        batch=args.micro_batch,
                                                        precision=args.precision)
        runs.write_json(metrics, run_dir / METRICS_FILE)
        log(f"[eval] validation NLL {metrics['val_bits_per_token']:.4f} bits/token (EMA)")

    grid = {"num_iter": args.num_iter, "cfg": args.cfg, "temperature": args.temperature}
    if args.sweep and not args.data:  # the digits: the sampling settings that sample best, measured
        log("[eval] sampling sweep: cfg x temperature on few samples, the best again on more, "
            "then fewer steps for the best pair")
        rows, best = digit_metrics.sweep_sampling(ema, vae, seed=args.seed)
        grid = {k: best[k] for k in grid}
        runs.write_json({**best, "sweep": rows}, run_dir / SAMPLING_FILE)
        metrics.update({k: best[k] for k in ("fd", "class_accuracy", "precision", "recall")})
        runs.write_json(metrics, run_dir / METRICS_FILE)
        log(f"[eval] best sampling of {len(rows)} tried ({run_dir / SAMPLING_FILE}): cfg "
            f"{best['cfg']}, temperature {best['temperature']}, {best['num_iter']} steps: FD "
            f"{best['fd']:.1f}, class accuracy {best['class_accuracy']:.1%}, precision "
            f"{best['precision']:.2f}, recall {best['recall']:.2f}")

    if args.grid_per_class:
        log(f"[eval] sample grid: {args.grid_per_class} images per class, {grid['num_iter']} steps")
        sample_grid(ema, vae, run_dir / "samples.png", per_class=args.grid_per_class,
                    seed=args.seed, progress=True, **grid)
        log(f"[eval] samples in {run_dir / 'samples.png'}")
