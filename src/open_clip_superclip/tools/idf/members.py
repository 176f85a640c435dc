"""What the tar reader yields: runs of members, named by webdataset's rules (sample key, extension)."""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, List, Optional, Tuple

_META_RE = re.compile(r"__[^/]*__($|/)")


def split_member_name(name: str) -> Optional[Tuple[str, str]]:
    """webdataset's (sample key, lower-case extension) of a member name; None for names it skips."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot <= slash + 1 or (name[:2] == "__" and _META_RE.match(name)):
        return None
    return name[:dot], name[dot + 1 :].lower()


@dataclasses.dataclass
class TarRun:
    """Consecutive regular members of a tar stream (those with a sample key), in order."""

    datas: List[bytes]  # data of the wanted members (of every member when nothing is asked for)
    wanted: List[bool]  # per member
    new_key: List[bool]  # per member: its key differs from the previous member's (entry 0: unknown here)
    first_key: str
    last_key: str
    names: Callable[[], List[str]]  # member names, computed on demand (errors, iter_tar_members)

    @classmethod
    def one(cls, name: str, key: str, data: Optional[bytes]) -> "TarRun":
        return cls([] if data is None else [data], [data is not None], [True], key, key, lambda: [name])
