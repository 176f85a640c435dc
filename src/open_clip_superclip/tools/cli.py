"""The ``superclip`` command: one subcommand per tool, each a module's ``main(argv) -> int`` imported lazily."""
import importlib
import sys

SUBCOMMANDS = {
    "idf": ("open_clip_superclip.tools.idf.command", "main", "count caption-token document frequencies (IDF) over data"),
    "cooccur": ("open_clip_superclip.tools.cooccur", "main", "keyword co-occurrence tables over captions"),
    "benchmark": ("open_clip_superclip.tools.benchmark", "main", "run a CLIP Benchmark suite over checkpoints"),
    "make-wds": ("open_clip_superclip.tools.make_wds", "main", "images + labels/captions -> clip_benchmark wds"),
    "export": ("open_clip_superclip.tools.checkpoints", "export_main", "SuperCLIP checkpoint -> stock open_clip folder"),
    "convert-official": ("open_clip_superclip.tools.checkpoints", "convert_official_main",
                         "import a checkpoint of the official hustvl/SuperCLIP code"),
    "words": ("open_clip_superclip.tools.words", "main", "word-image similarity ranking (paper A.4)"),
    "flops": ("open_clip_superclip.tools.flops", "main", "FLOPs per component (paper Table 5)"),
    "demo-data": ("open_clip_superclip.tools.demo.emoji_data", "main", "build the OpenMoji demo dataset"),
    "clipart-data": ("open_clip_superclip.tools.demo.clipart_data", "main",
                     "build the Open Clip Art data set (short and long captions)"),
    "demo": ("open_clip_superclip.tools.demo.app", "main", "train CLIP and SuperCLIP on the demo data and report"),
}


def _usage() -> str:
    lines = ["usage: superclip COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<17} {help_text}" for name, (_, _, help_text) in SUBCOMMANDS.items()]
    lines += ["", "`superclip COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] not in SUBCOMMANDS:
        print(f"superclip: unknown command {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, function_name, _ = SUBCOMMANDS[argv[0]]
    return getattr(importlib.import_module(module_name), function_name)(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
