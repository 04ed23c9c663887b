"""Recovery: a checkpoint path left without a readable ``config.json`` by a killed save gets the
newest complete checkpoint that save left beside it.

:func:`recover_checkpoint`: when ``path`` has no readable ``config.json``, the newest (by config
``step``, then modification time) complete sibling ``<name>.tmp-*`` / ``<name>.old-*`` not owned by
a running writer is used, with a warning: moved to ``path`` if ``path`` is absent, read where it
lies otherwise. Complete means that it passes every check of :func:`verify_checkpoint`. With the
swap's guarantee (:mod:`fastddpm.checkpoint.swap`) this means that a read of a path that once held
a checkpoint always finds a complete one, even after a fallback swap killed between its two renames.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

from .swap import fsync_dir, temporaries, writer_running
from .validate import CONFIG, CheckpointError, verify_checkpoint


def recover_checkpoint(path: str) -> Optional[str]:
    """The newest complete temporary sibling of ``path`` (left by a writer killed mid-swap) that no
    running writer owns, moved to ``path`` when ``path`` does not exist; returns the folder that
    holds it now, or None when there is none. Warns when it recovers one."""
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    complete = []
    for temp in temporaries(parent, name):
        if writer_running(temp, name):
            continue
        try:
            step = verify_checkpoint(temp).get("step", 0)
        except CheckpointError:
            continue  # unfinished, or half deleted
        complete.append((step, os.path.getmtime(os.path.join(temp, CONFIG)), temp))
    if not complete:
        return None
    step, _, best = max(complete)
    found = best
    if not os.path.lexists(path):
        try:
            os.rename(best, path)
            fsync_dir(parent)
            found = path
        except FileNotFoundError:  # another reader moved it there first
            found = path
        except OSError:  # e.g. a read-only folder: read it where it lies
            pass
    warnings.warn(f"checkpoint: {path!r} held no readable checkpoint (a save was interrupted); "
                  f"using the complete checkpoint of step {step} from {os.path.basename(best)!r}"
                  + (" (moved into place)" if found == path else ""), RuntimeWarning, stacklevel=3)
    return found
