"""What the server has loaded must still be what is on disk: a dictionary saved again (`train --overwrite`) is
reloaded, an analysis rebuilt (`analyze --overwrite`) is reopened, and an analysis made from other weights than the
dictionary's present ones is never served (StaleAnalysisError, answered 409).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import FeaturelensError


class StaleAnalysisError(FeaturelensError):
    """The analysis was made from other weights than the dictionary now has (it was trained again)."""


def dir_signature(d: Path | None) -> tuple[Any, ...] | None:
    """Changes whenever a file directly in `d` is written: dictionaries are saved whole (new files, new inodes)."""
    if d is None:
        return None
    out = []
    try:
        with os.scandir(d) as it:
            for e in it:
                if e.is_file(follow_symlinks=True) and not e.name.startswith("."):
                    st = e.stat()
                    out.append((e.name, st.st_ino, st.st_size, st.st_mtime_ns))
    except OSError:
        return None
    return tuple(sorted(out))


def check_fresh(analysis: Any, dictionary: Any, fingerprint: str, ident: str) -> None:
    """Raise StaleAnalysisError when `analysis` records another dictionary fingerprint than `fingerprint` (the
    dictionary's weights now). An analysis that records none (made before fingerprints) is trusted."""
    recorded = analysis.meta.get("dictionary_fingerprint")
    if recorded is not None and recorded != fingerprint:
        raise StaleAnalysisError(
            f"the analysis of {ident!r} ({analysis.dir}) was made from other weights than the dictionary has now "
            f"(it was trained again since); run `featurelens analyze --overwrite {getattr(dictionary, 'source', '')}`"
            .rstrip() + " to rebuild its dashboards")


def fingerprint_of(dictionary: Any) -> str | None:
    """The dictionary's fingerprint, or None for what analyses are not made of (a transcoder set, a CLT)."""
    from ..dictionaries.protocol import Transcoders

    if isinstance(dictionary, Transcoders) or getattr(dictionary, "W_enc", None) is None:
        return None
    from ..dictionaries.compat import dictionary_fingerprint

    return dictionary_fingerprint(dictionary)
