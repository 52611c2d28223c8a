"""Accelerate, as hf_mdm's entry points build it.

`torchrun --nproc_per_node N` (or mpirun) on a machine without an accelerator starts N processes; Accelerate joins
them into one gloo job only when told `cpu=True` (which `ACCELERATE_USE_CPU=1` also does). Without it each process
believes it is a lone, main process, and N runs race for one output folder.
"""

import os

import torch


def cpu_only_multi_process() -> bool:
    """Several processes were launched (WORLD_SIZE > 1) and there is no accelerator to put them on."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available()


def make_accelerator(**kwargs):
    """`accelerate.Accelerator(**kwargs)`, joining a CPU-only multi-process launch into one job."""
    from accelerate import Accelerator

    if cpu_only_multi_process():
        kwargs.setdefault("cpu", True)
    return Accelerator(**kwargs)
