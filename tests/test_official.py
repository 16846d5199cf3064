"""Interop with the released weights, against numbers produced by the official code itself
(tests/data/*_reference.pt) and its state-dict key lists."""
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import tokenbridge as tb
from lib import official

DATA = Path(__file__).parent / "data"


def shapes_of(name):
    """The state-dict key -> shape list of one released model (official_state_dict_shapes.json)."""
    return json.loads((DATA / "official_state_dict_shapes.json").read_text())[name]["shapes"]


@pytest.fixture(scope="module")
def official_model():
    ref = torch.load(DATA / "official_tiny_reference.pt", weights_only=True)
    model = official.from_official_state_dict(ref["state_dict"], official.official_config("tiny"))
    return model, ref["reference"]


def test_official_model_reproduces_features_and_logits(official_model):
    model, ref = official_model
    mask = ref["mask"].bool()
    z = model.backbone(ref["official_dequantized"], mask, ref["labels"])
    z_uncond = model.backbone(ref["official_dequantized"], mask, torch.full_like(ref["labels"], 10))
    torch.testing.assert_close(z, ref["z"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(z_uncond, ref["z_uncond"], atol=1e-4, rtol=1e-4)
    targets = ref["official_indices"][mask][:, ref["channel_order"]]
    logits = model.head(model.head.project(z[mask]), targets[:, :-1])
    torch.testing.assert_close(logits, ref["teacher_forced_logits"], atol=1e-4, rtol=1e-4)


def test_official_model_reproduces_greedy_tokens_with_the_slot0_quirk(official_model):
    model, ref = official_model
    cond = model.head.project(ref["z"][ref["mask"].bool()])
    tokens, _ = model._sample_channels(cond, torch.rand(len(cond), 16), temperature=0)
    assert torch.equal(tokens[:, model.quantizer.order], ref["greedy_tokens_generation_order"])
    model.head.slot0_quirk = False   # without the quirk the official weights give other tokens
    try:
        plain, _ = model._sample_channels(cond, torch.rand(len(cond), 16), temperature=0)
    finally:
        model.head.slot0_quirk = True
    assert not torch.equal(plain, tokens)


def test_official_quantizer_mode(official_model):
    model, ref = official_model
    tokens = tb.patchify(ref["latents"])
    assert torch.equal(model.quantizer.quantize(tokens), ref["official_indices"])   # nearest centre
    torch.testing.assert_close(model.quantizer.dequantize(ref["official_indices"]),
                               ref["official_dequantized"], atol=1e-4, rtol=1e-5)
    bins = official.use_official_range(tb.GaussianQuantizer(64, assign="bins")).quantize(tokens)
    differ = (bins != ref["official_indices"]).float().mean().item()
    assert differ < 0.02                  # bin lookup and nearest centre disagree rarely
    assert torch.equal(model.quantizer.order, ref["channel_order"])


@pytest.mark.parametrize("name, preset", [("tokenbridge_large", "large"),
                                          ("tokenbridge_huge", "huge"),
                                          ("tokenbridge_small_bench", "bench-s")])
def test_official_keys_map_one_to_one(name, preset):
    shapes = shapes_of(name)
    cfg = official.official_config(preset)
    mapping = official.official_key_mapping(cfg)
    assert set(mapping) == set(shapes) - set(official._DERIVED)
    with torch.device("meta"):
        ours = tb.TokenBridge(cfg).state_dict()
    assert {k for k, _ in mapping.values()} == {k for k in ours if not k.startswith("quantizer.")}
    for key, (target, index) in mapping.items():
        expected = ours[target].shape if index is None else ours[target].shape[1:]
        assert math.prod(shapes[key]) == math.prod(expected), key
        assert list(expected) == shapes[key][-len(expected):], key


def test_kl16_keys_map_one_to_one():
    from diffusers import AutoencoderKL
    shapes = shapes_of("mar_kl16_vae")
    with torch.device("meta"):
        ours = AutoencoderKL(**official.ldm_vae_config()).state_dict()
    renames = official.ldm_module_renames(5, 2)
    mapped = {}
    for key, shape in shapes.items():
        module, _, param = key.rpartition(".")
        mapped[f"{renames[module]}.{param}"] = shape
    assert set(mapped) == set(ours)
    for key, shape in mapped.items():
        assert math.prod(shape) == ours[key].numel(), key
        assert list(ours[key].shape) == shape[:ours[key].dim()], key


def test_ldm_vae_converter_reproduces_the_reference():
    ref = torch.load(DATA / "ldm_vae_tiny_reference.pt", weights_only=True)
    c = ref["reference"]["ldm_config"]
    vae = official.from_ldm_state_dict(ref["model"], ch=c["ch"], ch_mult=c["ch_mult"],
                                      embed_dim=c["embed_dim"], num_res_blocks=c["num_res_blocks"],
                                      resolution=c["resolution"], attn_levels=(1,))
    want = ref["reference"]
    with torch.no_grad():
        posterior = vae.encode(want["images"]).latent_dist
        decoded = vae.decode(want["latent_mean"]).sample
    torch.testing.assert_close(posterior.mean, want["latent_mean"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(posterior.logvar, want["latent_logvar"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(decoded, want["decoded_from_mean"], atol=1e-4, rtol=1e-4)


# --- bad input ---------------------------------------------------------------------------------

def test_checkpoint_of_another_size_names_the_key_and_shapes():
    ref = torch.load(DATA / "official_tiny_reference.pt", weights_only=True)
    bigger = official.official_config("bench-s", buffer_size=4)
    message = r"'fake_latent' has shape \(1, 64\) but the model expects \(1, 256\)"
    with pytest.raises(ValueError, match=message):
        official.from_official_state_dict(ref["state_dict"], bigger)


def test_checkpoint_of_another_architecture_is_refused():
    ref = torch.load(DATA / "official_tiny_reference.pt", weights_only=True)
    state = dict(ref["state_dict"], **{"diffloss.net.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected key 'diffloss.net.weight'"):
        official.from_official_state_dict(state, official.official_config("tiny"))
    del state["diffloss.net.weight"], state["channel_heads.3.bias"]
    with pytest.raises(ValueError, match="lacks 'channel_heads.3.bias'"):
        official.from_official_state_dict(state, official.official_config("tiny"))


def test_truncated_file_is_refused(tmp_path):
    path = tmp_path / "checkpoint-last.pth"
    path.write_bytes((DATA / "official_tiny_reference.pt").read_bytes()[:10_000])
    message = "is not a torch checkpoint .*truncated.* is the file complete"
    with pytest.raises(ValueError, match=message):
        official.load_official_tokenbridge(path, "tiny")
    with pytest.raises(ValueError, match="no torch checkpoint at"):
        official.load_official_tokenbridge(tmp_path / "missing.pth", "tiny")


def test_official_checkpoint_file_with_namespace_and_ema(tmp_path):
    import argparse
    ref = torch.load(DATA / "official_tiny_reference.pt", weights_only=True)
    ema = {k: v + 1 if k == "mask_token" else v for k, v in ref["state_dict"].items()}
    torch.save({"model": ref["state_dict"], "model_ema": ema, "args": argparse.Namespace(model="x"),
                "epoch": 3}, tmp_path / "checkpoint-last.pth")
    model = official.load_official_tokenbridge(tmp_path / "checkpoint-last.pth", "tiny")
    # the EMA weights are preferred
    torch.testing.assert_close(model.backbone.mask_token, ema["mask_token"])


def test_vae_with_other_latent_channels_is_refused(tmp_path):
    ref = torch.load(DATA / "ldm_vae_tiny_reference.pt", weights_only=True)
    torch.save({"model": ref["model"]}, tmp_path / "kl.ckpt")
    with pytest.raises(ValueError, match="has 16 latent channels but the model expects 4"):
        official.load_ldm_vae(tmp_path / "kl.ckpt", latent_channels=4)
    torch.save({"model": {"foo": torch.zeros(1)}}, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match="not an LDM/MAR VAE checkpoint"):
        official.load_ldm_vae(tmp_path / "bad.ckpt")


def test_ldm_config_is_read_off_the_keys():
    ref = torch.load(DATA / "ldm_vae_tiny_reference.pt", weights_only=True)
    tiny = official.ldm_config_from_state_dict(ref["model"])
    assert tiny == dict(ch=32, num_res_blocks=2, embed_dim=16, ch_mult=(1, 2), attn_levels=(1,))
    shapes = shapes_of("mar_kl16_vae")
    meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    kl16 = official.ldm_config_from_state_dict(meta)
    assert kl16 == dict(ch=128, num_res_blocks=2, embed_dim=16, ch_mult=(1, 1, 2, 2, 4),
                        attn_levels=(4,))


def test_released_weights_sample_and_export_from_the_command_line(tmp_path):
    """sample.py / export.py --official CKPT --vae kl.ckpt: converted to a run folder, then used."""
    import argparse

    import export
    import sample
    ref = torch.load(DATA / "official_tiny_reference.pt", weights_only=True)
    torch.save({"model_ema": ref["state_dict"], "args": argparse.Namespace(model="tiny")},
               tmp_path / "ckpt.pth")
    vae = torch.load(DATA / "ldm_vae_tiny_reference.pt", weights_only=True)
    torch.save({"model": vae["model"]}, tmp_path / "kl.ckpt")
    run = tmp_path / "run"
    args = sample.get_parser().parse_args(
        ["--official", str(tmp_path / "ckpt.pth"), "--preset", "tiny",
         "--vae", str(tmp_path / "kl.ckpt"), "--run-dir", str(run), "--num-images", "2",
         "--num-iter", "2", "--out", str(tmp_path / "grid.png")])
    tokens = sample.main(args)
    assert tokens.shape == (2, 64, 16) and (tmp_path / "grid.png").is_file()
    saved = torch.load(run / "checkpoint.pt", weights_only=True)
    assert saved["config"]["official_compat"] and (run / "vae" / "config.json").is_file()
    export.main(export.get_parser().parse_args(
        ["--official", str(tmp_path / "ckpt.pth"), "--preset", "tiny", "--run-dir", str(run)]))
    assert (run / "onnx" / "head_step.onnx").is_file()
    assert (run / "onnx" / "vae_decoder.onnx").is_file()


def test_a_converted_run_samples_with_the_released_settings(tmp_path, monkeypatch, capsys):
    """interop writes the released cfg, temperature and steps beside the converted weights, and
    sample.py without sampling flags uses them: the tokens of the same flags given by hand."""
    import argparse

    import sample
    released = dict(cfg=2.5, temperature=0.9, num_iter=3)
    monkeypatch.setitem(official.RELEASED_SAMPLING, "tiny", released)
    ref = torch.load(DATA / "official_tiny_reference.pt", weights_only=True)
    torch.save({"model_ema": ref["state_dict"], "args": argparse.Namespace(model="tiny")},
               tmp_path / "ckpt.pth")
    run = official.import_official(tmp_path / "ckpt.pth", "tiny", out=str(tmp_path / "run"))
    assert json.loads((tmp_path / "run" / "sampling.json").read_text()).items() >= released.items()

    def tokens(*flags):
        return sample.main(sample.get_parser().parse_args(
            ["--run-dir", run, "--num-images", "2", "--out", "", *flags]))
    by_default = tokens()
    assert "sampling as" in capsys.readouterr().out
    by_hand = tokens("--cfg", "2.5", "--temperature", "0.9", "--num-iter", "3")
    assert np.array_equal(by_default, by_hand)
    assert not np.array_equal(by_default, tokens("--cfg", "1", "--num-iter", "3"))


def test_official_range_is_the_fixed_affine_map():
    q = official.use_official_range(tb.GaussianQuantizer(64, channels=2, assign="nearest"))
    x = torch.linspace(-6, 6, 999).unsqueeze(-1).expand(-1, 2)
    u = ((x + 5) / 10 * 6 - 3).clamp(-3, 3)                           # the official formula
    expected = (u.unsqueeze(-1) - q.centers).abs().argmin(-1)
    differ = q.quantize(x) != expected
    midpoints = (q.centers[1:] + q.centers[:-1]) / 2           # only float near-ties may differ
    to_tie = (u[differ].unsqueeze(-1) - midpoints).abs().min(-1).values
    assert differ.sum() <= 4 and (to_tie < 1e-5).all()


# --- download by the published names (the hub client is replaced: nothing touches the network) --

@pytest.fixture
def hub(monkeypatch, tmp_path):
    """hub(files, fail=()): the official repo lists the names of files {filename: local path},
    hf_hub_download answers from them and raises the exception given for a filename in fail
    ("list": for the listing); the real client stays offline in a tmp cache."""
    import huggingface_hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    calls = []

    def install(files, fail=None):
        fail = fail or {}

        def listing(repo_id, **kwargs):
            assert repo_id == official.TOKENBRIDGE_REPO
            if "list" in fail:
                raise fail["list"]
            return list(files)

        def fake(repo_id, filename, **kwargs):
            calls.append((repo_id, filename))
            if filename in fail:
                raise fail[filename]
            return str(files[filename])
        monkeypatch.setattr(huggingface_hub, "list_repo_files", listing)
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
        return calls
    return install


# Listings of the official repository in the layouts a release may have: the one its README
# implies (a folder per size), a flat one, and two that must be refused.
README_LAYOUT = [".gitattributes", "README.md", "tokenbridge/tokenbridge_large/checkpoint-last.pth",
                 "tokenbridge/tokenbridge_huge/checkpoint-last.pth"]
FLAT_LAYOUT = ["README.md", "tokenbridge-huge.pth", "tokenbridge-large.pth", "kl16.ckpt"]


@pytest.mark.parametrize("files", [README_LAYOUT, FLAT_LAYOUT], ids=["folders", "flat"])
def test_the_released_checkpoint_of_a_size_is_found_by_listing(files):
    for size in official.RELEASED_SIZES:
        found = official.released_checkpoint(size, files, "FIX")
        assert size in found and found.endswith(".pth") and found in files


@pytest.mark.parametrize("files,message", [
    (["README.md", "tokenbridge_large/checkpoint-last.pth"],
     "no checkpoint names 'huge' (it holds: README.md, tokenbridge_large/checkpoint-last.pth)"),
    (["huge/checkpoint-last.pth", "huge/checkpoint-best.pth"],
     "several checkpoints name 'huge': huge/checkpoint-last.pth, huge/checkpoint-best.pth")])
def test_no_or_several_matching_checkpoints_are_one_line_listing_them(files, message):
    with pytest.raises(ValueError) as info:
        official.released_checkpoint("huge", files, "pass --official PATH")
    text = str(info.value)
    assert message in text and text.endswith("by hand and pass --official PATH")
    assert "\n" not in text


def test_download_converts_the_fetched_files_into_a_loadable_run(hub, monkeypatch, tmp_path):
    import argparse

    from lib import runs
    ref = torch.load(DATA / "official_tiny_reference.pt", weights_only=True)
    torch.save({"model_ema": ref["state_dict"], "args": argparse.Namespace(model="tiny")},
               tmp_path / "checkpoint-last.pth")
    vae = torch.load(DATA / "ldm_vae_tiny_reference.pt", weights_only=True)
    torch.save({"model": vae["model"]}, tmp_path / "kl16-source.ckpt")
    monkeypatch.setattr(official, "RELEASED_SIZES", ("tiny",))
    calls = hub({"README.md": None, "tiny/checkpoint-last.pth": tmp_path / "checkpoint-last.pth"})
    fetched = []
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch-hub"))

    def download(url, path):
        fetched.append(url)
        shutil.copy(tmp_path / "kl16-source.ckpt", path)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    for _ in range(2):  # the second time from the caches
        run = official.download_official("tiny", out=str(tmp_path / "run"))
    assert calls == [(official.TOKENBRIDGE_REPO, "tiny/checkpoint-last.pth")] * 2
    assert fetched == [official.RELEASED_KL16["url"]]
    model, ckpt = runs.load_run(run)
    assert ckpt["config"]["official_compat"] and runs.has_vae(run)
    torch.testing.assert_close(model.backbone.mask_token, ref["state_dict"]["mask_token"])


@pytest.mark.parametrize("error", ["LocalEntryNotFoundError", "EntryNotFoundError",
                                   "ConnectionError"])
def test_download_failure_says_what_to_fetch_by_hand(hub, error):
    """Offline (what the hub client raises then), no such file, no network at all."""
    import huggingface_hub.errors
    exc = ConnectionError if error == "ConnectionError" else getattr(huggingface_hub.errors, error)
    ckpt = README_LAYOUT[2]
    hub(dict.fromkeys(README_LAYOUT), fail={ckpt: exc("offline")})
    with pytest.raises(ValueError) as info:
        official.download_official("large", vae="kl16.ckpt")
    message = str(info.value)
    assert "\n" not in message and f"could not download {ckpt} ({error})" in message
    assert f"https://huggingface.co/Epiphqny/TokenBridge/resolve/main/{ckpt}" in message
    assert "--official PATH --preset large" in message


def test_a_repository_that_cannot_be_listed_says_where_to_look(hub):
    hub({}, fail={"list": ConnectionError("offline")})
    with pytest.raises(ValueError, match=r"^could not list Epiphqny/TokenBridge "
                                         r"\(ConnectionError\); download the checkpoint from "
                                         r"https://huggingface.co/Epiphqny/TokenBridge/tree/main "
                                         r"by hand and pass --official PATH --preset large "
                                         r"--vae KL16_PATH$"):
        official.download_official("large")


def test_kl16_download_failure_points_to_mars_link(hub, tmp_path, monkeypatch):
    import urllib.error

    def offline(url, path):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch-hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    hub({"tokenbridge_huge/checkpoint-last.pth": tmp_path / "unused.pth"})
    with pytest.raises(ValueError, match=r"could not download kl16\.ckpt \(URLError\); download "
                                         r"https://www\.dropbox\.com/.*kl16\.ckpt.* by hand and "
                                         r"pass --vae PATH \(with --download huge\)$"):
        official.download_official("huge")


def test_download_of_an_unpublished_name_is_refused(hub):
    calls = hub({})
    with pytest.raises(ValueError, match=r"no released TokenBridge checkpoint is named 'medium' "
                                         r"\(published: large, huge\)"):
        official.download_official("medium")
    assert calls == []


# --- the inverse converters (tools/rehearse.py writes official-format files with them) ---------

def test_official_state_dict_round_trips(perturb):
    ref = torch.load(DATA / "official_tiny_reference.pt", weights_only=True)["state_dict"]
    model = official.from_official_state_dict(ref, official.official_config("tiny"))
    back = official.to_official_state_dict(model)
    assert set(back) == set(ref)
    for key, value in ref.items():   # the derived tables are recomputed: float rounding only
        assert back[key].shape == value.shape, key
        atol = 1e-5 if key in official._DERIVED else 0
        torch.testing.assert_close(back[key], value, rtol=0, atol=atol)
    model = official.from_official_state_dict(ref, official.official_config("tiny"))
    perturb(model)
    again = official.from_official_state_dict(official.to_official_state_dict(model), model.config)
    ours, theirs = model.state_dict(), again.state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("name, preset", [("tokenbridge_large", "large"),
                                          ("tokenbridge_huge", "huge")])
def test_official_state_dict_has_the_official_keys_and_shapes(name, preset):
    shapes = shapes_of(name)
    with torch.device("meta"):
        state = official.to_official_state_dict(tb.TokenBridge(official.official_config(preset)))
    assert {k: list(v.shape) for k, v in state.items()} == shapes


def test_ldm_state_dict_round_trips(perturb):
    from diffusers import AutoencoderKL
    ref = torch.load(DATA / "ldm_vae_tiny_reference.pt", weights_only=True)
    config = official.ldm_config_from_state_dict(ref["model"])
    back = official.to_ldm_state_dict(official.from_ldm_state_dict(ref["model"], **config))
    assert set(back) == set(ref["model"])
    assert all(torch.equal(back[k], ref["model"][k]) for k in back)
    small = official.ldm_vae_config(ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, resolution=32,
                                   attn_levels=(2,))
    vae = perturb(AutoencoderKL(**small))
    ldm = official.to_ldm_state_dict(vae)
    config = official.ldm_config_from_state_dict(ldm)
    again = official.from_ldm_state_dict(ldm, **config).state_dict()
    assert set(again) == set(vae.state_dict())
    assert all(torch.equal(again[k], v) for k, v in vae.state_dict().items())


def test_ldm_state_dict_has_kl16s_keys_and_shapes():
    from diffusers import AutoencoderKL
    shapes = shapes_of("mar_kl16_vae")
    with torch.device("meta"):
        ldm = official.to_ldm_state_dict(AutoencoderKL(**official.ldm_vae_config()))
    assert {k: list(v.shape) for k, v in ldm.items()} == shapes
