"""Several processes, one run: what torchrun / accelerate launch need from the rest of the pipeline.

    torchrun --nproc_per_node 2 main.py ...                                   # data parallel (DDP)
    accelerate launch --config_file accelerate/ddp.yaml main.py ...           # the same through accelerate
    accelerate launch --config_file accelerate/fsdp_qlora.yaml main.py ...    # 4-bit weights sharded (FSDP)

Each process trains on its share of the rows of every step; the launchers say which process this is
through environment variables (WORLD_SIZE, RANK, LOCAL_RANK, LOCAL_WORLD_SIZE). The rules kept here:

- one decision for all: anything a process measures for itself (free GPU memory, a stop signal, peak
  memory) is agreed over all processes before it is used, so no two processes act differently;
- one writer: the main process (rank 0) writes every file and prints every line; the Trainer writes
  its checkpoints as it always does (the model from rank 0, each process its own RNG state);
- nothing here runs at import time, and in a plain one-process run every function is a no-op.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

# How long a process waits in a collective for the others before giving up: the Trainer's own
# default (TrainingArguments.ddp_timeout), so that the process group made here behaves like its own.
COLLECTIVE_TIMEOUT_S = 1800


def world_size() -> int:
    """Processes in this run (WORLD_SIZE, set by torchrun and accelerate launch); 1 for `python main.py`."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_world_size() -> int:
    """Processes of this run on this machine."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size())))


def is_main_process() -> bool:
    """The process that writes files and prints: rank 0 of all machines."""
    return rank() == 0


def fsdp_enabled() -> bool:
    """Launched with an accelerate config whose distributed_type is FSDP (accelerate sets this variable)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def start(on_gpu: bool) -> None:
    """Join the other processes (NCCL between GPUs, gloo between CPU processes) before anything is agreed.

    accelerate's PartialState is what the Trainer itself uses: it sets this process's GPU
    (LOCAL_RANK) and opens the process group, which the Trainer later reuses as it is.
    """
    if world_size() == 1 or distributed():
        return
    from accelerate import PartialState

    PartialState(cpu=not on_gpu, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))


def quiet_other_processes() -> None:
    """Only the main process prints: the others' stdout, progress bars, warnings and library logs go
    nowhere, so each line appears once. Their errors still reach stderr."""
    if is_main_process():
        return
    import logging
    import warnings

    sys.stdout = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 -- for the life of the process
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _reduce(value: float, op_name: str, device: str) -> float:
    if not distributed():
        return value
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op_name))
    return float(tensor.item())


def min_over_processes(value: float, device: str = "cpu") -> float:
    """The smallest of every process's value (e.g. free GPU memory: the plan must fit every GPU).
    `device` is where the collective runs: this process's GPU under NCCL, "cpu" under gloo."""
    return _reduce(value, "MIN", device)


def max_over_processes(value: float, device: str = "cpu") -> float:
    return _reduce(value, "MAX", device)


def collective_device(on_gpu: bool) -> str:
    """NCCL only moves GPU tensors, gloo CPU ones."""
    if not on_gpu:
        return "cpu"
    import torch

    return f"cuda:{torch.cuda.current_device()}"


def barrier() -> None:
    if distributed():
        import torch.distributed as dist

        dist.barrier()


def on_main_process(fn, *args, **kwargs):
    """Run fn in the main process only (e.g. deleting an old run's files, writing the adapter) and hand
    its result -- or its exception -- to every process, so that they all go on, or all stop, together."""
    if not distributed():
        return fn(*args, **kwargs)
    import torch.distributed as dist

    outcome = [None]
    if is_main_process():
        try:
            outcome[0] = ("ok", fn(*args, **kwargs))
        except Exception as exc:  # noqa: BLE001 -- re-raised below, in every process
            outcome[0] = ("error", exc)
    dist.broadcast_object_list(outcome, src=0)
    status, value = outcome[0]
    if status == "error":
        raise value
    return value


def finish() -> None:
    """Leave the process group (its end is local to each process), so no library warns at exit."""
    if distributed():
        import torch.distributed as dist

        dist.destroy_process_group()


def describe() -> str:
    """One line for the log: how many processes and of which kind."""
    if world_size() == 1:
        return "1 process"
    kind = "FSDP (4-bit weights sharded over the processes)" if fsdp_enabled() else "DDP (each process holds the whole model)"
    return f"{world_size()} processes ({local_world_size()} on this machine), {kind}"
