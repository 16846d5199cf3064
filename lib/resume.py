"""Checkpoints and exact resume: what a checkpoint holds, every rank's random state, and which flags
a resumed run may change (no flag the user gives is ever silently ignored)."""
import argparse
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from lib import runs
from lib.distributed import log
from lib.recipe import lr_at


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
