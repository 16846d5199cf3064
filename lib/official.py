"""Interop with the released weights: official TokenBridge checkpoints and MAR's kl16 VAE.

    model = load_official_tokenbridge("checkpoint-last.pth", preset="large")   # -> TokenBridge
    vae = load_ldm_vae("kl16.ckpt")                                            # -> AutoencoderKL
    python -m tools.released --official checkpoint-last.pth --preset large --vae kl16.ckpt
    python -m tools.released --download large  # the same, both files fetched by their names

Both converters are plain key maps checked both ways: every source key lands on exactly one
target tensor of the same shape and every target tensor is filled, or a ValueError names the
first key that does not fit.
Kept out of tokenbridge.py, which describes the method; this file only describes other layouts.
"""
import argparse
import os
import re

import torch

import tokenbridge as tb
from lib import runs
from lib.cli import SAMPLING_FILE

# AR slot i of the official models generates VAE channel OFFICIAL_ORDER[i] (hard-coded there).
OFFICIAL_ORDER = [8, 1, 10, 9, 6, 12, 4, 0, 3, 11, 7, 14, 2, 15, 13, 5]
KL16_SCALING = 0.2325  # MAR's latent scaling for kl16
# Sampling settings of the released models (official README): cfg, temperature, steps.
RELEASED_SAMPLING = {"large": dict(cfg=3.1, temperature=0.96, num_iter=256),
                     "huge": dict(cfg=3.45, temperature=0.91, num_iter=256)}

# Where the released files are published. The official README: "Download pre-trained TokenBridge
# models from [huggingface](https://huggingface.co/Epiphqny/TokenBridge)"; the checkpoint of a
# size is found by listing that repository (released_checkpoint). kl16 is MAR's, published at the
# Dropbox link of MAR's util/download.py (dl=1: the file, not its web page).
TOKENBRIDGE_REPO = "Epiphqny/TokenBridge"
RELEASED_SIZES = ("large", "huge")
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".ckpt")
RELEASED_KL16 = dict(filename="kl16.ckpt",
                     url="https://www.dropbox.com/scl/fi/hhmuvaiacrarfg28qxhwz/kl16.ckpt"
                         "?rlkey=l44xipsezc8atcffdp4q7mwmh&dl=1")


def load_checkpoint(path):
    """An official or LDM checkpoint, loaded safely; the official files also pickle an
    argparse.Namespace."""
    return runs.read_torch_file(path, "torch checkpoint", "is the file complete?",
                                safe_globals=[argparse.Namespace])


def convert_state_dict(source, target, mapping, what):
    """Copy source tensors into target (a state dict, in place) through mapping:
    source key -> (target key, index into the target tensor or None)."""
    filled = set()
    for key, value in source.items():
        tb.require(key in mapping,
                   f"{what}: unexpected key {key!r}; a checkpoint of another architecture?")
        name, index = mapping[key]
        dest = target[name] if index is None else target[name][index]
        if value.dim() == dest.dim() + 1 and value.shape[0] == 1:  # official (1, C, D) embeddings
            value = value[0]
        tb.require(value.shape == dest.shape,
                   f"{what}: {key!r} has shape {tuple(value.shape)} but the model expects "
                   f"{tuple(dest.shape)}; another model size (check --preset)?")
        dest.copy_(value)
        filled.add(key)
    missing = [k for k in mapping if k not in filled]
    if missing:
        raise ValueError(f"{what}: the checkpoint lacks {missing[0]!r} "
                         f"({len(missing)} keys missing)")
    return target


# ---------------------------------------------------------------------------------------------
# Official TokenBridge -> our TokenBridge
# ---------------------------------------------------------------------------------------------

# our name -> official name, applied to the start of each key after our module prefix
_OFFICIAL_NAMES = [("backbone.encoder_pos_embed", "encoder_pos_embed_learned"),
                   ("backbone.decoder_pos_embed", "decoder_pos_embed_learned"),
                   ("backbone.", ""),
                   ("head.slot_pos", "channel_embed"),
                   ("head.slot_cond", "timesteps_embeddings"),
                   ("head.blocks.", "channel_blocks."),
                   ("head.norm.", "channel_norm."),
                   ("head.final.", "channel_final."),
                   ("head.", "")]
# Derived tables the official state dict carries; we check them instead of loading them.
_DERIVED = ("channel_mask", "reconstruction_values", "boundaries")
# Our tensors that stack one official tensor per channel (mapped index by index below).
_STACKED = ("head.token_embed", "head.out_weight", "head.out_bias")


def official_key_mapping(cfg):
    """Official key -> (our key, index) for a model of config cfg (no tensor is allocated)."""
    with torch.device("meta"):
        ours = tb.TokenBridge(cfg).state_dict()
    mapping = {}
    for key in ours:
        if key.startswith("quantizer.") or key in _STACKED:
            continue
        prefix, official = next((p, o) for p, o in _OFFICIAL_NAMES if key.startswith(p))
        mapping[official + key[len(prefix):]] = (key, None)
    for c in range(cfg.channels - 1):  # one embedding table per input slot, stacked here
        mapping[f"token_embeddings.{c}.weight"] = ("head.token_embed", c)
    for c in range(cfg.channels):      # one classifier per channel, stacked here
        mapping[f"channel_heads.{c}.weight"] = ("head.out_weight", c)
        mapping[f"channel_heads.{c}.bias"] = ("head.out_bias", c)
    return mapping


def official_config(preset, **overrides):
    """Our config for an official model: the preset, plus the official quirks as options."""
    return tb.TokenBridgeConfig.preset(preset, official_compat=True, **overrides)


def from_official_state_dict(state_dict, cfg):
    """Build our TokenBridge (eval mode) from an official state dict."""
    tb.require(cfg.official_compat, "official weights need official_compat=True in the config")
    model = tb.TokenBridge(cfg).eval()
    learned = {k: v for k, v in state_dict.items() if k not in _DERIVED}
    target = model.state_dict()
    mapping = official_key_mapping(cfg)
    convert_state_dict(learned, target, mapping, "official TokenBridge checkpoint")
    model.load_state_dict(target)
    q = model.quantizer
    for key, ours in (("boundaries", q.boundaries), ("reconstruction_values", q.centers)):
        if key in state_dict:
            tb.require(torch.allclose(state_dict[key].float(), ours, atol=1e-4),
                       f"the checkpoint's {key} differ from {cfg.levels}-level Gaussian bins; "
                       "wrong --levels?")
    use_official_range(q)
    q.order.copy_(torch.tensor(OFFICIAL_ORDER[:cfg.channels]))
    return model


# Official embeddings stored as (1, C, D) where ours are (C, D) (from_official_state_dict
# squeezes them).
_OFFICIAL_BATCHED = ("channel_embed", "timesteps_embeddings")


def to_official_state_dict(model):
    """Our TokenBridge -> an official state dict, the inverse of from_official_state_dict: the
    stacked token tables and classifiers split per channel, the (1, C, D) embeddings, and the
    derived tables. Other tensors share memory with the model (no copy of TokenBridge-H)."""
    ours, C = model.state_dict(), model.config.channels
    official = {}
    for key, (name, index) in official_key_mapping(model.config).items():
        # a split keeps its own storage, as each table has in an official file
        value = ours[name] if index is None else ours[name][index].clone()
        official[key] = value.unsqueeze(0) if key in _OFFICIAL_BATCHED else value
    official["channel_mask"] = torch.full((C, C), float("-inf")).triu(1)  # causal: 0 on and below
    official["reconstruction_values"] = ours["quantizer.centers"].clone()
    official["boundaries"] = ours["quantizer.boundaries"].clone()
    return official


@torch.no_grad()
def use_official_range(quantizer):
    """The official code's fixed map of [-5, 5] onto [-3, 3] for every channel, instead of
    per-channel statistics: mean 0, std 5/3."""
    quantizer.mean.zero_()
    quantizer.std.fill_(5.0 / quantizer.std_range)
    return quantizer


def load_official_tokenbridge(path, preset, **overrides):
    """checkpoint-last.pth of the official code -> our TokenBridge, EMA weights when present."""
    ckpt = load_checkpoint(path)
    tb.require(isinstance(ckpt, dict) and ("model_ema" in ckpt or "model" in ckpt),
               f"{path} has neither 'model_ema' nor 'model': "
               "not an official TokenBridge checkpoint")
    state_dict = ckpt.get("model_ema", ckpt.get("model"))
    return from_official_state_dict(state_dict, official_config(preset, **overrides))


# ---------------------------------------------------------------------------------------------
# LDM / MAR VAE (kl16.ckpt) -> diffusers.AutoencoderKL
# ---------------------------------------------------------------------------------------------

def ldm_vae_config(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, embed_dim=16,
                   resolution=256, attn_levels=(4,), scaling_factor=KL16_SCALING):
    """diffusers AutoencoderKL arguments for an LDM VAE (defaults: MAR's kl16). attn_levels are
    the encoder levels with attention blocks (kl16: the 16x16 level); the decoder has none."""
    levels = len(ch_mult)
    down_blocks = tuple("AttnDownEncoderBlock2D" if i in attn_levels else "DownEncoderBlock2D"
                        for i in range(levels))
    return dict(in_channels=3,
                out_channels=3,
                latent_channels=embed_dim,
                layers_per_block=num_res_blocks,
                block_out_channels=tuple(ch * m for m in ch_mult),
                sample_size=resolution,
                down_block_types=down_blocks,
                up_block_types=("UpDecoderBlock2D",) * levels,
                scaling_factor=scaling_factor)


def _ldm_attention(src, dst):
    return {f"{src}.norm": f"{dst}.group_norm",
            f"{src}.q": f"{dst}.to_q",
            f"{src}.k": f"{dst}.to_k",
            f"{src}.v": f"{dst}.to_v",
            f"{src}.proj_out": f"{dst}.to_out.0"}


def _ldm_resnet(src, dst):
    return {f"{src}.{n}": f"{dst}.{n}" for n in ("norm1", "conv1", "norm2", "conv2")} | \
           {f"{src}.nin_shortcut": f"{dst}.conv_shortcut"}


def ldm_module_renames(levels, num_res_blocks):
    """LDM module path -> diffusers module path (the parameter suffix .weight/.bias is kept)."""
    r = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    for side in ("encoder", "decoder"):
        r |= {f"{side}.conv_in": f"{side}.conv_in", f"{side}.norm_out": f"{side}.conv_norm_out",
              f"{side}.conv_out": f"{side}.conv_out"}
        r |= _ldm_resnet(f"{side}.mid.block_1", f"{side}.mid_block.resnets.0")
        r |= _ldm_resnet(f"{side}.mid.block_2", f"{side}.mid_block.resnets.1")
        r |= _ldm_attention(f"{side}.mid.attn_1", f"{side}.mid_block.attentions.0")
    for i in range(levels):
        down = f"encoder.down_blocks.{i}"
        up = f"decoder.up_blocks.{levels - 1 - i}"  # LDM numbers the up levels the other way
        for j in range(num_res_blocks):
            r |= _ldm_resnet(f"encoder.down.{i}.block.{j}", f"{down}.resnets.{j}")
            r |= _ldm_attention(f"encoder.down.{i}.attn.{j}", f"{down}.attentions.{j}")
        for j in range(num_res_blocks + 1):
            r |= _ldm_resnet(f"decoder.up.{i}.block.{j}", f"{up}.resnets.{j}")
        r[f"encoder.down.{i}.downsample.conv"] = f"{down}.downsamplers.0.conv"
        r[f"decoder.up.{i}.upsample.conv"] = f"{up}.upsamplers.0.conv"
    return r


def from_ldm_state_dict(state_dict, **config):
    """LDM-layout VAE state dict -> diffusers AutoencoderKL (eval mode)."""
    from diffusers import AutoencoderKL
    vae = AutoencoderKL(**ldm_vae_config(**config)).eval()
    levels, blocks = len(vae.config.block_out_channels), vae.config.layers_per_block
    renames = ldm_module_renames(levels, blocks)
    target = vae.state_dict()
    mapping = {}
    for key in state_dict:
        module, _, param = key.rpartition(".")
        tb.require(module in renames,
                   f"LDM VAE checkpoint: unexpected key {key!r}; another architecture?")
        mapping[key] = (f"{renames[module]}.{param}", None)
    filled = {name for name, _ in mapping.values()}
    tb.require(filled == set(target),
               "LDM VAE checkpoint: the model has tensors the checkpoint does not fill: "
               f"{sorted(set(target) - filled)[:1]}")
    # LDM attention projections are 1x1 convolutions; diffusers uses linear layers.
    source = {k: v.flatten(1) if v.dim() == 4 and target[mapping[k][0]].dim() == 2 else v
              for k, v in state_dict.items()}
    vae.load_state_dict(convert_state_dict(source, target, mapping, "LDM VAE checkpoint"))
    return vae


def to_ldm_state_dict(vae):
    """diffusers AutoencoderKL -> an LDM-layout state dict (MAR's kl16.ckpt "model"), the inverse
    of from_ldm_state_dict. Tensors share memory with the VAE."""
    levels, blocks = len(vae.config.block_out_channels), vae.config.layers_per_block
    back = {ours: ldm for ldm, ours in ldm_module_renames(levels, blocks).items()}
    ldm = {}
    for key, value in vae.state_dict().items():
        module, _, param = key.rpartition(".")
        tb.require(module in back, f"AutoencoderKL: {key!r} has no place in the LDM layout")
        # the only 2-D weights are the attention projections: LDM's 1x1 convolutions
        ldm[f"{back[module]}.{param}"] = value[..., None, None] if value.dim() == 2 else value
    return ldm


def ldm_config_from_state_dict(state_dict):
    """Read ch, ch_mult, res blocks, attention levels and latent size off an LDM VAE's keys."""
    keys = list(state_dict)
    ch = state_dict["encoder.conv_in.weight"].shape[0]
    levels = 1 + max(int(k.split(".")[2]) for k in keys if k.startswith("encoder.down."))
    blocks = 1 + max(int(k.split(".")[4]) for k in keys if k.startswith("encoder.down.0.block."))
    widths = [state_dict[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in range(levels)]
    return dict(ch=ch,
                num_res_blocks=blocks,
                embed_dim=state_dict["post_quant_conv.weight"].shape[0],
                ch_mult=tuple(width // ch for width in widths),
                attn_levels=tuple(i for i in range(levels)
                                  if f"encoder.down.{i}.attn.0.q.weight" in state_dict))


def load_ldm_vae(path, latent_channels=None):
    """MAR's kl16.ckpt (torch.load(path)["model"], LDM layout) -> diffusers AutoencoderKL."""
    ckpt = load_checkpoint(path)
    state_dict = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    tb.require(isinstance(state_dict, dict) and "encoder.conv_in.weight" in state_dict
               and "post_quant_conv.weight" in state_dict,
               f"{path} is not an LDM/MAR VAE checkpoint "
               "(no encoder.conv_in.weight under 'model')")
    config = ldm_config_from_state_dict(state_dict)
    tb.require(latent_channels is None or config["embed_dim"] == latent_channels,
               f"{path} has {config['embed_dim']} latent channels "
               f"but the model expects {latent_channels}")
    return from_ldm_state_dict(state_dict, **config)


# ---------------------------------------------------------------------------------------------
# Released weights -> a run directory of this project (what sample.py and export.py read)
# ---------------------------------------------------------------------------------------------

def import_official(checkpoint, preset, vae=None, out=None):
    """Convert an official checkpoint (and MAR's kl16 VAE) into RUN/checkpoint.pt (+ RUN/vae),
    with the released sampling settings in RUN/sampling.json, which sample.py and watch.py use
    unless told otherwise. Returns the run directory; a conversion of the same file is reused."""
    out = out or os.path.join("runs", f"official-{preset}")
    path = os.path.join(out, runs.CHECKPOINT)
    if os.path.isfile(path) and load_checkpoint(path).get("source") == os.path.abspath(checkpoint):
        print(f"reusing the conversion in {out}")
    else:
        model = load_official_tokenbridge(checkpoint, preset)
        os.makedirs(out, exist_ok=True)
        runs.atomic_save({"config": model.config.to_dict(), "model": model.state_dict(), "step": 0,
                          "source": os.path.abspath(checkpoint)}, path)
        print(f"converted {checkpoint} -> {path} ({model.num_params() / 1e6:.1f}M parameters)")
    if preset in RELEASED_SAMPLING:
        settings = {**RELEASED_SAMPLING[preset], "source": "the official README"}
        runs.write_json(settings, os.path.join(out, SAMPLING_FILE))
    if vae is not None:
        channels = tb.TokenBridgeConfig.preset(preset).channels
        load_ldm_vae(vae, latent_channels=channels).save_pretrained(os.path.join(out, runs.VAE_DIR))
        print(f"converted {vae} -> {os.path.join(out, runs.VAE_DIR)}")
    return out


def download_official(preset, vae=None, out=None):
    """Fetch the released checkpoint of preset, and kl16 unless vae is a local file, into the
    Hugging Face cache by their published names, then import_official them into out."""
    if preset not in RELEASED_SIZES:
        raise ValueError(f"no released TokenBridge checkpoint is named {preset!r} "
                         f"(published: {', '.join(RELEASED_SIZES)})")
    fix = f"pass --official PATH --preset {preset} --vae KL16_PATH"
    filename = released_checkpoint(preset, list_released_files(fix), fix)
    checkpoint = fetch_released(dict(repo_id=TOKENBRIDGE_REPO, filename=filename), fix)
    if vae is None:  # both files before any conversion: a failed download costs no conversion
        vae = fetch_released(RELEASED_KL16, f"pass --vae PATH (with --download {preset})")
    return import_official(checkpoint, preset, vae, out)


def list_released_files(fix):
    """The files of the official Hugging Face repository; a failure (offline, no client) is one
    ValueError saying where to look and fix."""
    try:
        from huggingface_hub import list_repo_files  # only downloading needs the hub client
        return list_repo_files(TOKENBRIDGE_REPO)
    except Exception as e:  # the hub client's exception classes differ between its versions
        raise ValueError(f"could not list {TOKENBRIDGE_REPO} ({type(e).__name__}); download the "
                         f"checkpoint from https://huggingface.co/{TOKENBRIDGE_REPO}/tree/main by "
                         f"hand and {fix}") from e


def released_checkpoint(size, files, fix):
    """The one checkpoint file among `files` whose path names `size` as a word (such as
    tokenbridge_large/checkpoint-last.pth); none or several is one ValueError listing them."""
    def names_size(path):
        return re.search(rf"(^|[^a-z]){size}([^a-z]|$)", path.lower()) is not None
    found = [f for f in files if f.endswith(CHECKPOINT_SUFFIXES) and names_size(f)]
    if len(found) == 1:
        return found[0]
    what = (f"several checkpoints name {size!r}: {', '.join(found)}" if found else
            f"no checkpoint names {size!r} (it holds: {', '.join(files) or 'nothing'})")
    raise ValueError(f"in {TOKENBRIDGE_REPO}, {what}; download the one you want by hand and "
                     f"{fix}")


def fetch_released(entry, fix):
    """One released file (an entry of the tables above) -> its local path: from the Hugging Face
    hub into its cache, or from a plain URL into torch's hub folder, each fetched once. Any
    failure is one ValueError: the file, where to get it by hand, and fix."""
    repo_id, filename = entry.get("repo_id"), entry["filename"]
    url = entry.get("url") or f"https://huggingface.co/{repo_id}/resolve/main/{filename}"
    try:
        if repo_id:
            from huggingface_hub import hf_hub_download  # only this step needs the hub client
            return hf_hub_download(repo_id, filename)
        return _download(url, filename)
    # Offline, no such repo or file, HTTP or storage errors, no client: one remedy for all, and
    # the hub client's exception classes differ between its versions.
    except Exception as e:
        listing = f" (files: https://huggingface.co/{repo_id}/tree/main)" if repo_id else ""
        raise ValueError(f"could not download {filename} ({type(e).__name__}); download {url} "
                         f"by hand{listing} and {fix}") from e


def _download(url, filename):
    path = os.path.join(torch.hub.get_dir(), "tokenbridge", filename)
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.hub.download_url_to_file(url, path)  # a temp file renamed once complete
    return path

