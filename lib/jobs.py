"""Sampling jobs of any size: batches shared between torchrun's processes, each seeded on its own,
with a progress bar, kept as they finish (a killed job resumes), under a lock (one writer). Imports
no torch: sample.py runs ONNX without it."""
import contextlib
import json
import os
import time

import numpy as np

from lib.files import write_atomic


def process_slot():
    """(rank, world, local rank) under torchrun, (0, 1, 0) otherwise."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def check_launcher(parent):
    """Under torchrun, stop when the launcher that started this process (pid `parent`) is gone.
    torchrun starts each worker in a session of its own, so killing the launcher (a scheduler's
    time limit, kill -9 of its process group) would otherwise leave the ranks running, writing
    beside the next launch."""
    if "TORCHELASTIC_RUN_ID" in os.environ and os.getppid() != parent:
        raise SystemExit(f"error: the torchrun launcher (pid {parent}) is gone; this rank stops")


@contextlib.contextmanager
def exclusive(path, what):
    """Hold an exclusive lock on PATH.lock while the block runs, so one process at a time writes
    `what`. A second writer stops with one line naming the holder's pid. The kernel releases
    the lock of a process that dies, so a lock left by a killed process is simply taken over.
    (Where fcntl does not exist, on Windows, nothing is locked.)"""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(f"{path}.lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise ValueError(f"{what} is being written by another process (pid {holder}); "
                             "wait for it to finish, or stop it") from None
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        yield


class Parts:
    """Finished batches of a sampling job, one .npz each in a folder, written atomically, so a
    re-run skips them and a crash loses at most the batch in flight. settings.json names what
    they were sampled with: a folder from other settings is refused, never mixed in.

    Used as a context manager: rank 0 holds the folder's lock (one job at a time writes it) and
    writes settings.json; the other ranks read it (no two processes write one file)."""

    def __init__(self, folder, settings):
        self.folder = folder
        self.settings = settings
        self._held = contextlib.ExitStack()

    def __enter__(self):
        os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, "settings.json")
        if process_slot()[0] == 0:
            self._held.enter_context(exclusive(os.path.join(self.folder, "job"),
                                               f"the sampling job in {self.folder}"))
            if not os.path.isfile(path):
                write_atomic(path, lambda f: f.write(json.dumps(self.settings, indent=1).encode()))
        while not os.path.isfile(path):  # rank 0 writes it at once
            time.sleep(0.2)
        with open(path) as f:
            found = json.load(f)
        if found != self.settings:
            self._held.close()
            changed = sorted(k for k in self.settings if found.get(k) != self.settings[k])
            raise ValueError(f"{self.folder} holds batches sampled with other settings "
                             f"({', '.join(changed)}); delete it, or write to another --npz")
        return self

    def __exit__(self, *exc):
        self._held.close()

    def path(self, b):
        return os.path.join(self.folder, f"batch_{b:06d}.npz")

    def done(self, b):
        return os.path.isfile(self.path(b))

    def write(self, b, tokens, images, labels):
        write_atomic(self.path(b),
                     lambda f: np.savez(f, tokens=tokens, images=images, labels=labels))

    def read(self, b):
        with np.load(self.path(b)) as part:
            return part["tokens"], part["images"], part["labels"]


def batch_seed(seed, b):
    """Batch b draws from numpy.random.default_rng((seed, b)): its samples do not depend on the
    batch size of the others, on how processes share the batches, or on a re-run."""
    return (seed, b)


def sample_in_batches(sample, labels, batch_size, seed, parts=None):
    """Sample `labels` in batches: sample(labels, seed) -> (tokens, images). Batch b goes to rank
    b % world, with a progress bar in images; finished batches go to `parts` when given (a re-run
    skips them). On rank 0, once every batch is done, returns the batches in order as
    (tokens, images, labels), read back from `parts` one at a time when given (a job of any
    size is never held whole); None on the other ranks."""
    # this rank's batches, and those of them a previous run finished
    rank, world, _ = process_slot()
    launcher = os.getppid()
    starts = range(0, len(labels), batch_size)
    sizes = [min(batch_size, len(labels) - start) for start in starts]
    mine = [b for b in range(len(starts)) if b % world == rank]
    skipped = [b for b in mine if parts is not None and parts.done(b)]

    # sample the rest
    bar = _progress_bar(total=sum(sizes[b] for b in mine), initial=sum(sizes[b] for b in skipped),
                        unit="img", dynamic_ncols=True,
                        desc="sample" if world == 1 else f"sample (rank {rank})",
                        disable=len(starts) == 1)
    kept = []
    for b in (b for b in mine if b not in skipped):
        check_launcher(launcher)
        batch_labels = labels[starts[b]:starts[b] + sizes[b]]
        tokens, images = sample(batch_labels, batch_seed(seed, b))
        if parts is None:
            kept.append((tokens, images, batch_labels))
        else:
            parts.write(b, tokens, images, batch_labels)
        bar.update(sizes[b])
    bar.close()

    # rank 0 returns every batch, in order
    if rank != 0:
        return None
    if parts is None:
        return kept
    wait_for(parts, len(starts))
    return (parts.read(b) for b in range(len(starts)))


def _progress_bar(**kwargs):
    """tqdm's bar when tqdm is installed (the deployment itself needs only numpy, onnxruntime
    and Pillow)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return type("NoBar", (), {"update": lambda self, n: None, "close": lambda self: None})()
    return tqdm(**kwargs)


def wait_for(parts, count, poll_s=2.0):
    """Rank 0 waits for the other ranks' batches (torchrun stops every rank if one fails)."""
    while not all(parts.done(b) for b in range(count)):
        time.sleep(poll_s)
