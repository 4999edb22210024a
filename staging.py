"""Write a new file or folder aside, then put it in place without replacing anything.

    folder = staging_folder(target, "merging")   # a new empty folder beside target, this process's own
    ... write into it; check what was written ...
    place(folder, target)                         # FileExistsError if something took target meanwhile

Used by the merge, the GGUF export and the saved 4-bit copy. The staging name is unique to the
process, so two runs aimed at the same target never write into (or delete) each other's files, and
a folder of the user's that happens to look like a staging name is never touched. What a step
writes gets the permissions the user's umask gives (Python's temporary files, and safetensors,
create them readable by their owner only, which a server running as another user cannot read).
Everything here is standard library: importing it costs nothing.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def user_umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; it is put back at once
    os.umask(mask)
    return mask


def staging_folder(target: Path, purpose: str) -> Path:
    """A new, empty folder beside `target`, named after it and unique to this process.

    Creating it is also the check that the user may write there: it fails (OSError) before any work.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.{purpose}-", dir=target.parent))
    os.chmod(folder, 0o777 & ~user_umask())
    return folder


def staging_file(target: Path, purpose: str) -> Path:
    """A new, empty file beside `target`, named after it and unique to this process."""
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.{purpose}-", dir=target.parent)
    os.close(handle)
    os.chmod(name, 0o666 & ~user_umask())
    return Path(name)


def publish_permissions(path: Path) -> None:
    """Files and folders under `path` (and `path` itself) as the umask leaves new ones."""
    mask = user_umask()
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not item.is_symlink():
            os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)


def place(staging: Path, target: Path) -> None:
    """Move `staging` to `target`, which must not exist (or, for a folder, be an empty folder).

    Raises FileExistsError, with `staging` left as it is, when something is already at `target`,
    even something that appeared while the staging copy was written.
    """
    if staging.is_dir():
        try:
            os.rename(staging, target)  # replaces an empty folder; fails on anything else
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise FileExistsError(errno.EEXIST, "already exists", str(target)) from None
            raise
        return
    try:
        os.link(staging, target)  # never replaces: fails if target exists
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, "already exists", str(target)) from None
    except OSError:  # a file system without hard links: check, then rename (a narrow race remains)
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, "already exists", str(target)) from None
        os.rename(staging, target)
        return
    os.unlink(staging)


def discard(staging: Path) -> None:
    """Remove a staging file or folder (nothing else ever reaches here)."""
    if staging.is_dir() and not staging.is_symlink():
        shutil.rmtree(staging, ignore_errors=True)
    else:
        try:
            staging.unlink()
        except FileNotFoundError:
            pass
