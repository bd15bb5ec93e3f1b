"""Writing a run's files: what a failed write left is removed, and a full disk is a one-line error saying what to free."""

from __future__ import annotations

import contextlib
import errno
import shutil
from pathlib import Path

from sdlora.errors import UserError

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def writing(folder: Path, need: int, run_dir: Path, leftovers=()):
    """Around a save of about `need` bytes into `folder`: on failure what it half wrote (`leftovers`, or a function
    that lists them) is removed, and a full disk becomes a one-line UserError saying how much space to free."""
    try:
        yield
    except Exception as e:
        full = None if isinstance(e, UserError) else disk_full(e, folder, need, run_dir)  # before the clean-up frees
        for path in leftovers() if callable(leftovers) else leftovers:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if full is None:
            raise
        raise full from None


def disk_full(e: BaseException, folder: Path, need: int, run_dir: Path) -> UserError | None:
    """The UserError for `e` when a full disk (or quota) made writing into `folder` fail, else None. Python's writes
    say so by errno, safetensors' in its message; torch.save's say neither (a zip writer's "unexpected pos"), so a
    disk with less than `need` bytes free counts too."""
    chain, seen = [], e
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    full = any(isinstance(x, OSError) and x.errno in _DISK_FULL for x in chain) or any(
        s in str(x) for x in chain for s in ("No space left on device", "Disk quota exceeded", "(os error 28)",
                                              "(os error 122)"))
    if not full and need > 0:
        with contextlib.suppress(OSError):
            full = shutil.disk_usage(folder if folder.exists() else folder.parent).free < need
    if not full:
        return None
    size = f"{max(1, round(need / 1e6))} MB" if need < 1e9 else f"{need / 1e9:.1f} GB"
    return UserError(f"the disk is full: could not write {folder} (needs about {size} free)",
                     f"free some space, then resume: sdlora train --run-dir {run_dir} --resume")


def written_folder(e: BaseException) -> Path | None:
    """The folder of the file an OSError names, if it names one."""
    return Path(e.filename).parent if isinstance(e, OSError) and isinstance(e.filename, str) else None
