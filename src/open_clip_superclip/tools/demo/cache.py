"""The data builders' cache rule: a folder whose manifest has the same format, settings and versions is reused."""
import json
import sys
from pathlib import Path

from open_clip_superclip.atomic import is_nonempty_dir


def up_to_date_manifest(out: Path, format_version: int, settings: dict, versions: dict, force: bool, log):
    """The manifest of an up-to-date build at `out`, else None; refuses to replace a folder that is not a build."""
    if (out / "manifest.json").exists() and not force:
        try:
            old = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
        except ValueError:
            old = {}
        if (old.get("format"), old.get("settings"), old.get("versions")) == (format_version, settings, versions):
            log(f"{out}: up to date (its manifest has the same settings and versions); skipping the build")
            return {**old, "cached": True}
        log(f"{out}: the manifest has other settings or versions; rebuilding")
    elif is_nonempty_dir(out) and not force:
        raise FileExistsError(f"{out} is not empty and has no manifest.json; refusing to replace it (--force)")
    return None


def build_command(build, out, summarize) -> int:
    """The builders' command tail: build() (errors: exit 2 with the message), then the summary of a new build."""
    try:
        manifest = build()
    except (FileExistsError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not manifest.get("cached"):
        print(summarize(manifest, Path(out).absolute()))
    return 0
