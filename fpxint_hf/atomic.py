"""Folders that appear complete or not at all: the one helper behind ``save_pretrained``, ``fpxint quantize`` and
the evaluation assets.  Standard library only.

Build into ``fresh_dir(parent, prefix)`` (created like ``os.mkdir``, so with the umask's permissions), then
``replace_dir(tmp, target)``: one ``rename`` when nothing is at the target; otherwise the old folder is renamed
aside, the new one renamed into place (the old one is put back if that fails) and the old one deleted.  A crash
between the two renames leaves no folder at the target and the complete old one at ``.<name>.old-*``, never a
mixed one.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid

logger = logging.getLogger(__name__)


def fresh_dir(parent: str | os.PathLike[str], prefix: str) -> str:
    """A new empty folder ``parent/prefix<random>``, created with the default (umask) permissions."""
    for _ in range(100):
        path = os.path.join(os.fspath(parent), prefix + uuid.uuid4().hex[:12])
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary folder name {prefix}* in {parent}")


def replace_dir(new: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Move the complete folder ``new`` to ``target``, replacing what is there (see the module docstring)."""
    new, target = os.fspath(new), os.fspath(target)
    if not os.path.lexists(target):
        os.rename(new, target)
        return
    parent, name = os.path.split(target)
    old = fresh_dir(parent, f".{name}.old-")
    os.rmdir(old)  # a unique name, absent again for the rename
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)  # put the old folder back
        raise
    shutil.rmtree(old, ignore_errors=True)
    logger.debug("replaced %s atomically", target)
