"""Tests of the latent cache at ImageNet scale (train.py --data; lib/data.py start_build,
fill_cache, finish_build): ranks share the encoding, a killed build resumes, one writer at a time, a
key
that notices a changed image, a cache shared by runs through --latents (kept, or moved, on
--resume).

Tiny: 37 files of 32 px (one broken) in 3 class folders, a small random VAE (the tiny preset's
stride 4 and 16 channels), 4 images per VAE call. Run: pytest tests/test_cache.py
"""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import tokenbridge as tb  # noqa: E402
import train  # noqa: E402
from lib import data, resume  # noqa: E402

CONFIG = tb.TokenBridgeConfig.preset("tiny")
IMAGES = 37                                                    # 36 images and broken.png
ENCODE_BATCH = 4                                               # 10 batches, the last of 1 image


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 class folders of 12 random 40x36 images, and a file that does not decode."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for k in range(3):
        (root / f"class{k}").mkdir()
        for i in range(12):
            pixels = rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class{k}" / f"{i:02d}.png")
    (root / "class1" / "broken.png").write_bytes(b"\x89PNG not really")
    return root


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vae") / "vae"
    data.build_small_vae(CONFIG.vae_stride, CONFIG.channels, width=8).save_pretrained(path)
    return path


def cache_argv(folder, vae_dir, out, *extra):
    return ["--data", str(folder), "--vae", str(vae_dir), "--out", str(out), "--preset", "tiny",
            "--encode-batch", str(ENCODE_BATCH), "--workers", "0", *extra]


def cache_args(*argv):
    """train.py's flags as train() resolves them, from cache_argv's arguments."""
    return train.resolve_flags(train.get_parser().parse_args(cache_argv(*argv)))


@pytest.fixture
def build(folder, vae_dir, monkeypatch):
    """build(out, *flags, data=folder): train.py's cache step alone, in this process on 1 thread
    (as each rank of the torchrun test). Returns (cache, images encoded)."""
    encoded = []

    def counted(vae, images, flip, *rest):
        encoded.extend([len(images)] if not flip else [])
        return real(vae, images, flip, *rest)
    real = data.posterior_moments
    monkeypatch.setattr(data, "posterior_moments", counted)

    def build_(out, *extra, data_dir=folder):
        encoded.clear()
        args = cache_args(data_dir, vae_dir, out, *extra)
        images, labels, _, _ = data.load_folder(data_dir, CONFIG.image_size)
        vae = data.open_vae(vae_dir, CONFIG.vae_stride, CONFIG.channels)
        Path(out).mkdir(parents=True, exist_ok=True)                        # train() makes it first
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            cache = train.prepare_latents(args, CONFIG, vae, images, labels, torch.device("cpu"),
                                          {"world": 1, "rank": 0, "local_world": 1})
        finally:
            torch.set_num_threads(threads)
        return cache, sum(encoded)
    return build_


# --- several ranks, and a build whose launcher is killed -----------------------------------------

CACHE_SCRIPT = """
import os, sys, time, torch
sys.path.insert(0, {root!r})
import torch.distributed as dist
import train, tokenbridge as tb
from lib import data
from lib.distributed import setup_distributed
torch.set_num_threads(1)
rank, encode = os.environ["RANK"], data.posterior_moments
open({pids!r} + rank, "w").write(str(os.getpid()))

def counted(vae, images, flip, *rest):  # every image encoded, counted; slowed when asked
    if not flip:
        with open({counts!r} + rank, "a") as f:
            f.write(f"{{len(images)}}\\n")
        time.sleep({delay!r})
    return encode(vae, images, flip, *rest)

data.posterior_moments = counted
args = train.resolve_flags(train.get_parser().parse_args(sys.argv[1:]))
dist_info, device = setup_distributed("cpu")
images, labels, _, _ = data.load_folder(args.data, {image_size!r})
vae = data.open_vae(args.vae, {stride!r}, {channels!r})
config = tb.TokenBridgeConfig.preset("tiny")
train.prepare_latents(args, config, vae, images, labels, device, dist_info)
dist.destroy_process_group()
"""


def torchrun(tmp_path, argv, delay=0.0):
    """train.py's cache step on 2 CPU ranks: (launcher, pid file prefix, count file prefix)."""
    script = tmp_path / f"cache_main_{delay}.py"
    pids, counts = tmp_path / f"pid{delay}_", tmp_path / f"count{delay}_"
    script.write_text(CACHE_SCRIPT.format(root=str(ROOT), pids=str(pids), counts=str(counts),
                                          delay=delay, image_size=CONFIG.image_size,
                                          stride=CONFIG.vae_stride, channels=CONFIG.channels))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 "--nproc_per_node", "2", str(script), *argv], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return launcher, pids, counts


def running(pid):
    """True while pid is a live process (not gone, not a zombie waiting to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def recorded_rows(prefix):
    """Rows that the progress records of a build say are on disk."""
    records = prefix.parent.glob(prefix.name + ".progress.*")
    lines = [line.split() for path in records for line in path.read_text().splitlines()]
    return sum(int(stop) - int(start) for start, stop, *_ in lines)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_2_rank_build_resumes_to_the_bytes_of_1_process(tmp_path, folder, vae_dir, build):
    """torchrun, 2 ranks: its launcher SIGKILLed half-way, the ranks stop by themselves (they
    poll for it between batches); a new launch encodes only the rows not recorded; the cache is
    byte for byte the one a single process builds straight through."""
    prefix = tmp_path / "shared" / "latents"                             # --latents: a file prefix
    argv = cache_argv(folder, vae_dir, tmp_path / "run", "--latents", str(prefix))
    launcher, pids, counts = torchrun(tmp_path, argv, delay=0.5)
    deadline = time.time() + 60
    while recorded_rows(prefix) < 2 * ENCODE_BATCH and time.time() < deadline:  # 2 batches on disk
        if launcher.poll() is not None:
            pytest.fail(launcher.communicate()[0][-3000:])
        time.sleep(0.05)
    launcher.kill()
    launcher.wait()
    ranks = [int(Path(f"{pids}{r}").read_text()) for r in range(2)]
    while any(map(running, ranks)) and time.time() < deadline:
        time.sleep(0.1)
    alive = [pid for pid in ranks if running(pid)]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive, "a rank kept encoding after its launcher was killed"
    out, done = launcher.stdout.read(), recorded_rows(prefix)  # the ranks held the pipe open
    assert 2 * ENCODE_BATCH <= done < IMAGES and data.open_cache(prefix) is None, out[-3000:]

    launcher, _, counts = torchrun(tmp_path, argv)                       # resumes, 2 ranks again
    out, _ = launcher.communicate(timeout=120)
    assert launcher.returncode == 0, out[-3000:]
    encoded = [sum(map(int, Path(f"{counts}{r}").read_text().split())) for r in range(2)]
    assert sum(encoded) == IMAGES - done and min(encoded) > 0, (encoded, done)
    assert f"resuming the build of {prefix}.npy: {done} of {IMAGES} images done" in out

    reference, count = build(tmp_path / "one")                           # 1 process, no stop
    assert count == IMAGES
    npy = data.cache_paths(prefix)[0]
    assert npy.read_bytes() == data.cache_paths(tmp_path / "one")[0].read_bytes()
    shared = data.open_cache(prefix)
    assert torch.equal(shared.labels, reference.labels)
    assert shared.unreadable.tolist() == reference.unreadable.tolist() == [24]       # broken.png
    left = sorted(p.name for p in prefix.parent.iterdir())
    assert left == ["latents.lock", "latents.meta.pt", "latents.npy"]                # no records
    assert not (tmp_path / "run" / "latents.npy").exists()


# --- one process ---------------------------------------------------------------------------------

def test_an_interrupted_build_resumes_and_needs_disk_only_for_the_missing_rows(tmp_path, build,
                                                                                monkeypatch):
    straight, _ = build(tmp_path / "straight")
    encode, calls = data.posterior_moments, []

    def dies_in_batch_4(*a):
        calls.append(1)
        if len(calls) == 2 * 4:                                          # 2 flips per batch
            raise RuntimeError("killed while encoding")
        return encode(*a)
    monkeypatch.setattr(data, "posterior_moments", dies_in_batch_4)
    with pytest.raises(RuntimeError, match="killed"):
        build(tmp_path / "run")
    monkeypatch.setattr(data, "posterior_moments", encode)
    npy = data.cache_paths(tmp_path / "run")[0]
    assert data.open_cache(tmp_path / "run") is None
    assert recorded_rows(tmp_path / "run" / "latents") == 12

    size, written = npy.stat().st_size, npy.stat().st_blocks * 512     # sparse: 3 batches on disk
    assert written < size / 2
    usage = type(shutil.disk_usage(tmp_path))
    monkeypatch.setattr(data.shutil, "disk_usage", lambda path: usage(0, 0, size - written))
    with pytest.raises(ValueError, match="needs 0.0 GB more and .* has 0.0 GB free"):
        build(tmp_path / "fresh")                                        # a new build needs it all
    cache, count = build(tmp_path / "run")                               # the missing rows fit
    assert count == IMAGES - 12
    assert npy.read_bytes() == data.cache_paths(tmp_path / "straight")[0].read_bytes()
    assert torch.equal(cache.unreadable, straight.unreadable)


HOLDER = """
import sys, time
sys.path.insert(0, {root!r})
from lib import jobs
with jobs.exclusive({lock!r}, "the cache"):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_second_writer_is_refused_with_the_holders_pid_until_it_dies(tmp_path, build):
    lock = data.cache_file(tmp_path, "")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER.format(root=str(ROOT), lock=str(lock))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        refused = rf"latents.npy is being written by another process \(pid {holder.pid}\)"
        with pytest.raises(ValueError, match=refused):
            build(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    cache, count = build(tmp_path)                                       # a dead holder's lock
    assert count == IMAGES and cache.moments.shape == (IMAGES, 2, 2, 16, 8, 8)


def test_a_changed_image_changes_the_key_and_the_cache_is_rebuilt(tmp_path, folder, vae_dir, build):
    mine = tmp_path / "images"
    shutil.copytree(folder, mine)                                        # copy2: the same times

    def key(data_dir):
        images = data.load_folder(data_dir, CONFIG.image_size)[0]
        vae = data.open_vae(vae_dir, CONFIG.vae_stride, CONFIG.channels)
        flips = cache_args(data_dir, vae_dir, tmp_path).flips
        return data.latent_key(data_dir, images, vae, flips, CONFIG.image_size)
    first = key(mine)
    assert key(folder) == first                                          # no path in the key
    assert build(tmp_path / "run", data_dir=mine)[1] == IMAGES
    assert build(tmp_path / "run", data_dir=mine)[1] == 0                # the same key: no encoding
    image = mine / "class0" / "03.png"
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))     # touched
    touched = key(mine)
    image.write_bytes(image.read_bytes() + b"\0")                       # one byte longer, same time
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    longer = key(mine)
    assert first != touched and touched != longer and longer != first
    assert build(tmp_path / "run", data_dir=mine)[1] == IMAGES           # rebuilt in its run folder


def test_runs_share_a_cache_through_latents_and_another_key_is_refused(tmp_path, build):
    shared = tmp_path / "caches"
    shared.mkdir()                                                       # an existing folder
    first, count = build(tmp_path / "a", "--latents", str(shared))
    assert count == IMAGES
    second, count = build(tmp_path / "b", "--latents", str(shared))
    assert count == 0 and np.array_equal(second.moments, first.moments)
    assert not list((tmp_path / "a").iterdir()) and not list((tmp_path / "b").iterdir())
    with pytest.raises(ValueError, match=r"caches/latents.npy holds latents made with other flips"):
        build(tmp_path / "c", "--latents", str(shared), "--flips", "1")  # not rebuilt for one run
    assert build(tmp_path / "d", "--latents", str(shared))[1] == 0
    assert "latents" in resume.RUNTIME_KEYS                            # a resumed run may move it


def test_a_resumed_run_keeps_its_latents_or_moves_them(tmp_path, folder, vae_dir, monkeypatch):
    """--latents is a runtime flag: left out on --resume, the run's own; given, the cache moved."""
    small = {f"{part}_{size}": value for part in ("encoder", "decoder", "head")
             for size, value in (("width", 32), ("depth", 1), ("heads", 2))}
    config = tb.TokenBridgeConfig(num_classes=3, buffer_size=2, **small)  # tiny's latents
    monkeypatch.setattr(train, "build_config", lambda args: config)
    shared, run = tmp_path / "shared", tmp_path / "run"
    runtime = ["--stop-after", "1", "--num-iter", "2", "--threads", "1", "--device", "cpu"]
    first = ["--latents", str(shared), "--steps", "3", "--batch", "8", "--val-size", "4", *runtime]
    train.main(cache_args(folder, vae_dir, run, *first))
    monkeypatch.setattr(data, "posterior_moments", None)                 # no encoding from here on

    def resume(*extra):
        argv = ["--resume", str(run), *runtime, *extra]
        train.main(train.get_parser().parse_args(argv), train.given_flags(argv))
        return torch.load(run / "checkpoint.pt", weights_only=True)
    assert resume()["args"]["latents"] == str(shared)
    for path in tmp_path.glob("shared.*"):                               # a file prefix
        path.rename(tmp_path / path.name.replace("shared", "moved"))
    assert resume("--latents", str(tmp_path / "moved"))["step"] == 3
    assert not (run / "latents.npy").exists()
