"""Processes, devices and threads of a training run: torchrun's world, its barrier, one log."""
import os

import torch
import torch.distributed as dist


def setup_distributed(device_arg):
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; a plain launch is a world of one."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(device_arg or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device_arg}: CUDA does not work here "
                         "(torch.cuda.is_available() is False); use --device cpu, or leave "
                         "--device out to use CUDA only when it works")
    if device.type == "cuda":
        device = torch.device("cuda", local if world > 1 else (device.index or 0))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        from datetime import timedelta  # rank 0 may train the VAE while the others wait
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(hours=6))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return {"world": world, "rank": rank, "local_world": local_world}, device


def barrier(dist_info):
    if dist_info["world"] > 1:
        dist.barrier()


def log(message, dist_info=None):
    if dist_info is None or dist_info["rank"] == 0:  # one log, not one per process
        print(message, flush=True)


def set_threads(requested, local_world):
    """All cores by default, shared between the processes of this machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(requested or max(1, cores // local_world))
