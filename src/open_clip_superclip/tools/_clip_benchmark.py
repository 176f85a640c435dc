"""How the tools call CLIP Benchmark's `clip_benchmark eval` (shared by `superclip benchmark` and the demo)."""
import shutil
import sys
from pathlib import Path


def literal_braces(text) -> str:
    """clip_benchmark str.formats --output and --dataset_root: a path's own braces must stay literal."""
    return str(text).replace("{", "{{").replace("}", "}}")


def clip_benchmark_bin() -> str:
    """The console script next to this interpreter (what `clip_benchmark` runs in this venv), else on PATH."""
    path = Path(sys.executable).parent / "clip_benchmark"
    if path.is_file():
        return str(path)
    found = shutil.which("clip_benchmark")
    if not found:
        raise FileNotFoundError(f"the clip_benchmark command is not installed (looked in {path.parent} and PATH): "
                                f"pip install clip_benchmark==1.6.2")
    return found


def eval_argv(model: str, pretrained, datasets, dataset_root, task: str, output, *, batch_size: int = 256,
              num_workers: int = 0, recall_k=(1, 5, 10), no_amp: bool = False, extra=()) -> list:
    """`clip_benchmark eval` arguments; `dataset_root` and `output` may hold clip_benchmark's {dataset} and
    {pretrained} fields (passed through) while everything else in them is literal."""
    pretrained = [pretrained] if isinstance(pretrained, (str, Path)) else list(pretrained)
    datasets = [datasets] if isinstance(datasets, str) else list(datasets)
    argv = ["--model", model, "--pretrained", *map(str, pretrained), "--dataset", *datasets,
            "--dataset_root", str(dataset_root), "--task", task, "--output", str(output),
            "--batch_size", str(batch_size), "--num_workers", str(num_workers), *extra]
    if task == "zeroshot_retrieval":
        argv += ["--recall_k", *map(str, recall_k)]
    return argv + (["--no_amp"] if no_amp else [])
