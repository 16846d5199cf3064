"""How a TokenBridge model is trained: each preset's recipe and one accumulated training step.

    args = resolve_recipe(args)            # the preset's recipe for every flag left out
    opt = make_optimizer(model, lr, args.weight_decay)
    loss_fn = TrainingLoss(model, args.head_positions)
    loss = train_step(loss_fn, opt, micro_batches, lr, args.grad_clip, device)

Recipes follow the official code (main_tokenbridge.py, util/lr_sched.py, util/misc.py): lr = blr
x global batch / 256, linear warm-up from 0 then cosine to 0 at every step's fractional epoch,
AdamW (0.9, 0.95) with weight decay on every parameter but 1-D ones and biases, EMA. A step is
bit-identical from run to run on the CPU: see clip_grad_norm and docs/training.md#determinism.
"""
import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

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
# (python -m tools.benchmark memory); accumulation makes up the global batch.
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
