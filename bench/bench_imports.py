"""Start-up costs, measured side by side in fresh interpreters (medians of interleaved runs).

1. `import open_clip` with the plugin installed vs `OPEN_CLIP_DISABLE_PLUGINS=1` (goal: at most +50 ms);
2. `superclip --help` and `superclip COMMAND --help` for every command (goal: under 1 s each);
3. `import open_clip_superclip` and `import open_clip_superclip.loss` (what a user of the core pays).
"""
import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from open_clip_superclip.tools.cli import SUBCOMMANDS  # noqa: E402

SUPERCLIP = str(Path(sys.executable).parent / "superclip")


def _wall(argv, env) -> float:
    start = time.perf_counter()
    subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def interleaved(candidates: dict, repeats: int) -> dict:
    """{name: median seconds}: one run of each candidate per round, so machine noise hits them alike."""
    times = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, (argv, env) in candidates.items():
            times[name].append(_wall(argv, env))
    return {name: statistics.median(values) for name, values in times.items()}


PLUGIN_LOAD = ("import open_clip, time, _open_clip_superclip_bootstrap as b\n"
               "t = time.perf_counter(); b.install(); print(time.perf_counter() - t)")


def plugin_load_seconds(env, repeats: int) -> float:
    """What the plugin adds, timed inside fresh interpreters started with plugins off: loading it after
    `import open_clip` (the entry-point scan, our configs, the patches). Free of the start-up's own noise."""
    runs = [float(subprocess.run([sys.executable, "-c", PLUGIN_LOAD], env=env, capture_output=True, text=True,
                                 check=True).stdout) for _ in range(repeats)]
    return statistics.median(runs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    on = {k: v for k, v in os.environ.items() if k != "OPEN_CLIP_DISABLE_PLUGINS"}
    off = {**on, "OPEN_CLIP_DISABLE_PLUGINS": "1"}
    python = sys.executable
    imports = interleaved({
        "import open_clip (plugin off)": ([python, "-c", "import open_clip"], off),
        "import open_clip (plugin on)": ([python, "-c", "import open_clip"], on),
        "python -c pass": ([python, "-c", "pass"], on),
        "import open_clip_superclip": ([python, "-c", "import open_clip_superclip"], on),
        "import open_clip_superclip.loss": ([python, "-c", "import open_clip_superclip.loss"], on),
    }, args.repeats)
    print(f"## start-up, medians of {args.repeats} interleaved runs (s)\n")
    for name, seconds in imports.items():
        print(f"{name:<42} {seconds:7.3f}")
    extra = imports["import open_clip (plugin on)"] - imports["import open_clip (plugin off)"]
    print(f"{'the plugin adds to import open_clip':<42} {1000 * extra:+7.0f} ms (goal <= +50 ms)")
    inside = plugin_load_seconds(off, args.repeats)
    print(f"{'  the same, timed in process':<42} {1000 * inside:+7.0f} ms\n")
    helps = interleaved({f"superclip {name} --help".replace("  ", " "): ([SUPERCLIP, *([name] if name else []),
                                                                         "--help"], on)
                         for name in ("", *SUBCOMMANDS)}, max(3, args.repeats // 3))
    for name, seconds in helps.items():
        print(f"{name:<42} {seconds:7.3f}{'' if seconds < 1 else '  (over 1 s)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
