"""Writing a dataset folder without losing anyone's files: a non-empty target is refused unless overwriting was
asked for, and everything is written into a hidden staging folder beside the target and moved into place at the end.

- The target does not exist or is empty: the staging folder is renamed onto it in one step, so an interrupted export
  leaves no target at all, only a hidden ``.<name>.partial-*`` folder (removed when the export fails with an
  exception; left behind when the process is killed).
- ``overwrite=True`` and the target holds files: the staged files replace their namesakes one by one (each
  ``os.replace`` is atomic), files the export does not write are kept, and the index files (the split lists and
  annotation files a loader opens first) are moved last, so an interruption leaves the old index or the new one,
  never an index that lists files not yet in place.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_output_folder(owner: str, root: Path, overwrite: bool) -> None:
    """Raise if ``root`` cannot be written: a file (or a path through a file), or a non-empty folder without
    ``overwrite``.  Messages start with ``owner: `` unless ``owner`` is empty."""
    prefix = f"{owner}: " if owner else ""
    for p in (root, *root.parents):
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                what = "is a file" if p == root else f"lies inside {p}, which is a file"
                raise NotADirectoryError(f"{prefix}the output folder {root} {what}, not a folder")
            break
    if root.is_dir() and any(root.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{prefix}the output folder {root} is not empty; choose a new or empty folder, or pass "
            "overwrite=True (--overwrite on the command line) to replace the files the export writes"
        )


@contextlib.contextmanager
def staged_output(
    owner: str, root: str | os.PathLike, *, overwrite: bool, is_index: Callable[[Path], bool]
) -> Iterator[Path]:
    """Yields the staging folder to write into; on leaving without an exception moves it into ``root``.

    ``is_index(relative_path)`` marks the files moved last when merging into a non-empty folder."""
    root = Path(os.path.abspath(root))
    if root.is_symlink():
        root = root.resolve()  # write into the folder the link names, not over the link
    check_output_folder(owner, root, overwrite)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    try:
        os.chmod(staging, 0o777 & ~_umask())
        yield staging
        check_output_folder(owner, root, overwrite)  # the target may have changed while we wrote
        if not root.exists() or (root.is_dir() and not any(root.iterdir())):
            os.replace(staging, root)  # a rename onto an empty folder replaces it in one step
            return
        files = sorted(
            (p for p in staging.rglob("*") if not p.is_dir()), key=lambda p: is_index(p.relative_to(staging))
        )
        for src in files:  # every destination is checked before anything is moved
            relative = src.relative_to(staging)
            for i in range(1, len(relative.parts) + 1):
                dst = root.joinpath(*relative.parts[:i])
                last = i == len(relative.parts)
                if dst.is_dir() if last else (dst.exists() and not dst.is_dir()):
                    what = "folder" if last else "file"
                    raise FileExistsError(f"{owner}: {dst} is a {what} in the way of the export's {root / relative}")
        for src in files:
            dst = root / src.relative_to(staging)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
