"""The process's open-files limit, raised as far as needed and allowed (stdlib only: the proxy uses it)."""

from __future__ import annotations

import resource


def raise_open_files(target: int) -> int | None:
    """Raise the soft RLIMIT_NOFILE towards `target`, at most to the hard limit, and return the
    soft limit after that (None when it is unlimited). A refused raise leaves it as it was."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    if soft < target:
        new = target if hard == resource.RLIM_INFINITY else min(target, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
    return int(soft)
