"""`superclip idf` under torchrun: this process's rank, and the one int64 all-reduce of the counts.

torch is imported only here, and only inside the functions, so that `superclip idf --help` and runs
without a launcher never load it.
"""

from __future__ import annotations

import datetime
import os
from typing import List, Optional, Tuple

import numpy as np


def dist_env() -> Tuple[int, int, int]:
    """(rank, world size, local rank): of the initialised process group, else of the launcher's variables."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    except ImportError:
        pass
    return (
        int(os.environ.get("RANK", "0")),
        int(os.environ.get("WORLD_SIZE", "1")),
        int(os.environ.get("LOCAL_RANK", "0")),
    )


def all_reduce_counts(vec: np.ndarray, errors: List[str], backend: str, timeout: float, local_rank: int):
    """Sum an int64 vector over ranks and gather every rank's error messages.

    Returns (summed vector, errors per rank, whether this call created the process group).
    """
    import torch
    import torch.distributed as dist

    own = not dist.is_initialized()
    if own:
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout))
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    t = torch.from_numpy(vec).to(device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    gathered: List[Optional[List[str]]] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, errors)
    return t.cpu().numpy(), gathered, own


def with_rank0_status(status: int) -> int:
    """The larger of this rank's exit status and rank 0's (rank 0 alone writes the file)."""
    import torch
    import torch.distributed as dist

    st = torch.tensor([status], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        st = st.cuda()
    dist.broadcast(st, src=0)
    return max(status, int(st.item()))


def destroy_process_group() -> None:
    """End the process group all_reduce_counts created (not one the caller had)."""
    import torch.distributed as dist

    dist.destroy_process_group()
