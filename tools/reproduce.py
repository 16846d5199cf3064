"""Reproduce the paper's tables and figures at small scale on the built-in digits, from run folders.

    python -m tools.reproduce --train-missing   # trains the missing run folders, then every part
    python -m tools.reproduce                   # every table and figure from the runs there are
    python -m tools.reproduce --parts reconstruction,demo

Every run is `python train.py` (the demo: AR head, frequency order, 64 levels, seed 0) or the
demo with one flag changed and the demo's frozen VAE (`--vae runs/demo/vae`), so only the
model differs; RUNS lists them. Writes into --out (docs/):

  reconstruction   PSNR and rFD (lib/digit_metrics.py's Fréchet distance) of the 500 held-out digits
                   through continuous latents and 128 ... 8 levels; rd_quantization.png,
                   reconstruction_levels.png
  generation       the paper's ablations (AR vs parallel head, frequency vs default order, 64 vs
                   16 levels, random vs confidence order) by sample quality and NLL, two seeds
                   each; ablation_samples.png
  budget           the AR and the parallel head at 1x, 2x and 4x the demo's training, and the
                   AR head at 8x (one seed each past 1x)
  channels         the AR and the parallel head channel by channel: validation NLL of each
                   channel slot, and sample quality with a lower temperature on some slots
  demo             FD and class accuracy against cfg at three temperatures (the demo's sweep):
                   guidance.png; the demo's samples and reconstructions: demo_*.png

Each run is scored at the sampling settings its own sweep chose (RUN/sampling.json, written by
train.py) and unguided (cfg 1, temperature 1, one position per step), each with 1,000 fresh
class-balanced samples: the same sampling seeds for every run, other seeds than the sweeps'
(a sweep's best score is the minimum of 20 noisy ones). The numbers go to results.json, the
tables to results.md (README.md#results-at-a-glance copies them).
"""
import argparse
import contextlib
import itertools
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import tokenbridge as tb
from deploy import tile
from lib import data, digit_metrics, runs
from lib.cli import SAMPLING_FILE, DefaultsHelpFormatter
from lib.validation import grid_classes, validation_bits

# run folder name -> train.py flags; every run but the demo also gets --vae <runs>/demo/vae
RUNS = {
    "demo": [],
    "ar-s1": ["--seed", "1"],
    "parallel": ["--head", "parallel"],
    "parallel-s1": ["--head", "parallel", "--seed", "1"],
    "default-order": ["--order", "default"],
    "default-order-s1": ["--order", "default", "--seed", "1"],
    "levels16": ["--levels", "16"],
    "levels16-s1": ["--levels", "16", "--seed", "1"],
    "ar-52ep": ["--epochs", "52"],
    "parallel-52ep": ["--head", "parallel", "--epochs", "52"],
    "ar-104ep": ["--epochs", "104"],
    "parallel-104ep": ["--head", "parallel", "--epochs", "104"],
    "ar-208ep": ["--epochs", "208"],
}


@dataclass(frozen=True)
class Row:
    label: str
    runs: tuple                 # folder names in RUNS, one per training seed
    sampling: tuple = ()        # extra generate() keywords, as (name, value) pairs
    paper: str = ""             # what the paper reports for this row (ImageNet 256, gFID)
    paper_sign: int = 0         # +1: the paper finds this ablation worse than the first row


GENERATION = (
    Row("dimension-wise AR head, frequency order, 64 levels (the demo)", ("demo", "ar-s1"),
        paper="1.89 (frequency order)"),
    Row("parallel head", ("parallel", "parallel-s1"), paper="15.7 vs AR 1.94", paper_sign=+1),
    Row("default channel order 0...15", ("default-order", "default-order-s1"),
        paper="1.94 vs frequency 1.89", paper_sign=+1),
    Row("16 levels", ("levels16", "levels16-s1"), paper="2.03 vs 64 levels 1.94", paper_sign=+1),
    Row("confidence-guided position order (sampling only)", ("demo", "ar-s1"),
        sampling=(("position_order", "confidence"),), paper="no number: cleaner backgrounds"),
)
BUDGET = (
    Row("AR head, 26 epochs (the demo)", ("demo", "ar-s1")),
    Row("parallel head, 26 epochs", ("parallel", "parallel-s1")),
    Row("AR head, 52 epochs", ("ar-52ep",)),
    Row("parallel head, 52 epochs", ("parallel-52ep",)),
    Row("AR head, 104 epochs", ("ar-104ep",)),
    Row("parallel head, 104 epochs", ("parallel-104ep",)),
    Row("AR head, 208 epochs", ("ar-208ep",)),
)
CHANNEL_ROWS = GENERATION[:2]     # per-channel NLL and temperature schedules: AR vs parallel head
SCHEDULES = {"1.0 on every channel": (1.0,) * 16,
             "0.5 on the first 2 channels": (0.5,) * 2 + (1.0,) * 14,
             "0.5 on the first 4": (0.5,) * 4 + (1.0,) * 12,
             "0.5 on the first 8": (0.5,) * 8 + (1.0,) * 8,
             "0.5 on the last 8": (1.0,) * 8 + (0.5,) * 8,
             "0.5 on every channel": (0.5,) * 16}
LEVELS = ("continuous", 128, 64, 32, 16, 8)
UNGUIDED = {"cfg": 1.0, "temperature": 1.0, "num_iter": 16}
EVAL_SEED = 1000          # sampling seed of every evaluation (the sweeps use the training seed)
SCORES = ("fd", "class_accuracy", "precision", "recall")
SETTINGS = ("cfg", "temperature", "num_iter")      # what a sweep chooses (RUN/sampling.json)


# ---------------------------------------------------------------------------------------------
# Run folders
# ---------------------------------------------------------------------------------------------

def train_command(root, name):
    vae = [] if name == "demo" else ["--vae", str(Path(root) / "demo" / runs.VAE_DIR)]
    return [sys.executable, "train.py", "--out", str(Path(root) / name), *vae, *RUNS[name]]


def is_finished(run):
    return all((Path(run) / f).is_file() for f in (runs.CHECKPOINT, SAMPLING_FILE, "metrics.json"))


def train_missing(root, names):
    """Train the named runs that are not finished, the demo first (the others reuse its VAE)."""
    for name in sorted(set(names), key=list(RUNS).index):
        if not is_finished(Path(root) / name):
            command = train_command(root, name)
            print("[train]", " ".join(command[1:]), flush=True)
            subprocess.run(command, check=True)


def held_out(run, val_size=500):
    """(uint8 images (B, H, W, 3), posterior modes, labels) of train.py's validation split, from
    the run's latent cache (RUN/latents.npy, memory-mapped: only these rows are read).

    The split depends only on the number of images (fixed seed), so every run on the digits
    holds out the same 500 images; the cache saves re-encoding them.
    """
    images, labels, _ = data.load_digits()
    _, val_idx = data.split_validation(len(images), val_size)
    cache = data.open_cache(run)
    if cache is None:
        raise ValueError(f"{run} has no complete latent cache (latents.npy + latents.meta.pt); "
                         "run train.py there first")
    modes = cache.read(val_idx, 0, moment=0)
    return data.channels_last(images[val_idx]), modes, cache.labels[val_idx]


def load(run):
    """(EMA model in eval mode, its VAE, the sampling settings its sweep chose)."""
    model, _ = runs.load_run(run)
    best = json.loads((Path(run) / SAMPLING_FILE).read_text())
    return model, runs.load_vae(Path(run) / runs.VAE_DIR), {k: best[k] for k in SETTINGS}


# ---------------------------------------------------------------------------------------------
# Reconstruction: one frozen VAE, one calibration, only the number of bins changes
# ---------------------------------------------------------------------------------------------

def bin_counts(tokens, levels):
    """How often each channel takes each bin: (C, levels); tokens (..., C) long."""
    flat = tokens.reshape(-1, tokens.shape[-1])                            # (M, C)
    return torch.stack([torch.bincount(channel, minlength=levels) for channel in flat.T])


def token_entropy(tokens, levels):
    """Per-channel entropy (bits) of the token histogram; tokens (..., C) long."""
    counts = bin_counts(tokens, levels)                                    # (C, levels)
    p = counts.double() / counts.sum(1, keepdim=True)
    return -(p * torch.log2(p.clamp_min(1e-300))).sum(1)   # 0 * log 0 = 0


def reconstruction_rows(model, vae, images, modes, labels, net):
    """PSNR, MSE, rFD (the reconstructions against the originals), class accuracy, and the
    per-channel token entropy, for continuous latents and each level count."""
    rows = []
    for levels in LEVELS:
        decoded = data.decode_levels(vae, model.quantizer, modes, levels)
        psnr, mse = data.psnr(images, decoded)
        scores = digit_metrics.evaluate(decoded, labels.numpy(), reference=images, net=net)
        row = {"levels": levels, "psnr": psnr, "mse": mse, **{k: scores[k] for k in SCORES}}
        if levels != "continuous":
            tokens = model.quantizer.with_levels(levels).quantize(tb.patchify(modes))  # (B, N, C)
            h = token_entropy(tokens, levels)                                          # (C,)
            row.update(bits_per_channel=math.log2(levels), entropy_mean=h.mean().item(),
                       entropy_min=h.min().item(), entropy_max=h.max().item())
        rows.append(row)
    return rows


def gaussianity(model, modes):
    """How close the calibrated latents are to the N(0, 1) the bins assume: per-channel skewness,
    the share beyond +-std_range (clipped into the end bins), and the most frequent bin's share
    in units of the Gaussian 1/levels."""
    q = model.quantizer
    tokens = tb.patchify(modes)                                            # (B, N, C)
    u = ((tokens - q.mean) / q.std).reshape(-1, q.channels)                # (B*N, C)
    counts = bin_counts(q.quantize(tokens), q.levels)                      # (C, levels)
    top_share = counts.max(1).values.double() / counts.sum(1)              # (C,)
    return {"skewness": [round(x, 3) for x in (u ** 3).mean(0).tolist()],
            "clipped_share": (u.abs() > q.std_range).double().mean().item(),
            "std_range": q.std_range,
            "top_bin_share_x_levels": [round(x, 2) for x in (top_share * q.levels).tolist()]}


def part_reconstruction(args, out, results, net):
    run = Path(args.runs) / "demo"
    model, vae, _ = load(run)
    images, modes, labels = held_out(run)

    # the table's rows, the quantizer's diagnostics and the rate-distortion plot
    rows = reconstruction_rows(model, vae, images, modes, labels, net)
    low_frequency = tb.low_frequency_share(modes).tolist()
    results["reconstruction"] = {"run": str(run), "images": len(images), "rows": rows,
                                 "gaussianity": gaussianity(model, modes),
                                 "low_frequency_share": [round(x, 3) for x in low_frequency],
                                 "frequency_order": model.quantizer.order.tolist()}
    reconstruction_plot(rows, out / "rd_quantization.png")

    # the first digit of each class: the original, then decoded from each level count
    pick = torch.stack([torch.nonzero(labels == k)[0, 0] for k in range(10)])
    decoded = [data.decode_levels(vae, model.quantizer, modes[pick], lv) for lv in LEVELS]
    panel = tile(np.concatenate([images[pick], *decoded]), cols=10)
    title = "original/continuous/" + "/".join(map(str, LEVELS[1:]))
    titled_row([panel], [title], out / "reconstruction_levels.png")


# ---------------------------------------------------------------------------------------------
# Generation: each run scored by its samples, rows as the mean of their runs
# ---------------------------------------------------------------------------------------------

def score_run(args, run, sampling, net, cache):
    """NLL and sample scores (tuned: the run's own sweep choice; unguided) of one run with extra
    sampling keywords; cached per (run, sampling) so a run shared by two rows is sampled once."""
    key = (run, sampling)
    if key in cache:
        return cache[key]
    model, vae, tuned = load(Path(args.runs) / run)
    _, modes, labels = held_out(Path(args.runs) / run)

    def score(settings):
        return digit_metrics.sample_scores(model, vae, n=args.samples, seed=EVAL_SEED, net=net,
                                     **settings, **dict(sampling))

    scores = {"run": run, "nll": validation_bits(model, modes, labels), "tuned": score(tuned),
              "unguided": score(UNGUIDED)}
    print(f"[score] {run} {dict(sampling) or ''}: NLL {scores['nll']:.3f}, "
          f"tuned FD {scores['tuned']['fd']:.1f} / {scores['tuned']['class_accuracy']:.1%}, "
          f"unguided FD {scores['unguided']['fd']:.1f}", flush=True)
    cache[key] = scores
    return scores


def mean_spread(values):
    """Mean and half the range (two seeds: mean +- spread covers both)."""
    return float(np.mean(values)), (max(values) - min(values)) / 2


def row_scores(args, row, net, cache):
    per_run = [score_run(args, run, row.sampling, net, cache) for run in row.runs]
    summary = {"label": row.label, "runs": list(row.runs), "sampling": dict(row.sampling),
               "paper": row.paper, "per_run": per_run,
               "nll": mean_spread([r["nll"] for r in per_run])}
    for kind in ("tuned", "unguided"):
        summary[kind] = {k: mean_spread([r[kind][k] for r in per_run]) for k in SCORES}
    summary["settings"] = [{k: r["tuned"][k] for k in SETTINGS} for r in per_run]
    return summary


def sign_verdict(baseline, row, paper_sign):
    """Does the ablation row differ from the baseline in the paper's direction? Separated when
    the ranges of the two rows' runs (tuned FD) do not overlap."""
    base = [r["tuned"]["fd"] for r in baseline["per_run"]]
    ours = [r["tuned"]["fd"] for r in row["per_run"]]
    if min(ours) > max(base):
        return "agrees" if paper_sign > 0 else "ours worse"
    if max(ours) < min(base):
        return "reversed" if paper_sign > 0 else "ours better"
    return "not separated (ranges overlap)"


def unfinished(args, rows, part):
    """The unfinished runs of these rows, each reported with the command that makes it."""
    names = {run for row in rows for run in row.runs}
    missing = sorted(run for run in names if not is_finished(Path(args.runs) / run))
    for run in missing:
        command = " ".join(train_command(args.runs, run)[1:])
        print(f"[{part}] skipping the rows of {run}: not finished; make it with: {command}")
    return set(missing)


def part_table(args, results, net, cache, name, rows):
    missing = unfinished(args, rows, name)
    kept = [row for row in rows if not set(row.runs) & missing]
    summaries = [row_scores(args, row, net, cache) for row in kept]

    # each ablation against the first row, when that row is there
    if name == "generation" and kept and kept[0] is rows[0]:
        for row, summary in zip(kept[1:], summaries[1:], strict=True):
            summary["sign"] = sign_verdict(summaries[0], summary, row.paper_sign)
    results[name] = summaries


@contextlib.contextmanager
def channel_temperatures(schedule):
    """Sample channel slot t (generation order) at temperature schedule[t], whatever temperature
    generate() is given. An experiment, not a sampling option (both runtimes take one
    temperature), so it wraps tokenbridge's sampler while it runs: the head calls it once per
    slot, in order."""
    sample = tb.sample_from_logits
    slot = itertools.count()

    def scheduled(logits, uniforms, _):
        return sample(logits, uniforms, schedule[next(slot) % len(schedule)])

    tb.sample_from_logits = scheduled
    try:
        yield
    finally:
        tb.sample_from_logits = sample


def part_channels(args, results, net):
    """Where the heads differ, channel by channel: the validation NLL of each channel slot, and
    unguided sample quality when only some slots are sampled at a lower temperature."""
    summary, missing = [], unfinished(args, CHANNEL_ROWS, "channels")
    for row in CHANNEL_ROWS:
        if set(row.runs) & missing:
            continue
        per_run = [channel_scores(args, run, net) for run in row.runs]
        slots = zip(*(r["bits"] for r in per_run), strict=True)     # each slot's NLL in every run
        schedules = {}
        for name in SCHEDULES:
            scores = [r["schedules"][name] for r in per_run]
            schedules[name] = {k: mean_spread([s[k] for s in scores]) for k in SCORES}
        summary.append({"label": row.label, "runs": list(row.runs), "per_run": per_run,
                        "bits": [mean_spread(slot) for slot in slots], "schedules": schedules})
    results["channels"] = summary


def channel_scores(args, run, net):
    """One run's unguided sample scores under each of SCHEDULES, and its validation NLL per
    channel slot."""
    model, vae, _ = load(Path(args.runs) / run)
    _, modes, labels = held_out(Path(args.runs) / run)
    scores = {}
    for name, schedule in SCHEDULES.items():
        with channel_temperatures(schedule):
            scores[name] = digit_metrics.sample_scores(model, vae, n=args.samples, seed=EVAL_SEED,
                                                 net=net, **UNGUIDED)
    bits = validation_bits(model, modes, labels, per_channel=True).tolist()
    fds = ", ".join(f"{name} FD {s['fd']:.1f}" for name, s in scores.items())
    print(f"[channels] {run}: {fds}", flush=True)
    return {"run": run, "bits": bits, "schedules": scores}


def ablation_samples(args, out, rows, per_class=5):
    """One panel per generation row (its seed-0 run at its tuned settings), classes by row."""
    panels, titles = [], []
    for row in rows:
        run = Path(args.runs) / row.runs[0]
        if not is_finished(run):
            continue
        model, vae, tuned = load(run)
        labels = grid_classes(10).repeat_interleave(per_class)
        latents = model.generate(labels, seed=0, **tuned, **dict(row.sampling))
        panels.append(tile(data.decode(vae, latents), cols=per_class))
        titles.append(row.runs[0] + (", confidence order" if row.sampling else ""))
    if panels:
        titled_row(panels, titles, out / "ablation_samples.png")


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------

def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def reconstruction_plot(rows, path):
    """PSNR, rFD and token entropy against bits per channel; continuous as a dashed line."""
    plt = pyplot()
    quant, continuous = [r for r in rows if r["levels"] != "continuous"], rows[0]
    bits = [r["bits_per_channel"] for r in quant]
    fig, ax = plt.subplots(1, 3, figsize=(10, 2.8), dpi=90)
    for axis, key, label in ((ax[0], "psnr", "PSNR (dB)"), (ax[1], "fd", "rFD (lower is better)")):
        axis.plot(bits, [r[key] for r in quant], "o-", label="tokens")
        axis.axhline(continuous[key], ls="--", c="gray", label="continuous")
        axis.set(xlabel="bits per channel = log2(levels)", ylabel=label)
        axis.legend(fontsize=8)
    ax[2].plot(bits, bits, "--", c="gray", label="log2(levels)")
    entropy = [r["entropy_mean"] for r in quant]
    below = [r["entropy_mean"] - r["entropy_min"] for r in quant]
    above = [r["entropy_max"] - r["entropy_mean"] for r in quant]
    ax[2].errorbar(bits, entropy, fmt="o-", capsize=3, yerr=[below, above],
                   label="token entropy (min-max over channels)")
    ax[2].set(xlabel="bits per channel = log2(levels)", ylabel="bits")
    ax[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def guidance_curves(sweep):
    """The sweep's grid as curves of FD and class accuracy against cfg: {temperature: rows by cfg}
    from its coarse round (the whole grid, one sample count, the most decoding steps), and the
    row of the chosen pair on them."""
    rows = sweep["sweep"]
    steps = max(r["num_iter"] for r in rows)
    count = min(r["n"] for r in rows)
    grid = [r for r in rows if r["num_iter"] == steps and r["n"] == count]
    curves = {t: sorted((r for r in grid if r["temperature"] == t), key=lambda r: r["cfg"])
              for t in sorted({r["temperature"] for r in grid})}
    chosen = next(r for r in grid
                  if (r["cfg"], r["temperature"]) == (sweep["cfg"], sweep["temperature"]))
    return curves, chosen


def guidance_plot(sweep, path):
    """FD and class accuracy against cfg, one curve per temperature, the chosen pair marked
    (RUN/sampling.json, written by train.py)."""
    plt = pyplot()
    curves, chosen = guidance_curves(sweep)
    fig, ax = plt.subplots(1, 2, figsize=(7.5, 2.8), dpi=90)
    for axis, key in zip(ax, ("fd", "class_accuracy"), strict=True):
        for temperature, curve in curves.items():
            axis.plot([r["cfg"] for r in curve], [r[key] for r in curve], "o-",
                      label=f"temperature {temperature}")
        axis.plot([chosen["cfg"]], [chosen[key]], "k*", ms=12,
                  label=f"chosen (sampled with {sweep['num_iter']} steps)")
    ax[0].set(xlabel="cfg", ylabel="Fréchet distance (lower is better)",
              title=f"{chosen['num_iter']} decoding steps, {chosen['n']} samples each")
    ax[1].axhline(0.95, ls="--", c="gray")
    ax[1].set(xlabel="cfg", ylabel="class accuracy", title="does a 3 look like a 3")
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def part_demo(args, out, results):
    """The demo's sweep as guidance curves, and its grids as docs pictures (one grey channel)."""
    run = Path(args.runs) / "demo"
    path = run / SAMPLING_FILE
    if not path.is_file():
        raise ValueError(f"{path} is missing: train.py writes it at the end of a digits run")
    sweep = json.loads(path.read_text())
    guidance_plot(sweep, out / "guidance.png")
    results["guidance"] = sweep
    for name in ("samples", "reconstruction"):
        Image.open(run / f"{name}.png").convert("L").save(out / f"demo_{name}.png", optimize=True)


def titled_row(panels, titles, path, gap=6, title_h=14):
    """Panels (H, W, 3) left to right on white, a title over each (Pillow's default font), saved
    as one grey channel (the digits are grey) to keep docs/ small."""
    H = max(p.shape[0] for p in panels)
    W = sum(p.shape[1] for p in panels) + gap * (len(panels) - 1)
    canvas = Image.new("RGB", (W, H + title_h), "white")
    draw, x = ImageDraw.Draw(canvas), 0
    for panel, title in zip(panels, titles, strict=True):
        canvas.paste(Image.fromarray(panel), (x, title_h))
        draw.text((x + 1, 1), title, fill="black")
        x += panel.shape[1] + gap
    canvas.convert("L").save(path, optimize=True)


# ---------------------------------------------------------------------------------------------
# Markdown tables (results.md; README.md#results-at-a-glance copies them)
# ---------------------------------------------------------------------------------------------

def pm(value_spread, fmt="{:.1f}", percent=False):
    value, spread = value_spread
    scale = 100 if percent else 1
    text = fmt.format(value * scale) + ("%" if percent else "")
    return text if spread == 0 else f"{text} ± {fmt.format(spread * scale)}"


def settings_text(settings):
    return "; ".join(f"cfg {s['cfg']:g}, T {s['temperature']:g}, {s['num_iter']} steps"
                     for s in settings)


def table_row(cells):
    return "| " + " | ".join(cells) + " |"


def reconstruction_table(rec):
    lines = ["| levels | bits/channel | PSNR (dB) | rFD | class accuracy "
             "| token entropy (bits), mean [min, max] |",
             "|---|---|---|---|---|---|"]
    for r in rec["rows"]:
        entropy = (f"{r['entropy_mean']:.3f} [{r['entropy_min']:.3f}, {r['entropy_max']:.3f}]"
                   if "entropy_mean" in r else "–")
        bits = f"{r['bits_per_channel']:g}" if "bits_per_channel" in r else "–"
        lines.append(f"| {r['levels']} | {bits} | {r['psnr']:.2f} | {r['fd']:.1f} "
                     f"| {r['class_accuracy']:.1%} | {entropy} |")
    return "\n".join(lines)


def generation_table(summaries, paper=True):
    head = ("| configuration | runs | gFD | class accuracy | precision | recall | unguided gFD "
            "| NLL (bits/token) | sampling (the sweep's choice) |")
    lines = [head + (" paper (gFID) | sign |" if paper else ""), "|" + "---|" * (9 + 2 * paper)]
    for s in summaries:
        tuned, unguided = s["tuned"], s["unguided"]
        cells = [s["label"], ", ".join(s["runs"]),
                 pm(tuned["fd"]), pm(tuned["class_accuracy"], percent=True),
                 pm(tuned["precision"], "{:.2f}"), pm(tuned["recall"], "{:.2f}"),
                 pm(unguided["fd"]), pm(s["nll"], "{:.3f}"), settings_text(s["settings"])]
        if paper:
            cells += [s["paper"], s.get("sign", "–")]
        lines.append(table_row(cells))
    return "\n".join(lines)


def demo_table(results):
    """The demo's samples next to the floors: real digits and the VAE's own reconstructions."""
    rec = {r["levels"]: r for r in results["reconstruction"]["rows"]}
    demo = next(r for r in results["generation"][0]["per_run"] if r["run"] == "demo")
    chosen = settings_text([demo["tuned"]])
    rows = [("real held-out digits, 250 vs 250 (the floor at that size)", results["floor"]),
            ("the VAE's reconstructions of the 500 held-out digits, continuous",
             rec["continuous"]),
            ("the same through 64-level tokens (rFD)", rec[64]),
            (f"**the demo's samples**, 1,000 at its chosen settings ({chosen})", demo["tuned"]),
            ("unguided: cfg 1, T 1, 16 steps", demo["unguided"])]
    lines = ["| | Fréchet distance | class accuracy | precision | recall |",
             "|---|---|---|---|---|"]
    lines += [table_row([label, f"{r['fd']:.1f}", f"{r['class_accuracy']:.1%}",
                         f"{r['precision']:.2f}", f"{r['recall']:.2f}"]) for label, r in rows]
    ratio = demo["tuned"]["fd"] / rec[64]["fd"]
    return "\n".join(lines) + f"\n\ngFD / rFD at 64 levels = {ratio:.2f}"


def channel_tables(summaries):
    # each slot's validation NLL (the mean over the runs), one row per head
    slots = len(summaries[0]["bits"])
    lines = [table_row(["head", *(str(t + 1) for t in range(slots)), "mean"]),
             "|---" * (slots + 2) + "|"]
    for s in summaries:
        bits = [b[0] for b in s["bits"]]
        lines.append(table_row([s["label"], *(f"{b:.2f}" for b in bits), f"{np.mean(bits):.3f}"]))

    # FD / class accuracy of each temperature schedule, one column per head
    heads = [s["label"] for s in summaries]
    lines += ["", table_row(["unguided (cfg 1, 16 steps), temperature", *heads]),
              "|---" * (len(summaries) + 1) + "|"]
    for name in SCHEDULES:
        scores = [s["schedules"][name] for s in summaries]
        cells = [f"{pm(x['fd'])} / {pm(x['class_accuracy'], percent=True)}" for x in scores]
        lines.append(table_row([name, *cells]))
    return "\n".join(lines)


def write_tables(results, path):
    floor = results["floor"]
    parts = ["## Real digits (the floor)",
             f"Held-out digits, {floor['n']} vs the other {floor['n_reference']}: "
             f"FD {floor['fd']:.1f} ± {floor['fd_std']:.1f} (over {floor['repeats']} splits), "
             f"class accuracy {floor['class_accuracy']:.1%}, precision {floor['precision']:.2f}, "
             f"recall {floor['recall']:.2f}."]
    if "reconstruction" in results and "generation" in results:
        parts += ["## The demo", demo_table(results)]
    if "reconstruction" in results:
        parts += ["## Reconstruction", reconstruction_table(results["reconstruction"])]
    if "generation" in results:
        parts += ["## Generation", generation_table(results["generation"])]
    if "budget" in results:
        parts += ["## Training budget", generation_table(results["budget"], paper=False)]
    if results.get("channels"):
        parts += ["## Channel by channel", channel_tables(results["channels"])]
    path.write_text("\n\n".join(parts) + "\n")


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

PARTS = ("reconstruction", "generation", "budget", "channels", "demo")


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--runs", default="runs",
                        help="folder of the run folders (names as in RUNS)")
    parser.add_argument("--out", default="docs",
                        help="folder for the figures, results.json and results.md")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help="comma-separated subset of " + ", ".join(PARTS))
    parser.add_argument("--samples", type=int, default=1000,
                        help="samples per run and setting")
    parser.add_argument("--train-missing", action="store_true",
                        help="first train the run folders the parts need that are missing "
                             "(sequentially)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: torch's default)")
    return parser


def main(args):
    # the parts and the sample count
    parts = args.parts.split(",")
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown --parts {', '.join(sorted(unknown))}; "
                         f"choose from {', '.join(PARTS)}")
    if args.samples < digit_metrics.MIN_IMAGES:
        raise ValueError(f"--samples must be at least {digit_metrics.MIN_IMAGES}, "
                         f"got {args.samples}")

    # the run folders: the missing ones trained when asked; the demo's checked before anything
    # is loaded, as every part needs it
    tables = {"generation": GENERATION, "budget": BUDGET, "channels": CHANNEL_ROWS}
    if args.train_missing:
        needed = [run for name in parts for row in tables.get(name, ()) for run in row.runs]
        train_missing(args.runs, ["demo", *needed])
    demo = Path(args.runs) / "demo"
    if not is_finished(demo):
        raise ValueError(f"{demo} is not a finished run: make it with "
                         f"`python train.py --out {demo}`, or every run with "
                         "`python -m tools.reproduce --train-missing`")

    # the results so far (the parts this call does not redo stay), and the real digits' floor
    if args.threads:
        torch.set_num_threads(args.threads)
    out, started = Path(args.out), time.time()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    net = digit_metrics.load_feature_net()[0]
    results["floor"] = digit_metrics.real_floor(250, net=net)

    # the parts asked for
    cache = {}      # (run, sampling) -> scores: a run in two rows or tables is sampled once
    if "reconstruction" in parts:
        part_reconstruction(args, out, results, net)
    for name in ("generation", "budget"):
        if name in parts:
            part_table(args, results, net, cache, name, tables[name])
    if "generation" in parts:
        ablation_samples(args, out, GENERATION)
    if "channels" in parts:
        part_channels(args, results, net)
    if "demo" in parts:
        part_demo(args, out, results)

    # results.json and results.md
    results["wall_s"] = round(time.time() - started, 1)
    runs.write_json(results, path)
    write_tables(results, out / "results.md")
    print(f"wrote {path}, {out / 'results.md'} and figures in {out} ({results['wall_s']} s)")
    return results


if __name__ == "__main__":
    arguments = get_parser().parse_args()
    try:
        main(arguments)
    except (ValueError, subprocess.CalledProcessError) as e:
        # a missing run folder, a failed training: one line, not a traceback
        raise SystemExit(f"error: {e}") from None
