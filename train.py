"""Train TokenBridge: images -> frozen VAE latents -> calibrated quantizer -> masked AR model.

    python train.py                                   # the CPU demo: 5,000 real MNIST digits
    python train.py --data DIR --vae kl16.ckpt --preset large --out runs/large
    torchrun --nproc_per_node 8 train.py --data DIR --vae kl16.ckpt --preset large --out runs/large
    python train.py --resume runs/demo                # continue a run exactly where it stopped

train() reads top to bottom (TokenBridge, arXiv 2503.16430): 1. data (an ImageNet-style folder
or the built-in digits), 2. the frozen VAE (the demo trains a small one), 3. the latent cache
(lib/data.py), 4. calibration (paper Sec. 3.1-3.2), 5. training with the preset's recipe
(lib/recipe.py), 6. evaluation: validation NLL and a sample grid from the EMA weights. Everything
goes to the run folder (--out). On the CPU the same seed, data and flags give bit-identical
weights, and a run stopped anywhere and resumed ends as a run straight through.
"""
import os

if __name__ == "__main__":
    # OpenMP threads busy-wait by default, which starves any other process on a small machine;
    # OpenMP reads this when torch loads it, so before the imports below (a user's setting wins).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import contextlib
import copy
import functools
import gc
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import Subset
from tqdm import tqdm

import tokenbridge as tb
from lib import data, runs
from lib.cli import DefaultsHelpFormatter
from lib.distributed import barrier, log, set_threads, setup_distributed
from lib.gpu_costs import GIB, training_memory, vae_bytes
from lib.jobs import check_launcher, exclusive
from lib.recipe import (PRECISIONS, TrainingLoss, loss_scaler, lr_at, make_optimizer,
                        make_thread_invariant, recipe_summary, resolve_recipe, train_step,
                        update_ema)
from lib.resume import restore_state, resume_flags, save_checkpoint
from lib.validation import METRICS_FILE, final_evaluation, sample_grid

# The smallest value of each numeric flag: below it the run would fail late or do nothing.
LOWER_BOUNDS = {"grid_per_class": 0, "steps": 1, "batch": 1, "micro_batch": 1, "warmup_epochs": 0,
                "save_every": 1, "sample_every": 0, "stop_after": 0, "val_size": 0, "vae_steps": 1,
                "vae_batch": 1, "encode_batch": 1, "workers": 0, "threads": 0, "head_positions": 0,
                "num_iter": 1, "cfg": 0, "temperature": 0, "grad_clip": 0, "weight_decay": 0,
                "vae_kl": 0}


def main(args, given=None):
    """given: the flags the command line named (given_flags); None counts every flag whose value
    differs from its default as given."""
    check_args(args)
    if given is None:
        given = {k for k, v in vars(args).items() if v != get_parser().get_default(k)}
    # MKL's matrix products split long sums between threads: strict conditional numerical
    # reproducibility keeps their rounding the same at any thread count. Read when MKL first runs.
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
    dist_info, device = setup_distributed(args.device)
    set_threads(args.threads, dist_info["local_world"])
    # a launch that fails before writing anything leaves no empty run folder behind
    new_folder = None if args.resume or os.path.exists(args.out) else Path(args.out)
    try:
        return train(args, given, dist_info, device)
    except BaseException:
        with contextlib.suppress(OSError):  # another rank may remove it first
            if new_folder is not None and not any(new_folder.iterdir()):
                new_folder.rmdir()
        raise
    finally:
        if dist.is_initialized():
            gc.collect()  # DDP's wrapper sits in reference cycles; its gloo threads must go first
            dist.destroy_process_group()


def train(args, given, dist_info, device):
    rank0, world, started = dist_info["rank"] == 0, dist_info["world"], time.time()

    # The run: a resumed one's own flags and checkpoint, or a new one's flags resolved once
    if args.resume:
        args, ckpt, horizon = resume_flags(args, given)
    else:
        args, ckpt, horizon = resolve_flags(args), None, None
    # the run's precision, resolved once (a checkpoint records it; before the flag: bf16 on CUDA)
    default_precision = "bf16" if device.type == "cuda" else "fp32"
    args.precision = getattr(args, "precision", None) or default_precision
    horizons = ckpt["horizons"] if ckpt else []
    config = tb.TokenBridgeConfig.from_dict(ckpt["config"]) if ckpt else build_config(args)
    micro_batch = min(args.micro_batch, args.batch // world)
    if args.batch % world or (args.batch // world) % micro_batch:
        raise ValueError(f"--batch {args.batch} (global) must split evenly into {world} "
                         f"process(es) x micro-batches of --micro-batch {args.micro_batch}")
    if device.type == "cuda":
        check_gpu_memory(args, config, micro_batch, world, device, dist_info)
    run_dir = Path(args.out)  # made only once the flags hold together
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier(dist_info)
    log(recipe_summary(args, config), dist_info)

    # 1. Data: an image folder, decoded lazily, or the built-in digits
    images, labels, classes, non_images = data.load_images(args.data, config.image_size)
    if not ckpt and (args.unconditional or len(classes) == 1):
        config = replace(config, label_drop_prob=1.0)  # every label the null class: p(x)
        log("[data] unconditional: every image trains with the null class", dist_info)
    if len(classes) > config.num_classes:
        raise ValueError(f"the data has {len(classes)} classes but the config has num_classes="
                         f"{config.num_classes}; pass --num-classes")
    image_shape = (3, config.image_size, config.image_size)
    log(f"[data] {len(images)} images, {len(classes)} classes, {image_shape}", dist_info)
    train_idx, val_idx = data.split_validation(len(images), args.val_size)

    # 2. The frozen VAE: --vae, the run's own copy, or a small one trained on the training images
    train_images = Subset(images, train_idx.tolist())
    vae, vae_source = prepare_vae(args, config, train_images, run_dir, device, dist_info)
    scaling, stride = vae.config.scaling_factor, data.vae_stride(vae)
    log(f"[vae] scaling_factor {scaling:.4f}, stride {stride}", dist_info)

    # 3. The latent cache: every image encoded once (lib/data.py); unreadable files are left out
    cache = prepare_latents(args, config, vae, images, labels, device, dist_info)
    if len(cache.unreadable) == len(images):
        raise ValueError(f"--data {args.data}: none of the {len(images)} image files could be "
                         "read as an image")
    if rank0:
        unreadable = [images.files[i] for i in cache.unreadable.tolist()]
        data.warn_skipped(args.data, non_images + unreadable)
    train_idx, val_idx = cache.readable(train_idx), cache.readable(val_idx)

    # 4. Calibration: the quantizer's statistics and the channel order (paper Sec. 3.1-3.2)
    torch.manual_seed(args.seed)
    model = data.calibrate(tb.TokenBridge(config), cache, train_idx)
    if args.deterministic:  # bit-identical at any thread count, not only at this one
        make_thread_invariant(model)
    if ckpt:
        model.load_state_dict(ckpt["model"])
    model.to(device)
    log(f"[model] preset {args.preset}: {model.num_params() / 1e6:.2f}M parameters, "
        f"levels {config.levels}, head {config.head}, "
        f"order {config.order} {model.quantizer.order.tolist()}", dist_info)
    val_modes = cache.read(val_idx, 0, moment=0)  # at most --val-size
    val_labels = cache.labels[val_idx]
    if rank0 and not ckpt:
        # on held-out images, else on training ones (the VAE never trained on the held-out ones)
        shown = (val_idx if len(val_idx) else train_idx)[:64 if args.data else 500]
        originals = data.channels_last(data.read_images(images, shown)[0])
        modes = cache.read(shown, 0, moment=0)
        report = data.reconstruction_report(vae, model.quantizer, originals, modes,
                                            config.levels, run_dir)
        psnrs = (f"{k} {v['psnr']:.2f} dB" for k, v in report.items() if k != "images")
        log("[calibration] reconstruction PSNR: " + ", ".join(psnrs))

    # 5. Training with the preset's recipe (lib/recipe.py)
    steps_per_epoch = max(1, len(train_idx) // args.batch)
    args.steps = args.steps or max(1, round(args.epochs * steps_per_epoch))
    lr = args.blr * args.batch / 256
    lr_of = functools.partial(lr_at, lr=lr, warmup_steps=args.warmup_epochs * steps_per_epoch,
                              total_steps=args.steps, schedule=args.lr_schedule)
    model.set_grad_checkpointing(args.grad_checkpointing)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = make_optimizer(model, lr, args.weight_decay)
    scaler = loss_scaler(args.precision, device)
    if ckpt:
        start_step = restore_state(ckpt, horizon, args, ema, opt, scaler, lr_of, dist_info)
        del ckpt  # the pages of the memory-mapped file it read would stay in this process
    else:
        start_step = 0
        torch.manual_seed(args.seed + dist_info["rank"])  # mask/label-drop randomness per rank
    loss_fn = TrainingLoss(model, args.head_positions)
    if world > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        loss_fn = torch.nn.parallel.DistributedDataParallel(loss_fn, device_ids=device_ids)
    accumulated = args.batch // world // micro_batch
    log(f"[train] {args.steps} steps ({args.steps / steps_per_epoch:g} epochs of "
        f"{steps_per_epoch} steps, {len(train_idx)} images); global batch {args.batch} = "
        f"{world} process(es) x {accumulated} accumulated micro-batch(es) of {micro_batch}; "
        f"{torch.get_num_threads()} threads each, device {device}", dist_info)

    # The loop: a step, the EMA, a grid every --sample-every and a checkpoint every --save-every
    end = args.steps if args.stop_after is None else min(args.steps, start_step + args.stop_after)
    bar = tqdm(range(start_step, end), desc="train", unit="step", disable=not rank0,
               initial=start_step, total=args.steps)
    t0, launcher = time.time(), os.getppid()
    for step in bar:
        check_launcher(launcher)  # a killed torchrun leaves no rank training
        latents, labels = data.get_batch(cache, train_idx, args.seed, step, args.batch,
                                         dist_info["rank"], world)
        micro_batches = list(zip(latents.split(micro_batch), labels.split(micro_batch),
                                 strict=True))
        loss = train_step(loss_fn, opt, micro_batches, lr_of(step), args.grad_clip, device,
                          args.precision, scaler)
        if not math.isfinite(loss):
            saved = (run_dir / runs.CHECKPOINT).exists()
            kept = "the last good checkpoint is kept" if saved else "none was written"
            raise ValueError(f"non-finite loss ({loss}) at step {step + 1}; stopped, {kept}")
        update_ema(ema, model, step, args.ema, args.ema_ramp)
        done = step + 1
        images_per_s = (done - start_step) * args.batch / (time.time() - t0)
        bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{images_per_s:.0f}")
        grid_due = args.sample_every and done % args.sample_every == 0 and done < args.steps
        if rank0 and args.grid_per_class and grid_due:
            sample_grid(ema, vae, run_dir / "samples.png", per_class=args.grid_per_class,
                        num_iter=args.num_iter, cfg=args.cfg, temperature=args.temperature,
                        seed=args.seed)
        if done % args.save_every == 0 or done == end:
            save_checkpoint(run_dir, model, ema, (opt, scaler), done, args, horizons, classes,
                            vae_source, dist_info)

    # 6. Evaluation: the validation NLL and a sample grid, from the EMA weights
    if rank0 and end == args.steps:
        # complete once the last checkpoint is written: marked before the optional evaluation
        metrics = {"step": end, "complete": True, "wall_s": round(time.time() - started, 1)}
        runs.write_json(metrics, run_dir / METRICS_FILE)
        final_evaluation(args, ema, vae, val_modes, val_labels, run_dir, metrics, log)
    barrier(dist_info)
    return {"run_dir": str(run_dir), "step": end}


# ---------------------------------------------------------------------------------------------
# Flags: no flag the user gave is ever silently ignored (what --resume keeps: lib/resume.py)
# ---------------------------------------------------------------------------------------------

def check_args(args):
    for key, low in LOWER_BOUNDS.items():
        value = getattr(args, key)
        if value is not None and value < low:
            raise ValueError(f"--{key.replace('_', '-')} must be >= {low}, got {value}")
    for key in ("blr", "epochs", "vae_lr"):
        value = getattr(args, key)
        if value is not None and not value > 0:
            raise ValueError(f"--{key.replace('_', '-')} must be > 0, got {value}")
    if args.ema is not None and not 0 <= args.ema < 1:
        raise ValueError(f"--ema must be in [0, 1), got {args.ema}")


def check_gpu_memory(args, config, micro_batch, world, device, dist_info):
    """Refuses a micro-batch whose step would not fit the GPU, before anything is written: the
    peak of a step, counted on the CPU at the model's shapes (cuda_on_cpu, ~20 s for L)."""
    peak = training_memory(config, micro_batch, args.precision, args.grad_checkpointing,
                           args.head_positions, world, resident_bytes=vae_bytes(config))
    total = torch.cuda.get_device_properties(device).total_memory
    checkpointing = ", checkpointing" if args.grad_checkpointing else ""
    if peak > total:
        raise ValueError(
            f"--micro-batch {micro_batch}: a {args.preset} step ({args.precision}{checkpointing}) "
            f"peaks at {peak / GIB:.1f} GiB, more than this GPU's {total / GIB:.1f} GiB; "
            "lower --micro-batch (accumulation keeps --batch) or add --grad-checkpointing "
            f"(python -m tools.benchmark memory --preset {args.preset} prints the peak of each)")
    log(f"[memory] a step peaks at {peak / GIB:.1f} GiB of the GPU's {total / GIB:.1f} GiB "
        f"(micro-batch {micro_batch}, {args.precision}{checkpointing}; counted at the model's "
        "shapes, every position masked)", dist_info)


def resolve_flags(args):
    """Every flag left to a default gets its value, once, before anything is saved: the preset
    (digits, the demo), its recipe, and the flips (digits are not mirror-symmetric)."""
    args = copy.copy(args)
    args.preset = args.preset or "digits"
    if args.flips is None:
        args.flips = 2 if args.data else 1
    if args.val_size is None:
        args.val_size = 0 if args.data else 500
    return resolve_recipe(args)


def given_flags(argv):
    """The destinations of the flags that argv names, defaults aside."""
    parser = get_parser()
    for action in parser._actions:
        # a flag that argv does not name stays out of the namespace
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


# ---------------------------------------------------------------------------------------------
# Data, VAE and latent cache for this run (lib/data.py does the work)
# ---------------------------------------------------------------------------------------------

def build_config(args):
    """The preset with the flags that override it; with --vae, the latent grid and channels are the
    VAE's (kl16: stride 16, 16 channels, as the ImageNet presets; another VAE needs no edit)."""
    overrides = {"levels": args.levels, "head": args.head, "order": args.order,
                 "image_size": args.image_size, "num_classes": args.num_classes}
    if args.vae:
        overrides["vae_stride"], overrides["channels"] = data.vae_geometry(args.vae)
    chosen = {k: v for k, v in overrides.items() if v is not None}
    return tb.TokenBridgeConfig.preset(args.preset, **chosen)


def prepare_vae(args, config, images, run_dir, device, dist_info):
    """(VAE, where it came from): --vae, else the run's own vae/, else one trained on this data
    by rank 0. The run keeps a copy in RUN/vae, which sample.py and export.py read."""
    own = run_dir / runs.VAE_DIR
    if args.vae:
        vae = data.open_vae(args.vae, config.vae_stride, config.channels)
        if dist_info["rank"] == 0 and not runs.has_vae(run_dir):
            vae.save_pretrained(own)
        return vae.to(device), str(args.vae)
    if not runs.has_vae(run_dir) and dist_info["rank"] == 0:
        log(f"[vae] training a small AutoencoderKL for {args.vae_steps} steps on "
            f"{len(images)} images")
        torch.manual_seed(args.seed)
        vae = data.build_small_vae(config.vae_stride, config.channels)
        vae = data.train_vae(vae, images, args.vae_steps, args.vae_batch, args.vae_lr,
                             args.vae_kl, args.seed, device)
        vae.save_pretrained(own)
    barrier(dist_info)
    return data.open_vae(own, config.vae_stride, config.channels).to(device), str(own)


def prepare_latents(args, config, vae, images, labels, device, dist_info):
    """The latent cache at --latents (default: the run folder), memory-mapped by every rank. Unless
    one of this key is complete, every rank encodes its share of the missing rows while rank 0
    holds the cache's lock for the job (one writer; lib/data.py says how a killed build resumes)."""
    rank, world, t = dist_info["rank"], dist_info["world"], time.time()
    where = args.latents or args.out
    npy = data.cache_paths(where)[0]
    shape = (len(images), args.flips, 2, config.channels, config.grid, config.grid)
    done = 0
    with contextlib.ExitStack() as lock:
        if rank == 0:
            key = data.latent_key(args.data, images, vae, args.flips, config.image_size)
            if data.open_cache(where, key) is None:
                npy.parent.mkdir(parents=True, exist_ok=True)
                lock.enter_context(exclusive(data.cache_file(where, ""), f"the latent cache {npy}"))
                done = data.start_build(where, key, shape, replace=args.latents is None) or 0
                if done:
                    log(f"[cache] resuming the build of {npy}: {done} of {len(images)} images done")
        barrier(dist_info)  # rank 0 has decided: a build record, or a complete cache
        if data.build_started(where):
            workers, t_fill = args.workers if args.data else 0, time.time()
            data.fill_cache(vae, images, args.encode_batch, workers, device, where, rank, world)
            barrier(dist_info)
            if rank == 0:
                data.finish_build(where, labels)
                count, seconds = len(images) - done, time.time() - t_fill
                log(f"[cache] encoded {count} images in {seconds:.1f} s on {world} process(es): "
                    f"{count / seconds:.2f} images/s")
    barrier(dist_info)
    cache = data.open_cache(where)  # its key checked by rank 0
    if cache is None:
        raise ValueError(f"no complete latent cache at {npy} after rank 0 wrote it (is it on a "
                         "filesystem that every node shares?)")
    log(f"[cache] latents {cache.moments.shape} (N, flips, mean|std, C, h, w), memory-mapped from "
        f"{npy} ({time.time() - t:.1f} s)", dist_info)
    return cache


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=DefaultsHelpFormatter)
    # the data, the VAE and the run
    parser.add_argument("--data",
                        help="ImageNet-style folder (one sub-folder per class); "
                        "default: the built-in digits")
    parser.add_argument("--vae",
                        help="diffusers AutoencoderKL folder or MAR's kl16.ckpt "
                        "(default: train a small one)")
    parser.add_argument("--out", default="runs/demo", help="run folder")
    parser.add_argument("--resume", help="continue the run in this folder from its checkpoint.pt")
    # the model
    parser.add_argument("--preset", choices=sorted(tb.PRESETS),
                        help="model configuration and its recipe (default: digits)")
    parser.add_argument("--image-size", type=int, help="image size (default: the preset's)")
    parser.add_argument("--num-classes", type=int, help="classes (default: the preset's)")
    parser.add_argument("--unconditional", action="store_true",
                        help="ignore the class folders: a model of p(x) that samples with the "
                        "null class (a folder with a single class trains so too)")
    parser.add_argument("--levels", type=int,
                        help="quantization levels per channel (default: the preset's, 64)")
    parser.add_argument("--head", choices=["ar", "parallel"],
                        help="ablation: AR or parallel channel head")
    parser.add_argument("--order", choices=["frequency", "default"],
                        help="ablation: channel order")
    # the images, the demo VAE and the latent cache
    parser.add_argument("--flips", type=int, choices=[1, 2],
                        help="1: no flip, 2: random horizontal flip (default: 2 for --data)")
    parser.add_argument("--val-size", type=int,
                        help="held-out images for the validation NLL, at most 10%% (default: "
                        "500 digits; 0 with --data, as the official code trains on all of "
                        "ImageNet)")
    parser.add_argument("--vae-steps", type=int, default=500,
                        help="training steps of the demo VAE")
    parser.add_argument("--vae-batch", type=int, default=64, help="batch size of the demo VAE")
    parser.add_argument("--vae-lr", type=float, default=2e-3,
                        help="peak learning rate of the demo VAE (warm-up + cosine)")
    parser.add_argument("--vae-kl", type=float, default=1e-4,
                        help="KL weight per latent element (vs per-pixel MSE)")
    parser.add_argument("--latents",
                        help="latent cache: an existing folder (its latents.npy) or a file prefix "
                        "(PREFIX.npy); runs of the same images, VAE, flips and image size can "
                        "share one (default: the run folder)")
    parser.add_argument("--encode-batch", type=int, default=64,
                        help="images per VAE call and process when filling the latent cache: "
                        "kl16 at 256 px holds ~160 MB of fp32 activations per image, so 64 "
                        "(~10 GB) fits a 16-24 GB GPU")
    parser.add_argument("--workers", type=int, default=4,
                        help="processes decoding --data images while the latent cache is filled")
    # the recipe: the preset's by default (recipe.RECIPES; large: TokenBridge-L's official one)
    parser.add_argument("--batch", type=int,
                        help="global batch size (all processes and accumulated micro-batches "
                        "together)")
    parser.add_argument("--micro-batch", type=int,
                        help="images per forward pass and process; the rest is gradient "
                        "accumulation")
    parser.add_argument("--blr", type=float,
                        help="base learning rate: lr = blr * batch / 256 (AdamW, betas 0.9/0.95)")
    parser.add_argument("--epochs", type=float,
                        help="training length in epochs of the training images")
    parser.add_argument("--steps", type=int,
                        help="training length in optimizer steps (default: from --epochs)")
    parser.add_argument("--warmup-epochs", type=float, help="linear warm-up from 0, in epochs")
    parser.add_argument("--lr-schedule", choices=["cosine", "constant"],
                        help="after warm-up: cosine to 0, or constant")
    parser.add_argument("--weight-decay", type=float,
                        help="AdamW weight decay, on every parameter but 1-D ones and biases")
    parser.add_argument("--grad-clip", type=float, help="max gradient norm")
    parser.add_argument("--ema", type=float, help="EMA rate of the weights")
    parser.add_argument("--ema-ramp", action=argparse.BooleanOptionalAction,
                        help="let the EMA rate grow to --ema (official: no)")
    parser.add_argument("--head-positions", type=int,
                        help="train the AR head on this many masked positions per image (0: all)")
    parser.add_argument("--precision", choices=sorted(PRECISIONS),
                        help="autocast of the forward passes: bf16 (default on CUDA), fp16 with "
                        "a loss scaler that skips overflowing steps (GPUs without bf16; the "
                        "official code's), fp32 (default on the CPU; to debug NaNs)")
    parser.add_argument("--grad-checkpointing", action="store_true",
                        help="recompute every block's activations in backward (backbone and "
                             "head): less memory, ~1/3 more compute")
    parser.add_argument("--deterministic", action="store_true",
                        help="bit-identical weights at any thread count, not only at a given one "
                        "(LayerNorm ~10%% slower)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the initial weights, the data order, masks and label drops")
    # the launch
    parser.add_argument("--device",
                        help="default: cuda if it works, else cpu; an explicit cuda must work")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per process (0: cores / processes)")
    parser.add_argument("--save-every", type=int, default=500,
                        help="checkpoint interval in steps")
    parser.add_argument("--sample-every", type=int, default=0,
                        help="write samples.png every N steps (0: only at the end)")
    parser.add_argument("--stop-after", type=int,
                        help="stop (and save) after this many steps of this launch")
    # the sample grid
    parser.add_argument("--grid-per-class", type=int, default=10,
                        help="images per class row of the sample grid at the end of a run and "
                        "every --sample-every steps (0: no grid)")
    parser.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True,
                        help="digits: end a run with the sampling sweep that picks the grid's "
                        "and sample.py's settings (about 2 min on 2 cores)")
    parser.add_argument("--num-iter", type=int, default=64,
                        help="decoding steps of the sample grid (at most one per position)")
    parser.add_argument("--cfg", type=float, default=4.0,
                        help="classifier-free guidance scale of the sample grid")
    parser.add_argument("--temperature", type=float, default=0.7,
                        help="sampling temperature of the sample grid")
    return parser


if __name__ == "__main__":
    try:
        main(get_parser().parse_args(), given_flags(sys.argv[1:]))
    except ValueError as e:  # bad input: one line, not a traceback
        sys.exit(f"error: {e}")
