"""Sample images from a TokenBridge run, with PyTorch or with ONNX Runtime (no torch needed).

    python sample.py --run-dir runs/demo --cfg 4 --temperature 0.7  # PyTorch, a PNG grid
    python sample.py --onnx runs/demo/onnx --runtime onnx           # ONNX Runtime (export.py first)
    torchrun --nproc_per_node 8 sample.py --run-dir RUN --num-images 50000 --npz fid.npz   # FID-50K

Sampling runs in batches with a progress bar; with --npz finished batches are kept, a re-run
samples only the missing ones, and torchrun's processes share them (jobs.sample_in_batches).
Batch b draws from default_rng((seed, b)) in both runtimes: a seed gives the same tokens in each.
The run folder is --run-dir, not --run: torchrun reads `--run` as an abbreviation of its own
--run-path and stops ("ambiguous option").
"""
import argparse
import contextlib
import hashlib
import os
import shutil
import sys

import numpy as np

from deploy import OnnxSampler, check_labels, latent_preview, save_grid, to_uint8
from lib.cli import DefaultsHelpFormatter, parse_labels, unwritable, use_tuned
from lib.files import npy_writer, npz_writer, write_atomic
from lib.jobs import Parts, process_slot, sample_in_batches


def onnx_runtime(args, device_id):
    """(classes, positions, weights' identity, sample(labels, num_iter, seed) -> tokens, images)."""
    checkpoint = os.path.join(args.run, "checkpoint.pt") if args.run else None
    sampler = OnnxSampler(args.onnx, args.device, threads=args.threads, checkpoint=checkpoint,
                          head_threads=args.head_threads, device_id=device_id)

    def sample(labels, num_iter, seed):
        tokens = sampler.sample_tokens(labels, num_iter, args.cfg, args.temperature, seed,
                                       args.cfg_mode, args.cfg_schedule, args.position_order)
        latents = sampler.unpatchify(sampler.dequantize(tokens))
        if not sampler.vae:
            return tokens, latent_preview(latents, sampler.stride)
        return tokens, to_uint8(sampler.decode(latents))
    config = sampler.config
    unconditional = config["label_drop_prob"] >= 1.0  # TokenBridgeConfig.unconditional
    return config["num_classes"], unconditional, sampler.N, sampler.meta["fingerprint"], sample


def torch_runtime(args, device_id):
    """The same as onnx_runtime, with the model and VAE of --run-dir in PyTorch."""
    import torch

    import tokenbridge as tb
    from lib import data, runs
    if args.threads:
        torch.set_num_threads(args.threads)
    device = runs.torch_device(args.device, device_id)
    if args.autocast != "none" and not device.startswith("cuda"):
        raise ValueError(f"--autocast {args.autocast} is for CUDA; on the CPU sampling runs in "
                         "fp32")
    model, _ = runs.load_run(args.run, device, args.weights)
    if args.capture:
        model.capture_sampler()
    vae_dir = os.path.join(args.run, runs.VAE_DIR)
    vae = runs.load_vae(vae_dir, device) if runs.has_vae(args.run) else None
    dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.autocast]

    @torch.no_grad()
    def sample(labels, num_iter, seed):
        # the official evaluation runs the model and the VAE decoder under autocast
        with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            tokens = model.sample_tokens(labels, num_iter, args.cfg, args.temperature, seed,
                                         args.cfg_mode, args.cfg_schedule, args.position_order)
            latents = tb.unpatchify(model.quantizer.dequantize(tokens), model.config.grid)
            if vae is None:
                images = latent_preview(latents.float().cpu().numpy(), model.config.vae_stride)
            else:
                images = data.decode(vae, latents)
        return tokens.cpu().numpy(), images
    config = model.config
    return config.num_classes, config.unconditional, config.seq_len, runs.fingerprint(model), sample


def main(args):
    check_args(args)
    given_labels = parse_labels(args.labels)
    if args.official:
        use_official(args)
    use_tuned(args)
    args.cfg = 1.0 if args.cfg is None else args.cfg
    args.temperature = 1.0 if args.temperature is None else args.temperature
    if args.runtime == "onnx" and not args.onnx:
        raise ValueError("--runtime onnx needs --onnx DIR (the folder export.py wrote, e.g. "
                         "RUN/onnx)")
    if args.runtime == "torch" and not args.run:
        raise ValueError("--runtime torch needs --run-dir RUN (a folder with checkpoint.pt)")

    # the model, in the runtime asked for, and the labels to sample
    _, world, local_rank = process_slot()
    runtime = onnx_runtime if args.runtime == "onnx" else torch_runtime
    classes, unconditional, positions, weights, sample = runtime(args, local_rank)
    if unconditional or args.unconditional:  # the null class
        labels = np.full(args.num_images, classes, np.int64)
    else:  # default: every class as often as the others (50 each for FID-50K on ImageNet)
        cycled = np.arange(args.num_images, dtype=np.int64) % classes
        labels = check_labels(cycled if given_labels is None else given_labels, classes)
    # one position per step by default: the paper's 256 steps for ImageNet's 256 positions
    num_iter = positions if args.num_iter is None else args.num_iter
    if not 1 <= num_iter <= positions:
        raise ValueError(f"num_iter must be in [1, {positions}] (one position at least per "
                         f"step), got {num_iter}")

    # sampling in batches: --npz keeps the finished ones for a re-run of the same settings
    same = ("runtime", "autocast", "batch_size", "seed", "cfg", "cfg_mode", "cfg_schedule",
            "temperature", "position_order")
    settings = {"weights": weights, "labels": hashlib.sha256(labels.tobytes()).hexdigest(),
                "num_iter": num_iter, **{k: getattr(args, k) for k in same}}
    if args.npz is None and world > 1:
        raise ValueError(f"{world} processes share the work through the batches they write next "
                         "to --npz; give --npz")
    with Parts(args.npz + ".parts", settings) if args.npz else contextlib.nullcontext() as parts:
        batches = sample_in_batches(lambda batch, seed: sample(batch, num_iter, seed), labels,
                                    args.batch_size, args.seed, parts)
        if batches is None:  # another rank: rank 0 writes the outputs
            return None
        tokens = write_outputs(args, batches, len(labels))
        if parts is not None:
            shutil.rmtree(parts.folder)  # all in --npz now
    return tokens


def write_outputs(args, batches, count):
    """One pass over the batches into every output asked for; the npz and the tokens stream to
    disk batch by batch. Returns the tokens when they are few enough to keep (no --npz)."""
    grid, kept = [], []
    with contextlib.ExitStack() as outputs:
        save_tokens = add_to_npz = None
        if args.save_tokens:
            save_tokens = outputs.enter_context(npy_writer(args.save_tokens, count))
        if args.npz:
            add_to_npz = outputs.enter_context(npz_writer(args.npz, count))
        for tokens, images, labels in batches:
            grid.append(images[:100 - sum(map(len, grid))])
            if save_tokens:
                save_tokens(tokens)
            if add_to_npz:
                add_to_npz(images, labels)
            else:
                kept.append(tokens)
    if args.out:
        first = np.concatenate(grid)  # the first 100; --npz holds them all
        write_atomic(args.out, lambda f: save_grid(first, f))
        print(f"wrote {args.out} ({min(count, 100)} of {count} images, {args.runtime})")
    if args.npz:
        print(f"wrote {args.npz} ({count} images, ADM layout: arr_0 (N, H, W, 3) uint8, labels)")
    return np.concatenate(kept) if kept else None


def use_official(args):
    """--official: convert the released weights into a run folder; released sampling defaults."""
    from lib import official
    args.run = official.import_official(args.official, args.preset, args.vae, args.run)
    released = official.RELEASED_SAMPLING.get(args.preset, {})
    vars(args).update({k: v for k, v in released.items() if getattr(args, k) is None})


def check_args(args):
    """Bad flags and unwritable outputs are refused before anything is loaded or sampled; the
    upper ends of num_iter and the labels depend on the model and are checked with it."""
    lowest = {"num_images": 1, "batch_size": 1, "num_iter": 1, "seed": 0, "threads": 0,
              "head_threads": 0, "cfg": 0, "temperature": 0}
    for key, low in lowest.items():
        value = getattr(args, key)
        # None: the default, or --official's released one; NaN fails too
        if value is not None and not value >= low:
            raise ValueError(f"--{key.replace('_', '-')} must be >= {low}, got {value}")
    if args.capture and args.runtime != "torch":
        raise ValueError("--capture is for --runtime torch (ONNX Runtime keeps its own graphs)")
    from PIL import Image
    extension = os.path.splitext(args.out or "")[1].lower()
    if args.out and Image.registered_extensions().get(extension) not in Image.SAVE:
        raise ValueError(f"--out {args.out}: not an image type Pillow writes; end the name in .png")
    outputs = {"--out": args.out, "--npz": args.npz, "--save-tokens": args.save_tokens}
    for flag, path in outputs.items():
        if path and (why := unwritable(path)):
            raise ValueError(f"{flag} {path}: cannot write there ({why})")


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--run-dir", dest="run", help="run folder with checkpoint.pt (and vae/): "
                        "the torch runtime's model and tuned settings")
    parser.add_argument("--weights", choices=["ema", "raw"], default="ema",
                        help="the EMA weights or the raw ones (a young run's EMA is near its init)")
    parser.add_argument("--onnx", help="folder written by export.py: the onnx runtime's graphs")
    parser.add_argument("--runtime", choices=["torch", "onnx"], default="torch",
                        help="which runtime samples")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: CUDA when it works; cuda: or an error")
    parser.add_argument("--autocast", choices=["none", "bf16", "fp16"], default="none",
                        help="torch on CUDA: half-precision matmuls (the official evaluation's "
                        "fp16; much faster, tokens then differ from ONNX Runtime's)")
    parser.add_argument("--capture", action="store_true",
                        help="torch: capture the head's channel step with torch.compile, replayed "
                        "as a CUDA graph on a GPU (fewer launches, the same tokens)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: the runtime's)")
    parser.add_argument("--head-threads", type=int, default=1,
                        help="ONNX Runtime threads of the head step on CPU (tiny operators)")
    parser.add_argument("--seed", type=int, default=0,
                        help="batch b draws from numpy.random.default_rng((seed, b))")
    parser.add_argument("--num-images", type=int, default=8, help="images when --labels is not "
                        "given: classes 0, 1, 2, ... cycling, each as often (50 per class for "
                        "50,000 ImageNet images)")
    parser.add_argument("--labels", help="comma-separated class labels")
    parser.add_argument("--unconditional", action="store_true",
                        help="sample --num-images with the null class")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="images per call; with --npz a re-run samples only missing batches")
    parser.add_argument("--num-iter", type=int, help="decoding steps (default: the run's tuned "
                        "ones, else one position per step: the paper's 256 for ImageNet)")
    parser.add_argument("--cfg", type=float, help="guidance scale (default: the run's tuned or "
                        "the released one, else 1 = off)")
    parser.add_argument("--cfg-mode", choices=["features", "logits"], default="features",
                        help="guide the features (paper) or logits")
    parser.add_argument("--cfg-schedule", choices=["linear", "constant"], default="linear",
                        help="guidance weight per step: from 1 to --cfg as positions are decoded "
                        "(paper), or --cfg")
    parser.add_argument("--temperature", type=float, help="sampling temperature, 0 = greedy "
                        "(default: the run's tuned one, else 1)")
    parser.add_argument("--position-order", choices=["random", "confidence"], default="random",
                        help="positions each step keeps: a random order, or the most confident")
    parser.add_argument("--out", default="samples.png",
                        help="PNG grid of the first 100 images ('' for none)")
    parser.add_argument("--save-tokens", help="save the token indices (B, N, C) to this .npy")
    parser.add_argument("--npz", help="ADM's .npz for FID: arr_0 (N, H, W, 3) uint8, labels")
    parser.add_argument("--official", help="official checkpoint-last.pth, converted into "
                        "--run-dir (default runs/official-PRESET)")
    parser.add_argument("--preset", default="large",
                        help="the size of the --official checkpoint (a preset: large, huge)")
    parser.add_argument("--vae", help="with --official: MAR's kl16.ckpt, converted into RUN/vae")
    return parser


if __name__ == "__main__":
    try:
        main(get_parser().parse_args())
    except ValueError as e:  # bad input: one line, not a traceback
        sys.exit(f"error: {e}")
