"""Reproduce the paper's main claims at small scale on the built-in digits.

Given finished run folders (train.py), writes figures and one JSON of numbers into docs/:

  (a) post-training quantization: PSNR/MSE of decoded held-out digits, continuous vs 8..128
      levels, a rate-distortion plot, and the per-channel token entropy vs log2(levels);
  (b) dimension-wise AR head vs parallel head: validation NLL (bits/token) and sample grids;
  (c) frequency vs default channel order: validation NLL in bits/image and grids;
      16 vs 64 levels: reconstructions and sample grids (their NLLs do not compare);
  (d) sampling controls for one model and one seed: cfg x temperature, random vs confidence order.

    python train.py --out runs/digits
    python train.py --vae runs/digits/vae --head parallel --out runs/parallel
    python train.py --vae runs/digits/vae --order default --out runs/default-order
    python train.py --vae runs/digits/vae --levels 16 --out runs/levels16
    python train.py --vae runs/digits/vae --seed 1 --out runs/seed1     # NLL noise between runs
    python reproduce.py --ar runs/digits --parallel runs/parallel \\
        --default-order runs/default-order --levels16 runs/levels16 --out docs

A missing run folder skips the comparison that needs it. Everything runs on CPU in minutes.
"""
import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import data
import runs
import tokenbridge as tb
from deploy import SAMPLING_FILE, tile
from training import grid_classes, validation_bits

SWEEP_LEVELS = (8, 16, 32, 64, 128)
CONTROLS_CFG, CONTROLS_TEMPERATURE = (1.0, 2.0, 4.0), (0.7, 1.0)


# ---------------------------------------------------------------------------------------------
# Data: the held-out digits and their cached latents, exactly as train.py split them
# ---------------------------------------------------------------------------------------------

def held_out(run, val_size=500):
    """(uint8 images (B, H, W, 3), posterior modes, labels) of train.py's validation split, from the run's
    latent cache (RUN/latents.npy, memory-mapped: only these rows are read).

    The split depends only on the number of images (fixed seed), so every run on the digits
    holds out the same 500 images; the cache saves re-encoding them.
    """
    images, labels, _ = data.load_digits()
    _, val_idx = data.split_validation(len(images), val_size)
    cache = data.open_cache(run)
    if cache is None:
        raise ValueError(f"{run} has no complete latent cache (latents.npy + latents.meta.pt); run train.py there first")
    return data.channels_last(images[val_idx]), cache.read(val_idx, 0, moment=0), cache.labels[val_idx]


# ---------------------------------------------------------------------------------------------
# (a) Post-training quantization sweep
# ---------------------------------------------------------------------------------------------

def token_entropy(tokens, levels):
    """Per-channel entropy (bits) of the token histogram; tokens (..., C) long."""
    flat = tokens.reshape(-1, tokens.shape[-1])
    counts = torch.stack([torch.bincount(flat[:, c], minlength=levels) for c in range(flat.shape[1])])
    p = counts.double() / counts.sum(1, keepdim=True)
    return -(p * torch.log2(p.clamp_min(1e-300))).sum(1)   # 0 * log 0 = 0


def quantization_sweep(model, vae, images, modes, levels_list=SWEEP_LEVELS):
    """PSNR/MSE for continuous and each level count, and the token entropy per channel.

    The same calibrated per-channel mean/std at every bin count (GaussianQuantizer.with_levels),
    so this is exactly post-training quantization of one frozen VAE.
    """
    psnr, mse = data.psnr(images, data.decode(vae, modes))
    rows = [{"levels": "continuous", "psnr": psnr, "mse": mse}]
    for levels in levels_list:
        q = model.quantizer.with_levels(levels)
        psnr, mse = data.psnr(images, data.decode(vae, q.round_trip(modes)))
        h = token_entropy(q.quantize(tb.patchify(modes)), levels)
        rows.append({"levels": levels, "bits_per_channel": math.log2(levels), "psnr": psnr, "mse": mse,
                     "entropy_mean": h.mean().item(), "entropy_min": h.min().item(),
                     "entropy_max": h.max().item(), "entropy_per_channel": [round(x, 4) for x in h.tolist()]})
    return rows


def clipped_share(model, modes):
    """Share of latent values beyond +-std_range sigma: they all land in the two end bins."""
    u = (tb.patchify(modes) - model.quantizer.mean) / model.quantizer.std
    return (u.abs() > model.quantizer.std_range).double().mean().item()


def gaussianity(model, modes):
    """Why the token entropy falls short of log2(levels): per-channel skewness, and the most
    frequent 64-level bin's share in units of the Gaussian 1/64 (the black-background spike)."""
    tokens = tb.patchify(modes)
    u = ((tokens - model.quantizer.mean) / model.quantizer.std).reshape(-1, tokens.shape[-1])
    q = model.quantizer
    counts = torch.stack([torch.bincount(c, minlength=q.levels) for c in q.quantize(tokens).reshape(-1, q.channels).T])
    top = counts.max(1).values.double() / counts.sum(1) * q.levels
    ends = (counts[:, 0] + counts[:, -1]).sum().item() / counts.sum().item()   # Gaussian: 2 / levels
    return {"skewness": [round(x, 3) for x in (u ** 3).mean(0).tolist()], "end_bins_share": ends,
            "top_bin_share_x_levels": [round(x, 2) for x in top.tolist()], "levels": q.levels}


def rate_distortion_plot(rows, path):
    """PSNR vs bits per channel, with the continuous PSNR as a dashed line (matplotlib, Agg:
    it comes with mlxtend, which the demo already needs)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    quant = [r for r in rows if r["levels"] != "continuous"]
    fig, ax = plt.subplots(1, 2, figsize=(7.5, 2.8), dpi=90)
    ax[0].plot([r["bits_per_channel"] for r in quant], [r["psnr"] for r in quant], "o-", label="quantized")
    ax[0].axhline(rows[0]["psnr"], ls="--", c="gray", label="continuous")
    ax[0].set(xlabel="bits per channel = log2(levels)", ylabel="PSNR (dB)", title="reconstruction")
    ax[0].legend(fontsize=8)
    bits = [r["bits_per_channel"] for r in quant]
    ax[1].plot(bits, bits, "--", c="gray", label="log2(levels)")
    ax[1].errorbar(bits, [r["entropy_mean"] for r in quant],
                   yerr=[[r["entropy_mean"] - r["entropy_min"] for r in quant],
                         [r["entropy_max"] - r["entropy_mean"] for r in quant]], fmt="o-", capsize=3,
                   label="token entropy (mean, min-max over channels)")
    ax[1].set(xlabel="bits per channel = log2(levels)", ylabel="bits", title="token histogram entropy")
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Pictures: sample panels with titles, side by side (Pillow only)
# ---------------------------------------------------------------------------------------------

def sample_panel(model, vae, per_class=5, seed=0, **sampling):
    """Rows of classes 0..9, per_class samples each, as one (H, W, 3) uint8 array."""
    classes = grid_classes(model.config.num_classes)
    latents = model.generate(classes.repeat_interleave(per_class), seed=seed, **sampling)
    return tile(data.decode(vae, latents), cols=per_class)


def save_small(image, path):
    """Digits are grey (the VAE's three output channels differ by a level or two): one channel
    and PNG optimisation keep docs/ small."""
    image.convert("L").save(path, optimize=True)


def titled_row(panels, titles, path, gap=6, title_h=14):
    """Panels (H, W, 3) left to right on white, a title over each (Pillow's default font)."""
    H = max(p.shape[0] for p in panels)
    W = sum(p.shape[1] for p in panels) + gap * (len(panels) - 1)
    canvas = Image.new("RGB", (W, H + title_h), "white")
    draw, x = ImageDraw.Draw(canvas), 0
    for panel, title in zip(panels, titles):
        canvas.paste(Image.fromarray(panel), (x, title_h))
        draw.text((x + 1, 1), title, fill="black")
        x += panel.shape[1] + gap
    save_small(canvas, path)


def stack_rows(paths, path, gap=6):
    """Stack row images (already titled) vertically into one PNG, then delete the parts."""
    parts = [Image.open(p).convert("RGB") for p in paths]
    canvas = Image.new("RGB", (max(p.width for p in parts), sum(p.height for p in parts) + gap * (len(parts) - 1)), "white")
    y = 0
    for p in parts:
        canvas.paste(p, (0, y))
        y += p.height + gap
    save_small(canvas, path)
    for p in paths:
        Path(p).unlink()


# ---------------------------------------------------------------------------------------------
# (b), (c) Ablations: validation NLL and grids
# ---------------------------------------------------------------------------------------------

def load(run):
    """(EMA model in eval mode, its VAE, the checkpoint dict) of a run folder."""
    model, ckpt = runs.load_run(run)
    return model, runs.load_vae(Path(run) / runs.VAE_DIR), ckpt


def nll(model, run):
    """validation_bits on the run's own held-out latents; also bits per image (N * C tokens)."""
    _, modes, labels = held_out(run)
    bits = validation_bits(model, modes, labels)
    return {"bits_per_token": bits, "bits_per_image": bits * model.config.seq_len * model.config.channels,
            "levels": model.config.levels, "head": model.config.head, "order": model.config.order,
            "uniform_bits_per_token": math.log2(model.config.levels)}


def reconstruction_panel(run, models, n=10):
    """Rows: original, continuous, and one row per (name, model) quantizer; n held-out digits."""
    images, modes, _ = held_out(run)
    vae = runs.load_vae(Path(run) / runs.VAE_DIR)
    pick = torch.linspace(0, len(images) - 1, n).long()                    # spread over classes
    rows = [images[pick], data.decode(vae, modes[pick])]
    rows += [data.decode(vae, m.quantizer.with_levels(m.config.levels).round_trip(modes[pick])) for m in models]
    return tile(np.concatenate(rows), cols=n)


# ---------------------------------------------------------------------------------------------
# (e) Guidance: sample quality against cfg and temperature, from the run's own sweep
# ---------------------------------------------------------------------------------------------

def guidance_plot(sweep, path):
    """FD and class accuracy against cfg, one curve per temperature (the sweep's rows at its most
    decoding steps), the chosen setting marked (RUN/sampling.json, written by train.py)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows, best = sweep["sweep"], sweep
    steps = max(r["num_iter"] for r in rows)
    fig, ax = plt.subplots(1, 2, figsize=(7.5, 2.8), dpi=90)
    for temperature in sorted({r["temperature"] for r in rows}):
        curve = sorted((r for r in rows if r["temperature"] == temperature and r["num_iter"] == steps),
                       key=lambda r: r["cfg"])
        for axis, key in zip(ax, ("fd", "class_accuracy")):
            axis.plot([r["cfg"] for r in curve], [r[key] for r in curve], "o-", label=f"temperature {temperature}")
    for axis, key in zip(ax, ("fd", "class_accuracy")):
        axis.plot([best["cfg"]], [best[key]], "k*", ms=12, label=f"chosen ({best['num_iter']} steps)")
    ax[0].set(xlabel="cfg", ylabel="Fréchet distance (lower is better)", title=f"{steps} decoding steps")
    ax[1].axhline(0.95, ls="--", c="gray")
    ax[1].set(xlabel="cfg", ylabel="class accuracy", title="does a 3 look like a 3")
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def part_guidance(args, out, results):
    path = Path(args.ar) / SAMPLING_FILE
    if not path.is_file():
        raise ValueError(f"{path} is missing: train.py writes it at the end of a digits run")
    sweep = json.loads(path.read_text())
    guidance_plot(sweep, out / "guidance.png")
    results["guidance"] = sweep


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def part_quantization(args, out, results):
    model, vae, _ = load(args.ar)
    images, modes, _ = held_out(args.ar)
    rows = quantization_sweep(model, vae, images, modes)
    results["quantization"] = {"run": str(args.ar), "images": len(images), "rows": rows,
                               "clipped_share": clipped_share(model, modes),
                               "gaussianity": gaussianity(model, modes),
                               # what the frequency order ranks (held-out latents; calibration uses the training ones)
                               "low_frequency_share": [round(x, 3) for x in tb.low_frequency_share(modes).tolist()],
                               "frequency_order": model.quantizer.order.tolist(),
                               "latent_std_range": model.quantizer.std_range}
    rate_distortion_plot(rows, out / "rd_quantization.png")
    for r in rows:
        print(f"[quant] {r['levels']!s:>10}: PSNR {r['psnr']:.2f} dB, MSE {r['mse']:.5f}"
              + (f", entropy {r['entropy_mean']:.3f}/{r['bits_per_channel']:.0f} bits" if "entropy_mean" in r else ""))


def part_ablations(args, out, results, sampling):
    """NLL of every run present, and side-by-side grids for each comparison."""
    runs = {"ar_frequency_64": args.ar, "parallel": args.parallel,
            "default_order": args.default_order, "levels16": args.levels16, "ar_seed1": args.seed_run}
    runs = {k: Path(v) for k, v in runs.items() if v and (Path(v) / "checkpoint.pt").is_file()}
    models, panels = {}, {}
    for name, run in runs.items():
        model, vae, ckpt = load(run)
        models[name] = model
        results.setdefault("nll", {})[name] = {"run": str(run), "step": ckpt["step"], **nll(model, run)}
        if name != "ar_seed1":  # the seed run only measures run-to-run NLL noise: no grid
            panels[name] = sample_panel(model, vae, per_class=args.per_class, seed=args.seed, **sampling)
        print(f"[nll] {name}: {results['nll'][name]['bits_per_token']:.4f} bits/token, "
              f"{results['nll'][name]['bits_per_image']:.1f} bits/image (step {ckpt['step']})")
    label = {"ar_frequency_64": "AR head, freq. order, 64", "parallel": "parallel head",
             "default_order": "default order", "levels16": "16 levels"}
    for pair, path in ((("ar_frequency_64", "parallel"), "ablation_head.png"),
                       (("ar_frequency_64", "default_order"), "ablation_order.png"),
                       (("ar_frequency_64", "levels16"), "ablation_levels_samples.png")):
        if all(p in panels for p in pair):
            titled_row([panels[p] for p in pair], [label[p] for p in pair], out / path)
    if "levels16" in models:
        recon = reconstruction_panel(args.ar, [models["ar_frequency_64"], models["levels16"]])
        titled_row([recon], ["rows: original / continuous / 64 levels / 16 levels"],
                   out / "ablation_levels_reconstruction.png")
    return models


def part_controls(args, out, results, model, vae):
    """cfg x temperature for one model and one seed, then random vs confidence order."""
    rows = []
    for t in CONTROLS_TEMPERATURE:
        panels = [sample_panel(model, vae, per_class=args.controls_per_class, seed=args.seed, num_iter=args.num_iter,
                               cfg=c, temperature=t) for c in CONTROLS_CFG]
        rows.append(out / f"_controls_t{t}.png")
        titled_row(panels, [f"cfg {c:g}, temp {t:g}" for c in CONTROLS_CFG], rows[-1])
    stack_rows(rows, out / "controls_cfg_temperature.png")
    base = dict(num_iter=args.num_iter, cfg=args.order_cfg, temperature=args.order_temperature)
    panels = [sample_panel(model, vae, per_class=args.controls_per_class, seed=args.seed, position_order=o, **base)
              for o in ("random", "confidence")]
    titled_row(panels, [f"{o} order" for o in ("random", "confidence")], out / "controls_order.png")
    results["controls"] = {"run": str(args.ar), "seed": args.seed, "num_iter": args.num_iter,
                           "cfg": list(CONTROLS_CFG), "temperature": list(CONTROLS_TEMPERATURE),
                           "order_cfg": args.order_cfg, "order_temperature": args.order_temperature}


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ar", default="runs/digits", help="the default run: AR head, frequency order, 64 levels")
    p.add_argument("--parallel", default="runs/parallel", help="same, --head parallel")
    p.add_argument("--default-order", default="runs/default-order", help="same, --order default")
    p.add_argument("--levels16", default="runs/levels16", help="same, --levels 16")
    p.add_argument("--seed-run", default="runs/seed1",
                   help="the default run again with --seed 1: run-to-run noise of the NLL")
    p.add_argument("--out", default="docs", help="folder for the PNGs and the JSON")
    p.add_argument("--json", default="results.json", help="file name of the numbers, inside --out")
    p.add_argument("--parts", default="quant,ablations,controls,guidance", help="comma-separated subset to run")
    p.add_argument("--seed", type=int, default=0, help="sampling seed of the grids")
    p.add_argument("--per-class", type=int, default=5, help="samples per class in each grid")
    p.add_argument("--controls-per-class", type=int, default=4, help="samples per class in the controls grids")
    p.add_argument("--num-iter", type=int, default=16, help="decoding steps (as train.py's grid)")
    p.add_argument("--cfg", type=float, default=4.0, help="cfg of the ablation grids (as train.py's grid)")
    p.add_argument("--temperature", type=float, default=0.7, help="temperature of the ablation grids")
    p.add_argument("--order-cfg", type=float, default=2.0, help="cfg of the random vs confidence panels")
    p.add_argument("--order-temperature", type=float, default=1.0, help="temperature of those panels")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return p


def main(args):
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, started = {"seed": args.seed}, time.time()
    parts = set(args.parts.split(","))
    sampling = dict(num_iter=args.num_iter, cfg=args.cfg, temperature=args.temperature)
    results["sampling"] = sampling
    if "quant" in parts:
        part_quantization(args, out, results)
    if "ablations" in parts:
        part_ablations(args, out, results, sampling)
    if "controls" in parts:
        model, vae, _ = load(args.ar)
        part_controls(args, out, results, model, vae)
    if "guidance" in parts:
        part_guidance(args, out, results)
    results["wall_s"] = round(time.time() - started, 1)
    path = out / args.json
    if path.is_file():  # keep the parts this call did not redo
        old = json.loads(path.read_text())
        results = {**old, **results}
    runs.write_json(results, path)
    print(f"wrote {path} and figures in {out} ({results['wall_s']} s)")
    return results


if __name__ == "__main__":
    arguments = get_parser().parse_args()
    try:
        main(arguments)
    except ValueError as e:  # a missing run folder or cache: one line, not a traceback
        raise SystemExit(f"error: {e}")
