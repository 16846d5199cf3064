"""Speed and memory figures as one JSON line each: sampling (PyTorch vs ONNX Runtime), the
training step, and the GPU memory of training and sampling.

    python -m tools.benchmark sample         # bench-s: a decoding step, torch / ONNX Runtime
    python -m tools.benchmark train          # bench-s: one optimizer step, the paper's loss
    python -m tools.benchmark train --preset large --device cuda   # and days for L's recipe
    python -m tools.benchmark memory --preset large   # peak GPU memory per micro-batch, anywhere

Random weights and latents: no run folder, data or VAE needed. README.md#speed and
docs/speed.md quote these lines.
"""
import argparse
import copy
import functools
import json
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch

import tokenbridge as tb
from deploy import ORT_ERRORS, OnnxSampler, one_line
from export import export
from lib.cli import DefaultsHelpFormatter
from lib.gpu_costs import (GIB, sampling_counts, sampling_memory, training_memory, uses_kl16,
                           vae_bytes)
from lib.recipe import PRECISIONS, RECIPES, TrainingLoss, make_optimizer, train_step
from lib.runs import torch_device


def _best_seconds(fns, repeats, sync=lambda: None):
    """{name: function} -> {name: best seconds of `repeats`}, {name: its last result}, after a
    warm-up each (allocator, thread pools, ORT's first run). The rounds interleave the functions,
    so a burst of load on a shared machine hits them alike; it only ever adds time, so the minimum
    is the least disturbed figure. sync waits for queued GPU work: a timing ends with the work."""
    results = {name: fn() for name, fn in fns.items()}
    best = dict.fromkeys(fns, math.inf)
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            results[name] = fn()
            sync()
            best[name] = min(best[name], time.perf_counter() - start)
    return best, results


def _onnx_runtime(run, precision, args):
    """RUN exported at `precision` (checked against PyTorch) and opened: one ONNX runtime."""
    graphs = os.path.join(run, precision)
    export(run, graphs, precision=precision, verbose=False)
    return OnnxSampler(graphs, args.device, threads=args.threads, head_threads=args.head_threads)


def sampling(args):
    """One JSON line: the sampler's hot path. Per decoding step: milliseconds of torch eager,
    torch captured (capture_sampler) and each ONNX runtime, measured; the host's waits for the
    device and the kernels a GPU launches, counted (gpu_costs.sampling_counts, the same on any
    machine), the captured launches derived from them (a channel step replays as one graph), and
    the ONNX Runtime runs, counted. Also images/s, and the KV-cached vs recomputed head.

    Each ONNX runtime stands alone: one whose export fails its parity check, or that ONNX Runtime
    cannot load, is reported as NAME_error (one line) and its keys are absent; the others are
    still timed. PyTorch is the reference every figure is relative to, so it must run."""
    # a random model of the preset
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    device = torch_device(args.device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    config = tb.TokenBridgeConfig.preset(args.preset)
    model = tb.TokenBridge(config).eval()
    state = model.state_dict()
    model.to(device)
    head = model.head
    images, steps = 16, 16
    rows = images * config.seq_len // steps  # positions decoded per step, on average, in sampling
    cond = torch.randn(rows, config.head_width, device=device)

    # the head alone: every channel of `rows` positions, with the KV cache and without
    @torch.no_grad()
    def cached():  # the step path _sample_channels uses: one slot through the blocks per channel
        cache = head.empty_cache(rows, device)
        token = torch.zeros(rows, dtype=torch.long, device=device)
        for t in range(config.channels):
            logits, cache = head.step(cond, token, torch.tensor(t, device=device), cache)
            token = logits.argmax(-1)

    @torch.no_grad()
    def recompute():  # the official code: the whole prefix again for every channel
        tokens = torch.zeros(rows, 0, dtype=torch.long, device=device)
        for _ in range(config.channels):
            logits = head(cond, tokens)[:, -1]
            tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], 1)

    head_s, _ = _best_seconds({"cached": cached, "recompute": recompute}, 5, sync)

    # whole images: PyTorch, and each ONNX runtime that exports and loads
    labels = np.arange(images) % config.num_classes
    kwargs = dict(num_iter=steps, cfg=args.cfg, temperature=args.temperature, seed=args.seed,
                  cfg_mode=args.cfg_mode, position_order=args.position_order)
    precisions = {"onnx": "fp32"}
    if device == "cpu":  # ORT's int8 kernels are CPU ones
        precisions["onnx_int8"] = "int8"
    with tempfile.TemporaryDirectory() as run:
        checkpoint = {"config": config.to_dict(), "model": state}
        torch.save(checkpoint, os.path.join(run, "checkpoint.pt"))
        samplers, errors = {}, {}
        for name, precision in precisions.items():
            try:
                samplers[name] = _onnx_runtime(run, precision, args)
            except (ValueError, *ORT_ERRORS) as e:
                errors[f"{name}_error"] = one_line(e)
        captured = copy.deepcopy(model).capture_sampler()  # traced in the warm-up run
        runtimes = {"torch": lambda: model.sample_tokens(labels, **kwargs).cpu().numpy(),
                    "torch_captured": lambda: captured.sample_tokens(labels, **kwargs).cpu()
                    .numpy()}
        for name, sampler in samplers.items():
            runtimes[name] = functools.partial(sampler.sample_tokens, labels, **kwargs)
        onnx_runs = _count_runs(samplers.values())
        repeats = 3
        seconds, result = _best_seconds(runtimes, repeats, sync)

    # the figures, and how far the runtimes' tokens agree
    figures = {f"{k}_images_per_s": round(images / v, 2) for k, v in seconds.items()}
    figures.update({f"{k}_ms_per_step": round(v * 1e3 / steps, 2) for k, v in seconds.items()})
    figures.update({f"{k}_speedup": round(seconds["torch"] / v, 2)
                    for k, v in seconds.items() if k != "torch"})
    counted = sampling_counts(config, images, **{**kwargs, "num_iter": COUNTED_STEPS})
    figures.update({f"torch_{k}": v for k, v in counted.items()})
    # captured: each channel step is one graph launch instead of its kernels
    figures["torch_captured_launches_per_step"] = (
        counted["kernels_per_step"] - config.channels * (counted["head_step_kernels"] - 1))
    if samplers:  # every call of a runtime's sessions, over its timed runs
        figures["onnx_runs_per_step"] = onnx_runs() / (len(samplers) * (1 + repeats) * steps)
    agreement = {"captured_tokens_equal": bool((result["torch"] == result["torch_captured"])
                                               .all())}
    if "onnx" in result:
        agreement["onnx_provider"] = "cuda" if samplers["onnx"].on_cuda else "cpu"
        agreement["tokens_equal"] = bool((result["torch"] == result["onnx"]).all())
    if "onnx_int8" in result:
        differing = float((result["torch"] != result["onnx_int8"]).mean())
        agreement["int8_tokens_differing"] = round(differing, 3)
    print(json.dumps({
        "preset": args.preset,
        "images": images,
        "num_iter": steps,
        "cfg": args.cfg,
        "order": args.position_order,
        "head_rows": rows,
        "head_cached_ms_per_position": round(head_s["cached"] * 1e3 / rows, 4),
        "head_recompute_ms_per_position": round(head_s["recompute"] * 1e3 / rows, 4),
        "head_speedup": round(head_s["recompute"] / head_s["cached"], 2),
        **figures,
        **errors,
        "torch_device": device,
        **agreement,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }))


IMAGENET_TRAIN_IMAGES = 1_281_167


def training(args):
    """Training step time of a preset (default bench-s) on random latents (no data, no VAE), and
    what it means for one device: hours per ImageNet epoch, and days for the preset's recipe."""
    # a random model of the preset, and one batch of random latents
    preset, device = args.preset, torch.device(torch_device(args.device))
    config = tb.TokenBridgeConfig.preset(preset)
    torch.manual_seed(0)
    model = tb.TokenBridge(config).to(device)
    latent_shape = (config.channels, config.grid, config.grid)
    model.calibrate(torch.randn(1024, *latent_shape))
    opt = make_optimizer(model, 1e-4, 0.02)
    latents = torch.randn(args.batch, *latent_shape)
    labels = torch.randint(config.num_classes, (args.batch,))
    precision = "bf16" if device.type == "cuda" else "fp32"   # train.py's default on each
    result = {"benchmark": "train_step",
              "preset": preset,
              "batch": args.batch,
              "device": str(device),
              "precision": precision,
              "threads": torch.get_num_threads(),
              "params": model.num_params()}

    # the median step: the paper's loss, then the head on 16 positions per image
    for positions in (0, 16):
        times = []
        for _ in range(args.steps + 2):  # two warm-up steps (allocator, kernels)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            train_step(TrainingLoss(model, positions), opt, [(latents, labels)], 1e-4, 3.0, device,
                       precision)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        step = float(np.median(times[2:]))
        suffix = "" if positions == 0 else f"_head{positions}"
        result[f"step_ms{suffix}"] = round(step * 1000, 1)
        result[f"img_per_s{suffix}"] = round(args.batch / step, 1)
        peak = peak_memory(device)
        if positions == 0 and peak:  # the peak of the paper's loss: what sizes --micro-batch
            result["peak_memory_gib"] = round(peak / 2**30, 2)

    # what the paper's loss takes on one device
    epoch_h = IMAGENET_TRAIN_IMAGES * result["step_ms"] / 1000 / args.batch / 3600
    result["imagenet_epoch_hours_one_device"] = round(epoch_h, 2)
    result["recipe_days_one_device"] = round(epoch_h * RECIPES[preset].epochs / 24, 1)
    print(json.dumps(result), flush=True)
    return result


def memory(args):
    """The peak CUDA memory of a preset's training (per micro-batch, precision, checkpointing)
    and of FID sampling (batch 64, guidance, fp16), counted on this machine at the preset's real
    shapes with CUDA tensors that hold no memory (cuda_on_cpu): no GPU needed."""
    config, recipe = tb.TokenBridgeConfig.preset(args.preset), RECIPES[args.preset]
    micro_batches = sorted({*args.micro_batches, recipe.micro_batch})
    common = {"benchmark": "memory", "preset": args.preset}
    for precision in PRECISIONS:
        for checkpointing in (False, True):
            for micro_batch in micro_batches:
                peak = training_memory(config, micro_batch, precision, checkpointing,
                                       recipe.head_positions, resident_bytes=vae_bytes(config))
                line = {**common, "what": "train_step", "micro_batch": micro_batch,
                        "precision": precision, "grad_checkpointing": checkpointing,
                        "peak_gib": round(peak / GIB, 2)}
                if micro_batch == recipe.micro_batch:
                    line["default"] = True
                print(json.dumps(line), flush=True)
    decode = uses_kl16(config)  # kl16 decodes the batch; the demo's VAE is not built here
    peak = sampling_memory(config, batch=64, cfg=3.0, autocast="fp16", decode=decode)
    print(json.dumps({**common, "what": "fid_sampling", "batch": 64, "cfg": 3.0,
                      "autocast": "fp16", "vae_decode": decode, "peak_gib": round(peak / GIB, 2)}),
          flush=True)


COUNTED_STEPS = 4  # the waits and kernels are the same at every decoding step


def _count_runs(samplers):
    """Wrap the ONNX sessions' run methods; returns a function giving how many calls so far."""
    calls = [0]

    def counted(run):
        def run_and_count(*args, **kwargs):
            calls[0] += 1
            return run(*args, **kwargs)
        return run_and_count
    for sampler in samplers:
        for session in (sampler.backbone, sampler.head):
            session.run = counted(session.run)
            session.run_with_iobinding = counted(session.run_with_iobinding)
    return lambda: calls[0]


def peak_memory(device):
    """Bytes: the most CUDA memory allocated so far, or this process's peak RSS where /proc
    tells it (Linux), else None."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


def int_list(text):
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers like 8,16,32") from None
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every micro-batch must be >= 1")
    return values


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("what", choices=["sample", "train", "memory"], help="which figures")
    parser.add_argument("--preset", default="bench-s", choices=sorted(tb.PRESETS),
                        help="model configuration")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: CUDA when it works")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = all)")
    parser.add_argument("--head-threads", type=int, default=1,
                        help="ONNX Runtime threads for the head step on CPU")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the random model and of sampling")
    parser.add_argument("--cfg", type=float, default=1.0, help="sampling: guidance scale")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling: temperature")
    parser.add_argument("--cfg-mode", choices=["features", "logits"], default="features",
                        help="sampling: guide features or logits")
    parser.add_argument("--position-order", choices=["random", "confidence"], default="random",
                        help="sampling: which positions each step keeps")
    parser.add_argument("--batch", type=int, default=64, help="training: batch of one step")
    parser.add_argument("--steps", type=int, default=3,
                        help="training: timed steps (after 2 warm-up steps)")
    parser.add_argument("--micro-batches", type=int_list, default=[8, 16, 32, 64],
                        help="memory: the micro-batches to count, comma-separated (the preset's "
                             "default is always one)")
    return parser


if __name__ == "__main__":
    args = get_parser().parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        {"sample": sampling, "train": training, "memory": memory}[args.what](args)
    except ValueError as e:
        sys.exit(f"error: {e}")
