"""Watch it decode: a few samples step by step, and one image channel by channel.

    python -m tools.watch --run-dir runs/demo --out docs/decoding    # -> docs/decoding.png, .gif

TokenBridge generates in two nested orders. The outer loop (MAR's) decodes the positions a few
at a time, on a cosine schedule (tokenbridge.mask_schedule), in a random order or the most
confident first; at each position the inner loop (the dimension-wise AR head) emits the C
channel tokens one by one in frequency order (paper Sec. 3.2): the channels that carry low
spatial frequencies first, so structure comes before detail. This script draws both, with the
run's own model and VAE:

  rows 1..B   one sample each; column s is the image after decoding step s of S (step 0: nothing
              known): the positions known so far, the unknown ones at the neutral latent (each
              channel's mean, the quantizer's normalised 0) and tinted, so the positions appear
              in the order the sampler picks them;
  last row    the first sample's finished tokens revealed channel by channel, in generation
              order: after c channels the others sit at their mean. Its last image is the
              sample itself, its first is the structure alone.

The GIF plays the same: frame s is every sample at step s, then the first sample, enlarged,
channel by channel; it loops, with a pause at the end. The samples are sample.py's first batch
for the same labels, seed and settings (both draw from default_rng((seed, 0))), and
--num-iter, --cfg and --temperature default to the run's tuned ones (RUN/sampling.json).
"""
import argparse
import math
import os
import sys

import numpy as np
import torch
from PIL import Image, ImageDraw

import tokenbridge as tb
from deploy import check_labels, tile
from lib import data, runs
from lib.cli import DefaultsHelpFormatter, unwritable, use_tuned
from lib.files import write_atomic
from lib.jobs import batch_seed

TINT = np.array([60, 80, 130], np.float32)  # unknown positions lean to slate blue: visible on
UNKNOWN_SHADE = 0.7                          # the digits' black background and on white alike
BAND = 16                                    # caption height in pixels (PIL's default font)
GAP = 2                                      # between tiles: white (PNG), black (GIF)
STEP_MS, HOLD_MS, CHANNEL_MS, END_MS = 300, 1200, 300, 2500  # GIF frame durations


# --- record: every step of the sampler ------------------------------------------------------------

def record(model, labels, num_iter, cfg, temperature, seed, **kwargs):
    """Sample and keep every step: final tokens (B, N, C) and [(tokens, mask)] after each of the
    S steps, mask (B, N) True = still unknown. The callback sees copies: the tokens are the same."""
    steps = []

    def keep(s, known, mask):
        steps.append((known, mask))

    tokens = model.sample_tokens(labels, num_iter, cfg, temperature, seed, on_step=keep, **kwargs)
    return tokens, steps


# --- latents: what is known, the rest at the neutral latent ---------------------------------------

def step_latents(model, tokens, mask):
    """Tokens (B, N, C), known where ~mask -> latents (B, C, h, w), the unknown ones at the mean."""
    quantizer = model.quantizer
    known = quantizer.dequantize(tokens)                                              # (B, N, C)
    values = torch.where(mask.unsqueeze(-1), quantizer.mean, known)                   # (B, N, C)
    return tb.unpatchify(values, model.config.grid)


def channel_latents(model, tokens):
    """One image's tokens (N, C) -> latents (C, C, h, w): image c keeps the channels of AR slots
    0..c (quantizer.order: slot -> channel), the others at their mean."""
    quantizer = model.quantizer
    slot = quantizer.order.argsort()                                 # (C,) channel -> its slot
    count = torch.arange(model.config.channels, device=slot.device)
    known = slot.unsqueeze(0) <= count.unsqueeze(1)                  # (C images, C channels)
    full = quantizer.dequantize(tokens)                                              # (N, C)
    values = torch.where(known.unsqueeze(1), full, quantizer.mean)                   # (C, N, C)
    return tb.unpatchify(values, model.config.grid)


# --- images: decoded by the VAE, unknown positions tinted -----------------------------------------

def shade(images, mask, config):
    """Tint the still-unknown positions of uint8 images (B, H, W, 3); mask (B, N)."""
    stride = config.vae_stride
    unknown = mask.reshape(-1, config.grid, config.grid).cpu().numpy()            # (B, h, w)
    unknown = unknown.repeat(stride, 1).repeat(stride, 2)[..., None]               # (B, H, W, 1)
    tinted = ((1 - UNKNOWN_SHADE) * images + UNKNOWN_SHADE * TINT).round().astype(np.uint8)
    return np.where(unknown, tinted, images)


def step_frames(model, vae, steps):
    """uint8 images (S+1, B, H, W, 3): before the first step (nothing known), then after each."""
    first_tokens, first_mask = steps[0]
    start = (torch.zeros_like(first_tokens), torch.ones_like(first_mask))  # nothing known yet
    frames = [shade(data.decode(vae, step_latents(model, known, mask)), mask, model.config)
              for known, mask in [start, *steps]]
    return np.stack(frames)


def channel_frames(model, vae, tokens):
    """uint8 images (C, H, W, 3): one image's tokens (N, C) after 1, 2, ..., C channels."""
    return data.decode(vae, channel_latents(model, tokens))


# --- the PNG: rows = samples, columns = steps; then the channel row -------------------------------

def enlarge(images, scale):
    """Nearest-neighbour upscaling of uint8 images (..., H, W, 3): tiny images stay crisp."""
    return images.repeat(scale, -3).repeat(scale, -2)


def shown_steps(num_steps, most):
    """The steps in the PNG: all of 0..S when they fit in `most` columns, else spread, 0 and S
    kept."""
    spread = np.linspace(0, num_steps, min(num_steps + 1, most)).round().astype(int)
    return sorted(set(spread.tolist()))


def row_name(label, config):
    return "null class" if label == config.num_classes else f"class {label}"


def strip(frames, channels, names, scale, most):
    """frames (S+1, B, H, W, 3), channels (C, H, W, 3), a name per row -> the PNG (PIL image)."""
    shown = shown_steps(len(frames) - 1, most)
    batch, size = frames.shape[1], frames.shape[2] * scale
    cell = size + GAP
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    margin = int(max(probe.textlength(name) for name in names)) + 8
    width = margin + max(len(shown), len(channels)) * cell
    canvas = Image.new("RGB", (width, 2 * BAND + (batch + 1) * cell), "white")
    draw = ImageDraw.Draw(canvas)

    # the samples, one column per shown step
    for j, s in enumerate(shown):
        x = margin + j * cell
        draw.text((x, 2), f"step {s}/{len(frames) - 1}", fill="black")
        for i in range(batch):
            canvas.paste(Image.fromarray(enlarge(frames[s, i], scale)), (x, BAND + i * cell))

    # the first sample, channel by channel
    top = BAND + batch * cell
    for c, image in enumerate(channels):
        x = margin + c * cell
        draw.text((x, top + 2), f"channels 1..{c + 1}", fill="black")
        canvas.paste(Image.fromarray(enlarge(image, scale)), (x, top + BAND))

    # row names, the channel row is the first sample again
    for i, name in enumerate(names + names[:1]):
        y = BAND + i * cell + (BAND if i == batch else 0)
        draw.text((4, y + size // 2 - 6), name, fill="black")
    return canvas


# --- the GIF: every sample at each step, then the first sample channel by channel -----------------

def captioned(image, text):
    """uint8 image (H, W, 3) under a black band with white text -> PIL image."""
    frame = Image.new("RGB", (image.shape[1], image.shape[0] + BAND), "black")
    frame.paste(Image.fromarray(image), (0, BAND))
    ImageDraw.Draw(frame).text((4, 2), text, fill="white")
    return frame


def animation(frames, channels, name, scale):
    """GIF frames and their durations (ms): S+1 step frames, then C channel frames of the first
    sample (`name`), enlarged to the grid's height; one size."""
    def apart(images):  # black between the tiles
        return np.pad(images, ((0, 0), (0, GAP), (0, GAP), (0, 0)))

    steps = len(frames) - 1
    grids = [tile(apart(enlarge(images, scale))) for images in frames]      # (rows*h, cols*w, 3)
    height, width = grids[0].shape[:2]
    size = height // frames.shape[2] * frames.shape[2]                       # a whole zoom factor
    y, x = (height - size) // 2, (width - size) // 2
    pictures = [captioned(grid, f"step {s}/{steps}") for s, grid in enumerate(grids)]
    for c, image in enumerate(channels):
        canvas = np.zeros_like(grids[0])
        canvas[y:y + size, x:x + size] = enlarge(image, size // frames.shape[2])
        pictures.append(captioned(canvas, f"{name}: channels 1..{c + 1}"))
    durations = [STEP_MS] * steps + [HOLD_MS] + [CHANNEL_MS] * (len(channels) - 1) + [END_MS]
    return pictures, durations


def save_png(image, path):
    write_atomic(path, lambda f: image.save(f, format="PNG"))


def save_gif(pictures, durations, path):
    """Loops forever; Pillow merges a frame identical to the one before (their durations add)."""
    def write(f):
        pictures[0].save(f, format="GIF", save_all=True, append_images=pictures[1:],
                         duration=durations, loop=0)

    write_atomic(path, write)


# --- command line ---------------------------------------------------------------------------------


def pick_labels(args, config):
    """--labels, else classes 0, 1, 2, ... for --num-images; the null class for p(x) models."""
    if config.unconditional:
        return np.full(args.num_images, config.num_classes, np.int64)
    if not args.labels:
        return np.arange(args.num_images, dtype=np.int64) % config.num_classes
    try:
        labels = np.array([int(x) for x in args.labels.split(",")], np.int64)
    except ValueError:
        raise ValueError(f"--labels must be comma-separated class numbers such as 3,3,7, "
                         f"got {args.labels!r}") from None
    return check_labels(labels, config.num_classes)


def check_args(args):
    """Bad flags and an unwritable --out are refused before anything is loaded or sampled."""
    for flag, value, low in (("--num-images", args.num_images, 1), ("--num-iter", args.num_iter, 1),
                             ("--cfg", args.cfg, 0), ("--temperature", args.temperature, 0),
                             ("--seed", args.seed, 0), ("--scale", args.scale, 0),
                             ("--max-columns", args.max_columns, 2)):
        if value is not None and not value >= low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if why := unwritable(args.out + ".png"):
        raise ValueError(f"--out {args.out}: cannot write there ({why})")


def main(args):
    """Sample with every step recorded, render, write OUT.png and OUT.gif; returns the images."""
    # Check the flags, load the run's model and VAE:
    check_args(args)
    use_tuned(args)
    device = runs.torch_device(args.device)
    model, _ = runs.load_run(args.run, device, args.weights)
    if not runs.has_vae(args.run):
        raise ValueError(f"{args.run} has no VAE folder ({runs.VAE_DIR}/); watch.py draws "
                         "decoded images")
    vae = runs.load_vae(os.path.join(args.run, runs.VAE_DIR), device)
    config = model.config

    # Sample, keeping every step:
    labels = pick_labels(args, config)
    num_iter = min(16, config.seq_len) if args.num_iter is None else args.num_iter
    cfg = 1.0 if args.cfg is None else args.cfg
    temperature = 1.0 if args.temperature is None else args.temperature
    tokens, steps = record(model, labels, num_iter, cfg, temperature, batch_seed(args.seed, 0),
                           position_order=args.position_order)

    # Decode every step, and the first sample channel by channel:
    frames = step_frames(model, vae, steps)                                 # (S+1, B, H, W, 3)
    channels = channel_frames(model, vae, tokens[0])                        # (C, H, W, 3)

    # Draw:
    scale = args.scale or math.ceil(96 / config.image_size)
    names = [row_name(int(label), config) for label in labels]
    save_png(strip(frames, channels, names, scale, args.max_columns), args.out + ".png")
    save_gif(*animation(frames, channels, names[0], scale), args.out + ".gif")
    print(f"wrote {args.out}.png and {args.out}.gif: {len(labels)} samples, {num_iter} steps "
          f"(cfg {cfg}, temperature {temperature}), {config.channels} channels")
    return frames, channels


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--run-dir", dest="run", required=True,
                        help="run folder with checkpoint.pt and vae/ (train.py writes both)")
    parser.add_argument("--out", default="decoding",
                        help="writes OUT.png (the strip) and OUT.gif (the animation)")
    parser.add_argument("--labels",
                        help="comma-separated class labels (default: classes 0, 1, 2, ...)")
    parser.add_argument("--num-images", type=int, default=8,
                        help="samples when --labels is not given")
    parser.add_argument("--num-iter", type=int,
                        help="decoding steps (default: the run's tuned ones, else 16 at most)")
    parser.add_argument("--cfg", type=float,
                        help="guidance scale (default: the run's tuned one, else 1 = off)")
    parser.add_argument("--temperature", type=float,
                        help="sampling temperature (default: the run's tuned one, else 1)")
    parser.add_argument("--position-order", choices=["random", "confidence"], default="random",
                        help="which positions each step decodes: a random order, or the most "
                             "confident")
    parser.add_argument("--seed", type=int, default=0,
                        help="draws from default_rng((seed, 0)), as sample.py's first batch")
    parser.add_argument("--weights", choices=["ema", "raw"], default="ema",
                        help="the run's EMA weights (when it has them) or the raw ones")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: CUDA when it works")
    parser.add_argument("--scale", type=int, default=0,
                        help="screen pixels per image pixel (0: images at least 96 pixels wide)")
    parser.add_argument("--max-columns", type=int, default=17,
                        help="step columns in the PNG at most (spread evenly; the GIF has every "
                             "step)")
    return parser


if __name__ == "__main__":
    try:
        main(get_parser().parse_args())
    except ValueError as e:  # bad input: one line, not a traceback
        sys.exit(f"error: {e}")
