"""Runs `training.main` with the given arguments and prints the process's peak CUDA memory at exit
(the stock trainer does not report it). Usage: torchrun --nproc_per_node 1 bench/peak_memory.py ARGS..."""
import atexit
import runpy
import sys

import torch


def _report():
    if torch.cuda.is_available():
        print(f"PEAK_CUDA_MEMORY_GIB {torch.cuda.max_memory_allocated() / 2**30:.3f}", flush=True)


atexit.register(_report)
sys.argv = ["training.main", *sys.argv[1:]]
runpy.run_module("training.main", run_name="__main__")
