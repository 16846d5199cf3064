"""How a TokenBridge model is trained and evaluated: the pieces train.py's train() puts together.

    args = resolve_recipe(args)            # the preset's recipe for every flag left out
    args, ckpt, horizon = resume_flags(args, given)   # --resume RUN: the run's own flags
    opt = make_optimizer(model, lr, args.weight_decay)
    loss_fn = TrainingLoss(model, args.head_positions)
    loss = train_step(loss_fn, opt, micro_batches, lr, args.grad_clip, device)
    bits = validation_bits(ema, latents, labels, batch=args.micro_batch, precision=args.precision)

Recipes follow the official code (main_tokenbridge.py, util/lr_sched.py, util/misc.py): lr = blr
x global batch / 256, linear warm-up from 0 then cosine to 0 at every step's fractional epoch,
AdamW (0.9, 0.95) with weight decay on every parameter but 1-D ones and biases, EMA. A step is
bit-identical from run to run on the CPU: see clip_grad_norm and README "Deterministic".
"""
import argparse
import math
import os
import random
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import quality
import runs
from data import MASK_STREAM, decode, seeded_generator
from deploy import SAMPLING_FILE, save_grid

METRICS_FILE = "metrics.json"  # a run's end: "complete" once its last checkpoint is written

# ---------------------------------------------------------------------------------------------
# Recipes
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Recipe:
    """How a preset is trained. lr = blr * global_batch / 256 (the official rule); lengths in
    epochs of the training images, the schedule evaluated at every step's fractional epoch."""
    global_batch: int
    blr: float
    epochs: float
    warmup_epochs: float
    lr_schedule: str = "cosine"      # linear warm-up, then cosine to 0 | "constant" after warm-up
    micro_batch: int = 64            # images per forward pass and process; the rest is accumulation
    ema: float = 0.9999
    ema_ramp: bool = False           # official: the EMA rate is constant from the first step
    weight_decay: float = 0.02
    grad_clip: float = 3.0
    head_positions: int = 0          # 0: every masked position through the head (the paper's loss)


# TokenBridge-L as the official code trains it (32 GPUs x 64); H trains for 800 epochs. The
# micro-batch is the largest power of 2 whose bf16 step peaks within 80% of an 80 GB GPU
# (python benchmark.py memory); accumulation makes up the global batch.
OFFICIAL_RECIPE = Recipe(global_batch=2048, blr=5e-5, epochs=400, warmup_epochs=100)
# The CPU demo: ~1,800 steps of 64 digits in ~7 minutes; a short run needs a higher rate, an EMA
# that ramps (0.999 constant would still hold 16% of the initial weights at the end) and the
# head on 8 positions per image (an unbiased estimate of the loss, 4x cheaper on a CPU).
DEMO_RECIPE = Recipe(global_batch=64, blr=4e-3, epochs=26, warmup_epochs=1.5, ema=0.999,
                     ema_ramp=True, head_positions=8)
RECIPES = {"tiny": DEMO_RECIPE, "digits": DEMO_RECIPE, "bench-s": DEMO_RECIPE,
           "base": replace(OFFICIAL_RECIPE, micro_batch=32),
           "large": replace(OFFICIAL_RECIPE, micro_batch=16),
           "huge": replace(OFFICIAL_RECIPE, epochs=800, micro_batch=16)}
# Flags that default to the preset's recipe; --batch is its global_batch.
SAME_NAMED = ("blr", "epochs", "warmup_epochs", "lr_schedule", "micro_batch", "ema", "ema_ramp",
              "weight_decay", "grad_clip", "head_positions")
RECIPE_FLAGS = {"batch": "global_batch", **{name: name for name in SAME_NAMED}}


def resolve_recipe(args):
    """Fill the recipe flags the command line left out from the preset's recipe."""
    recipe = asdict(RECIPES[args.preset])
    for flag, field in RECIPE_FLAGS.items():
        if getattr(args, flag) is None:
            setattr(args, flag, recipe[field])
    return args


def recipe_summary(args, cfg):
    """The recipe in force, one line: the first thing the log says."""
    ema = f"EMA {args.ema} " + ("ramped" if args.ema_ramp else "constant from the first step")
    head = ("every masked position" if args.head_positions == 0 else
            f"{args.head_positions} masked positions per image")
    schedule = "cosine to 0" if args.lr_schedule == "cosine" else "then constant"
    lr = args.blr * args.batch / 256
    return (f"[recipe] preset {args.preset}: global batch {args.batch}, "
            f"lr {lr:g} = blr {args.blr:g} x {args.batch} / 256, {args.epochs:g} epochs, "
            f"warm-up {args.warmup_epochs:g} epochs, {schedule}; AdamW betas (0.9, 0.95), "
            f"weight decay {args.weight_decay}, grad clip {args.grad_clip}; {ema}; "
            f"dropout {cfg.dropout}, label drop {cfg.label_drop_prob}; head on {head}; "
            f"precision {args.precision}")


# ---------------------------------------------------------------------------------------------
# The optimizer, the schedule, the EMA and one step
# ---------------------------------------------------------------------------------------------

def make_optimizer(model, lr, weight_decay, betas=(0.9, 0.95)):
    """AdamW with the official rule (MAR's add_weight_decay): no decay for 1-D parameters (norms,
    biases) and biases; every other parameter decays, embeddings and the mask token included.
    The head's per-channel classifier biases are stacked into one (C, levels) `out_bias`."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.dim() == 1 or name.endswith("bias") else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas)


def lr_at(step, lr, warmup_steps, total_steps, schedule="cosine"):
    """The official schedule in steps (its fractional epochs times the steps per epoch): linear
    warm-up from 0, then cosine to 0 at the last step, or constant."""
    if step < warmup_steps:
        return lr * step / warmup_steps
    if schedule == "constant":
        return lr
    t = (step - warmup_steps) / max(1e-9, total_steps - warmup_steps)
    return lr * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


@torch.no_grad()
def update_ema(ema, model, step, decay, ramp=False):
    """EMA of the weights. ramp: the rate grows as (1 + step) / (10 + step) up to `decay`, so a
    short run's average is not dominated by the initial weights (the official rate is constant)."""
    d = min(decay, (1 + step) / (10 + step)) if ramp else decay
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p, 1 - d)
    for e, b in zip(ema.buffers(), model.buffers(), strict=True):
        e.copy_(b)


class TrainingLoss(torch.nn.Module):
    """model(latents, labels, head_positions) as a module of its own, so DDP wraps the call that
    carries --head-positions (TokenBridge.token_logits says what it does)."""

    def __init__(self, model, positions=0):
        super().__init__()
        self.model = model
        self.positions = positions

    def forward(self, latents, labels):
        return self.model(latents, labels, head_positions=self.positions)


# PyTorch's first choice on Hopper, cuDNN attention, builds a new graph for every new sequence
# length, and MAR's encoder drops a random number of tokens every step: training uses the others.
TRAINING_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def sum_in_fixed_order(x, width=1024):
    """x.sum() rounded the same way at any thread count. torch splits the sum of one large tensor
    between its threads; the sum of each row of `width` is one thread's, so summing rows, then
    rows of row sums, fixes the order."""
    x = x.flatten()
    while x.numel() > width:
        x = F.pad(x, (0, -x.numel() % width)).view(-1, width).sum(1)
    return x.sum()


class ThreadInvariantLayerNorm(torch.nn.LayerNorm):
    """nn.LayerNorm with its affine part as a separate multiply-add: the fused CPU backward sums
    the weight and bias gradients in one buffer per thread, so they change with the thread
    count, while autograd's sums over rows do not. Slower, so only for train.py --deterministic."""

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, eps=self.eps) * self.weight + self.bias


def make_thread_invariant(model):
    """Every affine LayerNorm of `model` computes as ThreadInvariantLayerNorm (same parameters)."""
    for m in model.modules():
        if type(m) is torch.nn.LayerNorm and m.elementwise_affine:
            m.__class__ = ThreadInvariantLayerNorm
    return model


@torch.no_grad()
def clip_grad_norm(parameters, max_norm):
    """torch.nn.utils.clip_grad_norm_ with a total norm that does not depend on the thread count."""
    grads = [p.grad for p in parameters if p.grad is not None]
    squares = torch.stack([sum_in_fixed_order(g.float().square()) for g in grads])  # one per tensor
    norm = sum_in_fixed_order(squares).sqrt()
    torch._foreach_mul_(grads, (max_norm / (norm + 1e-6)).clamp(max=1.0))
    return norm


# --precision: the autocast dtype of the forward passes (fp32: none). fp16 also scales the loss
# (GPUs without bf16: V100, T4; the official code trains so); fp32 is the debugging baseline.
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def loss_scaler(precision, device):
    """fp16's gradient scaler: the loss times a large scale, so small gradients survive in fp16;
    a step whose gradients overflow is skipped and the scale halves, as the official code does."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def autocast_context(precision, device):
    """The forward passes' autocast in `precision` (PRECISIONS) on `device`; fp32: none."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    return torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()


def train_step(loss_fn, opt, micro_batches, lr, clip, device, precision="fp32", scaler=None):
    """One optimizer step of loss_fn (a TrainingLoss, maybe DDP-wrapped) over this process's
    micro-batches [(latents, labels), ...], gradients accumulated (averaged, as DDP averages
    over processes), the forward passes in `precision` (PRECISIONS; fp16 with `scaler`).
    Returns the mean loss over every process's micro-batches; a non-finite one skips the update
    (the caller stops)."""
    for g in opt.param_groups:
        g["lr"] = lr
    autocast = autocast_context(precision, device)
    scaler = scaler or loss_scaler(precision, device)
    opt.zero_grad(set_to_none=True)

    # a forward and backward pass per micro-batch, the gradients accumulated
    total = 0.0
    for i, (latents, labels) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        no_sync = loss_fn.no_sync() if hasattr(loss_fn, "no_sync") and not last else nullcontext()
        with no_sync:  # DDP averages the gradients once, after the last micro-batch
            latents = latents.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            with autocast, sdpa_kernel(TRAINING_ATTENTION):
                loss = loss_fn(latents, labels)
            scaler.scale(loss / len(micro_batches)).backward()
        total = total + loss.detach().float()

    # the mean loss over every rank's micro-batches: a non-finite one stops the step before the
    # update, on every rank alike (a NaN on one makes the mean NaN on all)
    value = total / len(micro_batches)
    if dist.is_initialized():
        dist.all_reduce(value)
        value = value / dist.get_world_size()
    value = value.item()
    if not math.isfinite(value):
        return value

    # the update: clipped gradients, and fp16's scale adjusted
    scaler.unscale_(opt)  # the clip sees true gradients
    clip_grad_norm(loss_fn.parameters(), clip)
    scaler.step(opt)      # skipped when fp16 gradients overflowed
    scaler.update()
    return value


# ---------------------------------------------------------------------------------------------
# Evaluation: NLL and a sample grid
# ---------------------------------------------------------------------------------------------

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
    save_grid(np.concatenate(rows), path, cols=per_class)                      # a row per class


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
        rows, best = quality.sweep_sampling(ema, vae, seed=args.seed)
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


# ---------------------------------------------------------------------------------------------
# RNG state, for exact resume
# ---------------------------------------------------------------------------------------------

def rng_state():
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": random.getstate()}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# ---------------------------------------------------------------------------------------------
# Checkpoints and resuming: no flag the user gave is ever silently ignored
# ---------------------------------------------------------------------------------------------

# Flags that may differ on --resume: where and how this launch runs, and what the sample grid
# shows; none of them changes the weights. Every other flag is the run's own, from its checkpoint.
# --latents moves the cache, whose key says what it holds; --encode-batch only sizes VAE calls.
# Those not given again keep the run's value, except the launch's own (LAUNCH_KEYS).
LAUNCH_KEYS = {"resume", "out", "device", "stop_after", "threads", "workers"}
RUNTIME_KEYS = LAUNCH_KEYS | {"save_every", "sample_every", "num_iter", "cfg", "temperature",
                              "grid_per_class", "sweep", "latents", "encode_batch"}


def resume_flags(args, given):
    """(flags, checkpoint, horizon) for train.py --resume RUN: the run's own flags, from its
    checkpoint, with the runtime flags this launch gives (RUNTIME_KEYS); resume_args says what
    else a resume may change. given: the flags the command line named."""
    ckpt, horizon = resume_args(args, given)
    flags = dict(ckpt["args"])
    for key in RUNTIME_KEYS:
        # a runtime flag not given again keeps the run's value (its grid, its cache), except
        # where and how this launch runs
        if key in given or key in LAUNCH_KEYS or key not in flags:
            flags[key] = getattr(args, key)
    flags["out"] = args.resume
    return argparse.Namespace(**flags), ckpt, horizon


def resume_args(args, given):
    """(checkpoint, horizon) for --resume RUN. A flag given on the command line is a runtime flag,
    --steps (a new end: the schedule's horizon moves, and the checkpoint records it), or the
    run's own value; anything else is refused."""
    ckpt = runs.read_torch_file(Path(args.resume) / runs.CHECKPOINT, "checkpoint to resume",
                                "give --resume a run folder that train.py wrote")
    saved, new = ckpt.get("args", {}), vars(args)
    if "blr" not in saved:
        raise ValueError(f"--resume {args.resume}: its checkpoint predates training recipes "
                         "(no blr); start a new run")
    changed = sorted(k for k in given - RUNTIME_KEYS - {"steps"}
                     if k in saved and new[k] != saved[k])
    if changed:
        flags = ", ".join(f"--{k.replace('_', '-')} {new[k]} (the run has {saved[k]})"
                          for k in changed)
        raise ValueError(f"--resume continues {args.resume} with its own settings, but the "
                         f"command line changes {flags}; drop those flags, or start a new run "
                         "with --out")

    horizon = None
    if "steps" in given and new["steps"] != saved["steps"]:
        if new["steps"] <= ckpt["step"]:
            raise ValueError(f"--steps {new['steps']}: {args.resume} is already at step "
                             f"{ckpt['step']}; give a larger --steps")
        horizon = {"at_step": ckpt["step"], "steps": [saved["steps"], new["steps"]]}
        ckpt["args"] = {**saved, "steps": new["steps"]}
    ckpt["horizons"] = ckpt.get("horizons", []) + ([horizon] if horizon else [])
    return ckpt, horizon


def restore_state(ckpt, horizon, args, ema, opt, scaler, lr_of, dist_info):
    """EMA, optimizer, loss scaler and RNG states from the checkpoint; returns the step to
    continue from."""
    ema.load_state_dict(ckpt["ema"])
    opt.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    start_step, states = ckpt["step"], ckpt["rng"]
    world, rank = dist_info["world"], dist_info["rank"]
    if len(states) == world:
        set_rng_state(states[rank])
    else:  # a different world size cannot continue the same random streams
        log(f"warning: resuming with {world} processes, saved with {len(states)}; the run "
            "continues but not bit-identically", dist_info)
        torch.manual_seed(args.seed + 1000 * start_step + rank)
    log(f"[resume] from step {start_step} of {args.steps}", dist_info)

    if horizon:
        old, new = horizon["steps"]
        lr, warmup_steps = lr_of.keywords["lr"], lr_of.keywords["warmup_steps"]
        before = lr_at(start_step, lr, warmup_steps, old, args.lr_schedule)
        log(f"[resume] --steps moves the end from {old} to {new}: the learning-rate schedule "
            f"now ends at step {new} (lr at step {start_step}: {before:.3g} -> "
            f"{lr_of(start_step):.3g})", dist_info)
    if start_step >= args.steps:
        log(f"[resume] {args.out} has finished its {args.steps} steps; give --steps N to train "
            "it further", dist_info)
    threads = torch.get_num_threads()
    if ckpt.get("threads", threads) != threads and not args.deterministic:
        log(f"warning: resuming with {threads} threads, saved with {ckpt['threads']}; the run "
            "continues but not bit-identically (train with --deterministic for that)", dist_info)
    return start_step


def save_checkpoint(run_dir, model, ema, optimizer, step, args, horizons, classes, vae_source,
                    dist_info):
    """Gathers every rank's RNG state (exact resume under DDP too); only rank 0 writes.
    optimizer: (the optimizer, its loss scaler)."""
    opt, scaler = optimizer
    states = [rng_state()]
    if dist_info["world"] > 1:
        states = [None] * dist_info["world"]
        dist.all_gather_object(states, rng_state())
    if dist_info["rank"] == 0:
        ckpt = {"config": model.config.to_dict(),
                "model": model.state_dict(),
                "ema": ema.state_dict(),
                "optimizer": opt.state_dict(),
                "scaler": scaler.state_dict(),
                "step": step,
                "rng": states,
                "threads": torch.get_num_threads(),
                "args": vars(args),
                "horizons": horizons,
                "classes": classes,
                "vae": vae_source}
        runs.atomic_save(ckpt, run_dir / runs.CHECKPOINT)


# ---------------------------------------------------------------------------------------------
# Processes, devices, threads
# ---------------------------------------------------------------------------------------------

def setup_distributed(device_arg):
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; a plain launch is a world of one."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(device_arg or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device_arg}: CUDA does not work here "
                         "(torch.cuda.is_available() is False); use --device cpu, or leave "
                         "--device out to use CUDA only when it works")
    if device.type == "cuda":
        device = torch.device("cuda", local if world > 1 else (device.index or 0))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        from datetime import timedelta  # rank 0 may train the VAE while the others wait
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(hours=6))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return {"world": world, "rank": rank, "local_world": local_world}, device


def barrier(dist_info):
    if dist_info["world"] > 1:
        dist.barrier()


def log(message, dist_info=None):
    if dist_info is None or dist_info["rank"] == 0:  # one log, not one per process
        print(message, flush=True)


def set_threads(requested, local_world):
    """All cores by default, shared between the processes of this machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(requested or max(1, cores // local_world))
