"""Shared by the test files: the project root on the import path, random weights, the digits'
feature network (trained once per session), a small model with its image folder and VAE, and
random Inception weights."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import tokenbridge as tb  # noqa: E402
import train  # noqa: E402
from lib import data  # noqa: E402
from tools import evaluate  # noqa: E402


@pytest.fixture(scope="session")
def perturb():
    """perturb(module, scale=0.05, seed=1): random weights everywhere (zero-initialised adaLN and
    biases too), so every input of a freshly built model matters."""
    def perturb_(module, scale=0.05, seed=1):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in module.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g))
        return module
    return perturb_


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread is as fast, and spinning thread pools are slow on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """(net, info, cache path): lib/digit_metrics.py's feature net at its default recipe,
    trained into a tmp cache."""
    from lib import digit_metrics
    cache = tmp_path_factory.mktemp("quality") / "features.pt"
    net, info = digit_metrics.load_feature_net(cache)
    return net, info, cache


# A model small enough that a training step takes milliseconds (16px images -> 4x4 x 4 channels).
SMALL_CFG = dict(image_size=16, vae_stride=4, channels=4, levels=16, num_classes=2, buffer_size=2,
                 encoder_width=32, encoder_depth=1, encoder_heads=2,
                 decoder_width=32, decoder_depth=1, decoder_heads=2,
                 head_width=32, head_depth=1, head_heads=2)


@pytest.fixture(scope="session")
def fake_data(tmp_path_factory):
    """40 images in 2 class folders (20 each): red squares and blue discs, varied in size and
    position, plus one corrupt file and one text file that must be skipped."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for k, name in enumerate(["disc", "square"]):
        (root / name).mkdir()
        for i in range(20):
            img = np.zeros((24, 20, 3), np.uint8)
            c, r = rng.integers(6, 14, size=2), rng.integers(3, 6)
            yy, xx = np.mgrid[:24, :20]
            shape = ((yy - c[0]) ** 2 + (xx - c[1]) ** 2 <= r * r) if k == 0 else \
                (abs(yy - c[0]) <= r) & (abs(xx - c[1]) <= r)
            img[shape] = (40, 80, 230) if k == 0 else (230, 50, 40)
            Image.fromarray(img).save(root / name / f"{i:02d}.png")
    (root / "disc" / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "square" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="session")
def small_cfg():
    return tb.TokenBridgeConfig(**SMALL_CFG)


@pytest.fixture(scope="session")
def vae_dir(fake_data, tmp_path_factory, small_cfg):
    """A small AutoencoderKL trained for a few steps on the fake data, as a diffusers folder."""
    images, _, _, _ = data.load_folder(fake_data, small_cfg.image_size)
    torch.manual_seed(0)
    vae = data.build_small_vae(small_cfg.vae_stride, small_cfg.channels, width=8)
    vae = data.train_vae(vae, images, steps=5, batch=8, lr=1e-3, kl_weight=1e-3, seed=0,
                          device=torch.device("cpu"))
    path = tmp_path_factory.mktemp("vae") / "vae"
    vae.save_pretrained(path)
    return path


def run_argv(run_dir, data, vae, *extra):
    """Fast run-level flags; the small model itself comes from the small_model fixture."""
    return ["--data", str(data), "--vae", str(vae), "--out", str(run_dir), "--image-size", "16",
            "--num-classes", "2", "--levels", "16", "--val-size", "4", "--batch", "8",
            "--steps", "6", "--warmup-epochs", "0.5", "--save-every", "2", "--num-iter", "4",
            "--threads", "1", "--head-positions", "4", "--device", "cpu", "--workers", "1", *extra]


@pytest.fixture
def small_model(monkeypatch, small_cfg):
    """Make train.py build SMALL_CFG (plus the ablation flags) instead of a named preset."""
    def build_config(args):
        ablations = {"levels": args.levels, "head": args.head, "order": args.order}
        over = {k: v for k, v in ablations.items() if v}
        return tb.TokenBridgeConfig(**{**SMALL_CFG, **over})
    monkeypatch.setattr(train, "build_config", build_config)


@pytest.fixture(scope="session")
def random_inception(tmp_path_factory):
    """A state dict of torch-fidelity's InceptionV3 with random weights (He-initialised convs,
    so the features are O(1)), saved where --inception-weights can point."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe
    path = tmp_path_factory.mktemp("inception") / "random.pth"
    torch.save({}, path)
    with pytest.MonkeyPatch.context() as m:   # build the architecture without loading weights
        m.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        net = fe.FeatureExtractorInceptionV3(evaluate.INCEPTION_NAME, evaluate.INCEPTION_FEATURES,
                                             feature_extractor_weights_path=str(path))
    g = torch.Generator().manual_seed(0)
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu", generator=g)
    torch.nn.init.normal_(net.fc.weight, std=0.2, generator=g)
    torch.save(net.state_dict(), path)
    return str(path)
