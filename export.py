"""Export a trained TokenBridge run to ONNX, for the torch-free sampler in deploy.py.

    python export.py --run runs/demo                 # -> runs/demo/onnx/
    python export.py --run runs/demo --fp16          # half-precision graphs, for GPU
    python export.py --run runs/demo --int8          # int8 matmuls in backbone and head, for CPU

Writes three graphs and one JSON (DESIGN.md §3):
  backbone.onnx      known values (B, N, C), mask (B, N), labels (B,) -> head condition (B, N, D)
                     = TokenBridge.condition: backbone + head.project; fixed-shape inputs, the
                     known positions gathered inside (every image has as many masked: NonZero)
  head_step.onnx     one channel of the AR head with its KV cache (t slots in, t+1 out), the logit-level CFG
                     mix and the inverse-CDF sampler inside (head.step + sample_from_logits), so a
                     whole channel loop can stay on the device
  vae_decoder.onnx   scaled latents (B, C, H, W) -> image (B, 3, H', W') in [-1, 1]
  tokenbridge.json   config, quantizer tables, channel order, graph I/O names, fingerprint

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
import warnings

import numpy as np
import onnx
import torch
import torch.nn as nn

import tokenbridge as tb
import runs
from deploy import (BACKBONE_FILE, BACKBONE_INPUTS, BACKBONE_OUTPUTS, EXPORT_FORMAT, HEAD_FILE, HEAD_INPUTS,
                    HEAD_OUTPUTS, META_FILE, VAE_FILE, VAE_INPUTS, VAE_OUTPUTS, file_sha256, make_session)

OPSET = 17


# --- export wrappers: thin shells around tokenbridge.py, in the order the loop calls them -----

class BackboneGraph(nn.Module):
    """Twin of TokenBridge.condition: values (B, N, C), mask (B, N) bool, labels (B,) -> (B, N, D)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, values, mask, labels):
        return self.model.condition(values, mask, labels)


class HeadStepGraph(nn.Module):
    """One channel step of TokenBridge._sample_channels, sampling included.

    cond (G, M, D): G = 1, or 2 for logit-level CFG (cond rows, then uncond rows).
    tokens (M, C): the tokens sampled so far, in generation order; column t is written.
    cache (depth, 2, G*M, heads, step, head_dim): head.step's cache, the `step` slots so far (none
    at step 0; the graph never reshapes it: ONNX Reshape reads a 0 in a shape as "keep this dim").
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
        u = torch.where(slots == step, uniforms, 0).sum(1)                                # (M,) = uniforms[:, t]
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

def backbone_inputs(cfg, batch, gen):
    N, C = cfg.seq_len, cfg.channels
    values = torch.randn(batch, N, C, generator=gen)
    masked = int(torch.randint(1, N, (), generator=gen))     # as in sampling: as many in every image
    mask = torch.rand(batch, N, generator=gen).argsort(-1) < masked
    labels = torch.randint(0, cfg.num_classes + 1, (batch,), generator=gen)   # incl. the null class
    labels[-1] = cfg.num_classes
    return values, mask, labels


def head_inputs(model, guidance_halves, rows, step, gen):
    cfg, head = model.config, model.head
    C, D = cfg.channels, cfg.head_width
    cond = torch.randn(guidance_halves, rows, D, generator=gen)
    cache = torch.randn(len(head.blocks), 2, guidance_halves * rows, head.heads, step, head.head_dim,
                        generator=gen)                              # the `step` slots before it
    tokens = torch.randint(0, cfg.levels, (rows, C), generator=gen)
    uniforms = torch.rand(rows, C, generator=gen)
    return (cond, torch.tensor(step), cache, tokens, uniforms, torch.tensor(0.9),
            torch.tensor(2.5 if guidance_halves == 2 else 1.0), torch.randn(rows, generator=gen))


# --- export + check ---------------------------------------------------------------------------

def _toposort(model):
    """The fp16 converter appends its input casts after their users; the checker wants order."""
    graph = model.graph
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
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
INT8_SETTINGS = {"weight_type": "QInt8", "activation_type": "QUInt8", "per_channel": True, "reduce_range": True,
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
                             per_channel=INT8_SETTINGS["per_channel"], reduce_range=INT8_SETTINGS["reduce_range"],
                             op_types_to_quantize=INT8_SETTINGS["op_types"])
    finally:
        root.setLevel(level)


def _export(module, example, path, inputs, outputs, dynamic_axes, meta, precision):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shapes: the checks below decide
        torch.onnx.export(module, example, path, input_names=list(inputs), output_names=list(outputs),
                          dynamic_axes=dynamic_axes, opset_version=OPSET, dynamo=False,
                          do_constant_folding=True)
    if precision == "int8":
        _quantize_int8(path)
    graph = onnx.load(path)
    if precision == "fp16":
        # Tracing a half model on CPU leaves fp32/fp16 mixes (LayerNorm upcasts) that the checker
        # rejects; ORT's own converter rewrites the fp32 graph instead. keep_io_types: inputs and
        # outputs stay fp32 (cast at the edges), so the loop and the sampler's uniforms do not change.
        from onnxruntime.transformers.float16 import convert_float_to_float16
        graph = _toposort(convert_float_to_float16(graph, keep_io_types=True))
    for key, value in meta.items():
        graph.metadata_props.add(key=key, value=value)
    onnx.save(graph, path)
    onnx.checker.check_model(path, full_check=True)


def _max_diff(module, examples, path, inputs, outputs, relative):
    """Largest |torch - onnxruntime| over the float outputs of all example sets (relative: to each
    output's scale), and the share of integer outputs (sampled tokens) that differ."""
    session = make_session(path, "cpu")[0]
    worst, mismatched, total = 0.0, 0, 0
    for example in examples:
        with torch.no_grad():
            want = module(*example)
        want = [w.numpy() for w in (want if isinstance(want, tuple) else (want,))]
        got = session.run(list(outputs), {name: x.numpy() for name, x in zip(inputs, example)})
        kept = True  # rows of the head whose sampled tokens agree
        if "tokens_out" in outputs:
            i = outputs.index("tokens_out")
            kept = (want[i] == got[i]).all(-1)
        for name, w, g in zip(outputs, want, got):
            if name == "score_out":  # where a token flipped, this is another token's log-probability
                w, g = w[kept], g[kept]
            if np.issubdtype(w.dtype, np.floating):
                diff = float(np.abs(w - g.astype(np.float32)).max(initial=0.0))
                worst = max(worst, diff / (1.0 + float(np.abs(w).max(initial=0.0))) if relative else diff)
            else:
                mismatched += int((w != g).sum())
                total += g.size
    return worst, mismatched / max(total, 1)


def export(run, out=None, precision="fp32", tolerance=None, verbose=True):
    """Export RUN to OUT (default RUN/onnx) at a precision of PRECISIONS (the VAE decoder stays
    fp32 under int8). Returns the metadata dict written to the JSON."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    out = out or os.path.join(run, "onnx")
    model, ckpt = runs.load_run(run)  # first: a run that cannot be exported leaves no empty folder behind
    vae = runs.load_vae(os.path.join(run, runs.VAE_DIR)) if runs.has_vae(run) else None
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:  # a regular file in the way, no permission
        raise ValueError(f"cannot create the output folder {out} ({e.strerror}); choose another --out") from None
    if not os.access(out, os.W_OK):
        raise ValueError(f"cannot write to the output folder {out}; choose another --out")
    cfg = model.config
    limits = {**PRECISIONS[precision], **({"tolerance": tolerance} if tolerance else {})}
    say = print if verbose else (lambda *a: None)
    fp = runs.fingerprint(model)
    meta = {"fingerprint": fp}
    gen = torch.Generator().manual_seed(0)
    report = {}

    def run_export(name, module, examples, inputs, outputs, axes, graph_precision=precision):
        path = os.path.join(out, name)
        tmp = path + ".tmp"  # a graph that failed its check never sits under the real name
        _export(module, examples[0], tmp, inputs, outputs, axes, meta, graph_precision)
        relative = graph_precision != "fp32"
        diff, wrong = _max_diff(module, examples, tmp, inputs, outputs, relative)
        say(f"{name}: onnx.checker ok, {graph_precision}, max |torch - onnxruntime| = {diff:.2e}"
            + (" (relative)" if relative else "") + (f", {wrong:.1%} of sampled tokens differ" if wrong else ""))
        if diff > limits["tolerance"] or wrong > limits["token_flips"]:
            os.remove(tmp)
            raise ValueError(f"{name} differs from PyTorch by {diff:.2e} (tolerance {limits['tolerance']:.0e}, "
                             f"{wrong:.1%} of tokens differ); not exported")
        os.replace(tmp, path)
        report[name] = diff

    # traced in fp32 at every precision: --fp16 / --int8 convert the traced graphs (see _export)
    module = BackboneGraph(model)
    examples = [backbone_inputs(cfg, b, gen) for b in (2, 3)]
    run_export(BACKBONE_FILE, module, examples, BACKBONE_INPUTS, BACKBONE_OUTPUTS,
               {"values": {0: "batch"}, "mask": {0: "batch"}, "labels": {0: "batch"}, "cond": {0: "batch"}})

    module = HeadStepGraph(model)
    # trace at a middle step with guidance, check at the first/last step and without guidance too
    examples = [head_inputs(model, 2, 5, 3, gen), head_inputs(model, 1, 7, 0, gen),
                head_inputs(model, 2, 3, cfg.channels - 1, gen)]
    run_export(HEAD_FILE, module, examples, HEAD_INPUTS, HEAD_OUTPUTS,
               {"cond": {0: "halves", 1: "rows"}, "cache": {2: "cache_rows", 4: "slots"},
                "tokens": {0: "rows"}, "uniforms": {0: "rows"}, "score": {0: "rows"}, "logits": {0: "rows"},
                "tokens_out": {0: "rows"}, "score_out": {0: "rows"},
                "cache_out": {2: "cache_rows", 4: "slots_out"}})

    scaling = None
    if vae is not None:
        scaling = float(vae.config.scaling_factor)
        module = VAEDecoderGraph(vae)
        g = cfg.grid
        examples = [(torch.randn(b, cfg.channels, g, g, generator=gen),) for b in (2, 1)]
        run_export(VAE_FILE, module, examples, VAE_INPUTS, VAE_OUTPUTS,
                   {"latents": {0: "batch"}, "image": {0: "batch"}},
                   "fp32" if precision == "int8" else precision)  # convolutions: no int8 gain here
    else:
        say("no VAE in the run (RUN/vae): vae_decoder.onnx not written")

    q = model.quantizer
    info = {
        "format": EXPORT_FORMAT,
        "fingerprint": fp,
        "checkpoint_sha256": file_sha256(os.path.join(run, runs.CHECKPOINT)),
        "config": cfg.to_dict(),
        "dtype": "float32",   # of the graphs' inputs and outputs
        "precision": precision,
        **({"int8": INT8_SETTINGS} if precision == "int8" else {}),
        "weights": "ema" if ckpt.get("ema") is not None else "model",
        "quantizer": {"centers": q.centers.tolist(), "mean": q.mean.tolist(), "std": q.std.tolist(),
                      "order": q.order.tolist()},
        "head": {"depth": len(model.head.blocks), "heads": model.head.heads, "head_dim": model.head.head_dim},
        "vae": {"file": VAE_FILE, "scaling_factor": scaling} if vae is not None else None,
        "graphs": {BACKBONE_FILE: {"inputs": list(BACKBONE_INPUTS), "outputs": list(BACKBONE_OUTPUTS)},
                   HEAD_FILE: {"inputs": list(HEAD_INPUTS), "outputs": list(HEAD_OUTPUTS)},
                   **({VAE_FILE: {"inputs": list(VAE_INPUTS), "outputs": list(VAE_OUTPUTS)}} if vae else {})},
        "max_abs_diff": report,
        "torch": torch.__version__, "opset": OPSET,
    }
    with open(os.path.join(out, META_FILE + ".tmp"), "w") as f:
        json.dump(info, f, indent=1)
    os.replace(os.path.join(out, META_FILE + ".tmp"), os.path.join(out, META_FILE))
    say(f"exported {run} -> {out} (fingerprint {fp[:12]})")
    return info


def main(args):
    if args.official:
        import interop
        args.run = interop.import_official(args.official, args.preset, args.vae, args.run)
    if not args.run:
        raise ValueError("give --run RUN (a folder with checkpoint.pt) or --official CHECKPOINT.pth")
    export(args.run, args.out, precision=args.precision)


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", help="run folder holding checkpoint.pt (and vae/, a diffusers AutoencoderKL)")
    p.add_argument("--official", help="official TokenBridge checkpoint-last.pth: converted into --run "
                                      "(default runs/official-PRESET), then exported")
    p.add_argument("--preset", choices=sorted(tb.PRESETS), default="large", help="size of the --official checkpoint")
    p.add_argument("--vae", help="with --official: MAR's kl16.ckpt, converted into RUN/vae")
    p.add_argument("--out", default=None, help="output folder (default RUN/onnx)")
    precision = p.add_mutually_exclusive_group()
    precision.add_argument("--fp16", dest="precision", action="store_const", const="fp16", default="fp32",
                           help="half-precision graphs (for GPU; checked against fp32 PyTorch)")
    precision.add_argument("--int8", dest="precision", action="store_const", const="int8",
                           help="int8 matmuls in the backbone and head (for CPU; checked against fp32 PyTorch)")
    return p


if __name__ == "__main__":
    try:
        main(get_parser().parse_args())
    except ValueError as e:  # bad input: one line, not a traceback
        raise SystemExit(f"error: {e}")
