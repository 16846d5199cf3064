"""Export a trained TokenBridge run to ONNX, for the torch-free sampler in deploy.py.

    python export.py --run-dir runs/demo             # -> runs/demo/onnx/
    python export.py --run-dir runs/demo --fp16      # half-precision graphs, for GPU
    python export.py --run-dir runs/demo --int8      # int8 matmuls in backbone and head, for CPU

Writes three graphs and one JSON:
  backbone.onnx      known values, mask, labels of both guidance halves, each image's candidate
                     positions and the guidance weight -> the head's condition at the candidates,
                     per half and mixed = TokenBridge.condition_rows (backbone + head.project +
                     the row gather and feature guidance): the loop needs no array of its output
  head_step.onnx     one channel of the AR head with its KV cache (a slot per channel, slot t
                     written), the logit-level CFG mix and the inverse-CDF sampler inside
                     (head.step + sample_from_logits): every step has the same shapes, and a
                     whole channel loop can stay on the device
  vae_decoder.onnx   scaled latents (B, C, H, W) -> image (B, 3, H', W') in [-1, 1]
  tokenbridge.json   config, quantizer tables, channel order, graph I/O names, fingerprint
A graph with over 1 GiB of weights (TokenBridge-H's backbone) keeps them beside it in one
NAME.onnx.data file (ONNX external data); ONNX Runtime finds it there.

Every graph passes onnx.checker and is compared with PyTorch on random inputs before export
reports success. Exporter: the TorchScript tracer (`dynamo=False`). With torch 2.13 the dynamo
exporter also works, but it turns the batch into a symbolic dimension with guards: the head graph
has two batch-like dimensions (G guidance halves x M positions) whose product is the KV-cache row
count, which dynamo refuses without hand-written derived dims, and it has no benefit for graphs
whose shapes never depend on data. The tracer with `dynamic_axes` gives the same ops, exports in
seconds, and the graphs are validated against PyTorch either way.
"""
import argparse
import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
import warnings

import numpy as np
import onnx
import torch
import torch.nn as nn

import tokenbridge as tb
from deploy import (BACKBONE_FILE, BACKBONE_INPUTS, BACKBONE_OUTPUTS, DATA_SUFFIX, EXPORT_FORMAT,
                    HEAD_FILE, HEAD_INPUTS, HEAD_OUTPUTS, META_FILE, VAE_FILE, VAE_INPUTS,
                    VAE_OUTPUTS, file_sha256, make_session)
from lib import runs
from lib.cli import DefaultsHelpFormatter

OPSET = 17


# --- export wrappers: thin shells around tokenbridge.py, in the order the loop calls them -----

class BackboneGraph(nn.Module):
    """Twin of TokenBridge.condition_rows: values (G*B, N, C), mask (G*B, N) bool, labels (G*B,),
    candidates (B, k), guidance 0-d -> rows (G, B*k, D) and the feature-guided mix (1, B*k, D).
    The rows the head needs come out of the backbone's run: on a GPU they stay there."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, values, mask, labels, candidates, guidance):
        return self.model.condition_rows(values, mask, labels, candidates, guidance)


class HeadStepGraph(nn.Module):
    """One channel step of TokenBridge._sample_channels, sampling included.

    cond (G, M, D): G = 1, or 2 for logit-level CFG (cond rows, then uncond rows).
    tokens (M, C): the tokens sampled so far, in generation order; column t is written.
    cache (depth, 2, G*M, heads, C, head_dim): head.step's cache, slots 0..step-1 filled.
    uniforms (M, C), score (M,): as in _sample_channels; temperature, guidance: 0-d float.
    """

    def __init__(self, model):
        super().__init__()
        self.head = model.head

    def forward(self, cond, step, cache, tokens, uniforms, temperature, guidance, score):
        G, M, D = cond.shape
        slots = torch.arange(tokens.shape[1], device=tokens.device)
        # twin of `token` carried between steps in _sample_channels (repeated for both halves)
        prev = torch.where(slots == step - 1, tokens, 0).sum(1).repeat(G)                # (G*M,)
        logits, cache = self.head.step(cond.reshape(G * M, D), prev, step, cache)        # (G*M, K)
        # logit-level CFG: uncond + w (cond - uncond); with G = 1 both halves are the same rows
        # and this is logits + w * 0, exactly the unguided logits.
        halves = logits.view(G, M, -1)
        logits = halves[-1] + guidance * (halves[0] - halves[-1])                         # (M, K)
        u = torch.where(slots == step, uniforms, 0).sum(1)                # (M,): uniforms[:, t]
        token, token_logp = tb.sample_from_logits(logits, u, temperature)
        tokens = torch.where(slots == step, token.unsqueeze(1), tokens)                   # (M, C)
        return logits, tokens, score + token_logp, cache


class VAEDecoderGraph(nn.Module):
    """Scaled latents (B, C, H, W) -> image (B, 3, H*s, W*s) in [-1, 1]."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents / self.vae.config.scaling_factor).sample


# --- random example inputs, used for tracing and for the parity check ------------------------

def backbone_inputs(config, images, halves, gen):
    """images x halves rows (2 halves: guidance), k candidates per image among its masked."""
    batch, N = images * halves, config.seq_len
    values = torch.randn(batch, N, config.channels, generator=gen)
    # as in sampling: as many positions masked in every image, the halves of an image alike
    masked = int(torch.randint(1, N, (), generator=gen))
    mask = (torch.rand(images, N, generator=gen).argsort(-1) < masked).repeat(halves, 1)
    # the null class included
    labels = torch.randint(0, config.num_classes + 1, (batch,), generator=gen)
    labels[-1] = config.num_classes
    k = int(torch.randint(1, masked + 1, (), generator=gen))
    candidates = torch.stack([row.nonzero()[:, 0][torch.randperm(masked, generator=gen)[:k]]
                              for row in mask[:images]]).sort(dim=1).values
    return values, mask, labels, candidates, torch.tensor(2.5)


def head_inputs(model, guidance_halves, rows, step, gen):
    config, head = model.config, model.head
    cond = torch.randn(guidance_halves, rows, config.head_width, generator=gen)
    cache_rows = guidance_halves * rows
    # random in every slot: the slots from `step` on must not matter
    cache = torch.randn(len(head.blocks), 2, cache_rows, head.heads, config.channels,
                        head.head_dim, generator=gen)
    tokens = torch.randint(0, config.levels, (rows, config.channels), generator=gen)
    uniforms = torch.rand(rows, config.channels, generator=gen)
    guidance = 2.5 if guidance_halves == 2 else 1.0
    return (cond, torch.tensor(step), cache, tokens, uniforms, torch.tensor(0.9),
            torch.tensor(guidance), torch.randn(rows, generator=gen))


# --- export + check ---------------------------------------------------------------------------

def _repair_fp16(model):
    """The fp16 converter appends its input casts after their users, and gives a tensor that
    several fp32-kept nodes read one identical cast per reader; the checker wants the nodes in
    order and one node per output name."""
    graph = model.graph
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered, made = [], [], set()
    for node in graph.node:
        if not made.isdisjoint(node.output) and node.op_type == "Cast":
            continue                                  # the same cast again: its twin is kept
        made.update(node.output)
        pending.append(node)
    while pending:
        blocked = []
        for node in pending:
            (ordered if all(x in ready for x in node.input) else blocked).append(node)
            if ordered and ordered[-1] is node:
                ready.update(node.output)
        if len(blocked) == len(pending):
            raise ValueError("fp16 conversion produced a graph with a cycle")
        pending = blocked
    del graph.node[:]
    graph.node.extend(ordered)
    return model


# What each --precision does to the traced fp32 graphs, and how close to fp32 PyTorch they must
# stay: max |difference| (relative to each output's scale unless fp32), share of sampled tokens
# that may flip at near-ties of the CDF (more than that is a bug, not rounding).
PRECISIONS = {"fp32": dict(tolerance=1e-4, token_flips=0.01),
              "fp16": dict(tolerance=5e-2, token_flips=0.1),
              "int8": dict(tolerance=1e-1, token_flips=0.1)}


# ORT's dynamic quantization settings for --int8, recorded in tokenbridge.json. reduce_range:
# 7-bit weights. ORT's u8 x s8 kernels on CPUs without AVX-512 VNNI (AVX2, plain AVX-512) add
# pairs of products in 16 bits (VPMADDUBSW), which saturates with 8-bit weights; with 7-bit ones
# the pair stays below 2^15, so the same graphs give the same numbers on every x86 CPU.
INT8_SETTINGS = {"weight_type": "QInt8",
                 "activation_type": "QUInt8",
                 "per_channel": True,
                 "reduce_range": True,
                 "op_types": ["MatMul"]}


def _quantize_int8(path):
    """ORT's dynamic quantization: int8 weights (per output channel), activations quantized on the
    fly, MatMuls only; LayerNorm, softmax and the sampler stay fp32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    root, level = logging.getLogger(), logging.getLogger().level
    root.setLevel(logging.ERROR)  # the tool's advice on pre-processing is for static quantization
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # and it prints shape-inference chatter
            quantize_dynamic(path, path, weight_type=QuantType[INT8_SETTINGS["weight_type"]],
                             per_channel=INT8_SETTINGS["per_channel"],
                             reduce_range=INT8_SETTINGS["reduce_range"],
                             op_types_to_quantize=INT8_SETTINGS["op_types"],
                             use_external_data_format=_has_external_data(path))
    finally:
        root.setLevel(level)


def _has_external_data(path):
    return any(name != os.path.basename(path) for name in os.listdir(os.path.dirname(path)))


def _export(module, example, path, inputs, outputs, dynamic_axes, meta, precision):
    """Trace module to path at a precision of PRECISIONS, then onnx.checker (by path: the only
    check that reads external data)."""
    traced = os.path.join(os.path.dirname(path), "traced", os.path.basename(path))
    os.makedirs(os.path.dirname(traced))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shapes: the checks below decide
        # over 2 GB of weights the tracer writes one loose file per tensor beside the graph: its
        # own folder keeps them apart, and _save gathers them into one file
        torch.onnx.export(module, example, traced, input_names=list(inputs),
                          output_names=list(outputs), dynamic_axes=dynamic_axes,
                          opset_version=OPSET, dynamo=False, do_constant_folding=True)
    if precision == "int8":
        _quantize_int8(traced)
    if precision == "fp16":
        # Tracing a half model on CPU leaves fp32/fp16 mixes (LayerNorm upcasts) that the checker
        # rejects; ORT's own converter rewrites the fp32 graph instead (given a path, it infers
        # shapes by path, which works past 2 GB). keep_io_types: inputs and outputs stay fp32
        # (cast at the edges), so the loop and the sampler's uniforms do not change. The
        # wrapper's own nodes (the head step's guidance mix and sampler: log-softmax, exp, the
        # CDF compare) stay fp32: in fp16 the CDF resolves ~5e-4 and moves tokens.
        from onnxruntime.transformers.float16 import convert_float_to_float16
        nodes = onnx.load(traced, load_external_data=False).graph.node
        wrapper_nodes = [node.name for node in nodes if node.name.count("/") == 1]
        graph = _repair_fp16(convert_float_to_float16(traced, keep_io_types=True,
                                                      node_block_list=wrapper_nodes))
    else:
        graph = onnx.load(traced)
    for key, value in meta.items():
        graph.metadata_props.add(key=key, value=value)
    _save(graph, path)
    shutil.rmtree(os.path.dirname(traced))
    onnx.checker.check_model(path, full_check=True)


# Weights above this many bytes go to one external data file beside the graph (NAME.onnx.data):
# protobuf cannot serialize a message of 2 GB, and TokenBridge-H's backbone holds 3 GB in fp32.
EXTERNAL_DATA_BYTES = 1 << 30


def _save(graph, path):
    weights = sum(len(t.raw_data) for t in graph.graph.initializer)
    external = weights > EXTERNAL_DATA_BYTES
    onnx.save_model(graph, path, save_as_external_data=external, all_tensors_to_one_file=True,
                    location=os.path.basename(path) + DATA_SUFFIX, size_threshold=1024)


def _check_memory(model, say):
    """One line up front when the export will not fit: the model, its traced graph and the
    parity check's ORT session each hold the weights once."""
    need = 3 * sum(t.numel() * t.element_size() for t in model.state_dict().values())
    have = _available_memory()
    if have is not None and have < need:
        say(f"warning: exporting this model needs about {need / 2**30:.0f} GiB of memory and "
            f"{have / 2**30:.0f} GiB is available; it may be killed (free memory or use a larger "
            f"machine)")


def _available_memory():
    """MemAvailable from /proc/meminfo in bytes (Linux); None where there is no such file."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def _max_diff(module, examples, path, inputs, outputs, precision):
    """Largest |torch - onnxruntime| over the float outputs of all example sets (relative to each
    output's scale unless fp32), the share of integer outputs (sampled tokens) that differ, and
    the provider that ran the graph: fp16 graphs are for GPUs, so CUDA's when it loads."""
    session, on_cuda = make_session(path, "auto" if precision == "fp16" else "cpu")
    relative = precision != "fp32"
    worst, mismatched, total = 0.0, 0, 0
    for example in examples:
        with torch.no_grad():
            want = module(*example)
        want = [w.numpy() for w in (want if isinstance(want, tuple) else (want,))]
        feeds = {name: x.numpy() for name, x in zip(inputs, example, strict=True)}
        got = session.run(list(outputs), feeds)
        kept = True  # rows of the head whose sampled tokens agree
        if "tokens_out" in outputs:
            i = outputs.index("tokens_out")
            kept = (want[i] == got[i]).all(-1)
        for name, w, g in zip(outputs, want, got, strict=True):
            # where a token flipped, its score is another token's log-probability
            if name == "score_out":
                w, g = w[kept], g[kept]
            if np.issubdtype(w.dtype, np.floating):
                diff = float(np.abs(w - g.astype(np.float32)).max(initial=0.0))
                scale = 1.0 + float(np.abs(w).max(initial=0.0))
                worst = max(worst, diff / scale if relative else diff)
            else:
                mismatched += int((w != g).sum())
                total += g.size
    return worst, mismatched / max(total, 1), "CUDA" if on_cuda else "CPU"


def export(run, out=None, precision="fp32", tolerance=None, verbose=True):
    """Export RUN to OUT (default RUN/onnx) at a precision of PRECISIONS (the VAE decoder stays
    fp32 under int8). Returns the metadata dict written to the JSON.

    Everything is written to a staging folder inside OUT first and moved into place only once
    every graph has passed its check: a failed export leaves OUT as it was."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    say = print if verbose else (lambda *a: None)
    out = out or os.path.join(run, "onnx")

    # the run first: a run that cannot be exported leaves no empty folder behind
    model, ckpt = runs.load_run(run)
    _check_memory(model, say)
    vae = runs.load_vae(os.path.join(run, runs.VAE_DIR)) if runs.has_vae(run) else None

    # the output folder, and a staging folder inside it
    created = not os.path.isdir(out)
    try:
        os.makedirs(out, exist_ok=True)
        stage = tempfile.mkdtemp(prefix=".export-", dir=out)
    except OSError as e:  # a regular file in the way, no permission
        raise ValueError(f"cannot write the output folder {out} ({e.strerror}); "
                         "choose another --out") from None

    # every graph checked into the stage, then all of it into OUT, the JSON last
    try:
        limits = {**PRECISIONS[precision], **({"tolerance": tolerance} if tolerance else {})}
        report = _export_graphs(model, vae, stage, precision, limits, say)
        info = _metadata(run, model, ckpt, vae, precision, report)
        with open(os.path.join(stage, META_FILE), "w") as f:
            json.dump(info, f, indent=1)
        _publish(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if created and not os.listdir(out):
            os.rmdir(out)
    say(f"exported {run} -> {out} (fingerprint {info['fingerprint'][:12]})")
    return info


def _export_graphs(model, vae, folder, precision, limits, say):
    """Every graph into folder, each checked against PyTorch; returns {file: max difference}."""
    config = model.config
    meta = {"fingerprint": runs.fingerprint(model)}
    gen = torch.Generator().manual_seed(0)
    report = {}

    def run_export(name, module, examples, inputs, outputs, axes, graph_precision=precision):
        # torch.onnx.export restores the training flag it found, recursively: a wrapper left in
        # training mode would switch the model's dropout back on for the parity check
        module.eval()
        path = os.path.join(folder, name)
        _export(module, examples[0], path, inputs, outputs, axes, meta, graph_precision)
        diff, wrong, provider = _max_diff(module, examples, path, inputs, outputs, graph_precision)
        say(f"{name}: onnx.checker ok, {graph_precision}, max |torch - onnxruntime ({provider})| "
            f"= {diff:.2e}" + (" (relative)" if graph_precision != "fp32" else "")
            + (f", {wrong:.1%} of sampled tokens differ" if wrong else ""))
        if diff > limits["tolerance"] or wrong > limits["token_flips"]:
            raise ValueError(f"{name} differs from PyTorch by {diff:.2e} (tolerance "
                             f"{limits['tolerance']:.0e}, {wrong:.1%} of tokens differ); "
                             "not exported")
        report[name] = diff

    # traced in fp32 at every precision: --fp16 / --int8 convert the traced graphs (see _export)
    examples = [backbone_inputs(config, 2, 2, gen), backbone_inputs(config, 3, 1, gen)]
    run_export(BACKBONE_FILE, BackboneGraph(model), examples, BACKBONE_INPUTS, BACKBONE_OUTPUTS,
               {"values": {0: "batch"}, "mask": {0: "batch"}, "labels": {0: "batch"},
                "candidates": {0: "images", 1: "candidates"},
                "rows": {0: "halves", 1: "rows"}, "mixed": {1: "rows"}})

    # trace at a middle step with guidance, check at the first/last step and without guidance too
    examples = [head_inputs(model, 2, 5, 3, gen), head_inputs(model, 1, 7, 0, gen),
                head_inputs(model, 2, 3, config.channels - 1, gen)]
    run_export(HEAD_FILE, HeadStepGraph(model), examples, HEAD_INPUTS, HEAD_OUTPUTS,
               {"cond": {0: "halves", 1: "rows"}, "cache": {2: "cache_rows"},
                "tokens": {0: "rows"}, "uniforms": {0: "rows"}, "score": {0: "rows"},
                "logits": {0: "rows"}, "tokens_out": {0: "rows"}, "score_out": {0: "rows"},
                "cache_out": {2: "cache_rows"}})

    # the VAE decoder, when the run has one
    if vae is None:
        say("no VAE in the run (RUN/vae): vae_decoder.onnx not written")
        return report
    latent_shape = (config.channels, config.grid, config.grid)
    examples = [(torch.randn(b, *latent_shape, generator=gen),) for b in (2, 1)]
    run_export(VAE_FILE, VAEDecoderGraph(vae), examples, VAE_INPUTS, VAE_OUTPUTS,
               {"latents": {0: "batch"}, "image": {0: "batch"}},
               "fp32" if precision == "int8" else precision)  # convolutions: no int8 gain here
    return report


def _metadata(run, model, ckpt, vae, precision, report):
    """tokenbridge.json: what deploy.OnnxSampler needs besides the graphs."""
    q, head = model.quantizer, model.head
    graphs = {BACKBONE_FILE: (BACKBONE_INPUTS, BACKBONE_OUTPUTS),
              HEAD_FILE: (HEAD_INPUTS, HEAD_OUTPUTS),
              **({VAE_FILE: (VAE_INPUTS, VAE_OUTPUTS)} if vae is not None else {})}
    scaling = float(vae.config.scaling_factor) if vae is not None else None
    return {
        "format": EXPORT_FORMAT,
        "fingerprint": runs.fingerprint(model),
        "checkpoint_sha256": file_sha256(os.path.join(run, runs.CHECKPOINT)),
        "config": model.config.to_dict(),
        "dtype": "float32",   # of the graphs' inputs and outputs
        "precision": precision,
        **({"int8": INT8_SETTINGS} if precision == "int8" else {}),
        "weights": "ema" if ckpt.get("ema") is not None else "model",
        "quantizer": {"centers": q.centers.tolist(),
                      "mean": q.mean.tolist(),
                      "std": q.std.tolist(),
                      "order": q.order.tolist()},
        "head": {"depth": len(head.blocks), "heads": head.heads, "head_dim": head.head_dim},
        "vae": {"file": VAE_FILE, "scaling_factor": scaling} if vae is not None else None,
        "graphs": {name: {"inputs": list(inputs), "outputs": list(outputs)}
                   for name, (inputs, outputs) in graphs.items()},
        "max_abs_diff": report,
        "torch": torch.__version__,
        "opset": OPSET,
    }


def _publish(stage, out):
    """Move the checked files into out: data files before the graphs that name them, the JSON
    last (a reader that finds it finds everything); data files of an earlier export that this one
    does not have are removed."""
    names = sorted(os.listdir(stage), key=lambda n: (n == META_FILE, not n.endswith(DATA_SUFFIX)))
    for graph in (n for n in (BACKBONE_FILE, HEAD_FILE, VAE_FILE) if n + DATA_SUFFIX not in names):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out, graph + DATA_SUFFIX))
    for name in names:
        os.replace(os.path.join(stage, name), os.path.join(out, name))


def main(args):
    if args.official:
        from lib import official
        args.run = official.import_official(args.official, args.preset, args.vae, args.run)
    if not args.run:
        raise ValueError("give --run-dir RUN (a folder with checkpoint.pt) "
                         "or --official CHECKPOINT.pth")
    export(args.run, args.out, precision=args.precision)


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--run-dir", dest="run",
                        help="run folder holding checkpoint.pt (and vae/, a diffusers "
                             "AutoencoderKL)")
    parser.add_argument("--official",
                        help="official TokenBridge checkpoint-last.pth: converted into --run-dir "
                             "(default runs/official-PRESET), then exported")
    parser.add_argument("--preset", choices=sorted(tb.PRESETS), default="large",
                        help="size of the --official checkpoint")
    parser.add_argument("--vae", help="with --official: MAR's kl16.ckpt, converted into RUN/vae")
    parser.add_argument("--out", default=None, help="output folder (default RUN/onnx)")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--fp16", dest="precision", action="store_const", const="fp16",
                           default="fp32",
                           help="half-precision graphs (for GPU; checked against fp32 PyTorch)")
    precision.add_argument("--int8", dest="precision", action="store_const", const="int8",
                           help="int8 matmuls in the backbone and head (for CPU; checked against "
                                "fp32 PyTorch)")
    return parser


if __name__ == "__main__":
    try:
        main(get_parser().parse_args())
    except ValueError as e:  # bad input: one line, not a traceback
        raise SystemExit(f"error: {e}") from None
