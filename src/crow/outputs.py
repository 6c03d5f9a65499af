"""Writing outputs so that a failure never leaves a half-written result: directories and files are built under a
temporary name, then renamed into place with the permissions a plain ``open()`` / ``mkdir`` gives under the umask
(``mkdtemp``, ``mkstemp`` and safetensors' writer create 0700 / 0600, unreadable to other accounts)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import CrowError


def check_output_dir(out: str | os.PathLike, *, inputs: Iterable[str | os.PathLike | None] = (),
                     overwrite: bool = False) -> Path:
    """Validate an output directory before any work: not an input, not inside one, parent exists."""
    out = Path(out).expanduser().resolve()
    sources = [Path(source).expanduser() for source in inputs if source is not None]
    for src in (source.resolve() for source in sources if source.exists()):
        if out == src or (src.is_dir() and src in out.parents):
            raise CrowError(f"--out {out} is the input {src} or inside it; write the result to a new directory")
    if out.exists() and not out.is_dir():
        raise CrowError(f"--out {out} is an existing file; pass a directory path")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CrowError(f"--out {out} already exists and is not empty; choose a new path or pass --overwrite")
    if not out.parent.is_dir():
        raise CrowError(f"the parent of --out ({out.parent}) does not exist; create it first")
    return out


@contextlib.contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``out``; on success it replaces ``out``, on failure it is removed."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    mask = umask()  # the modes of a plain mkdir (0777) or open() (0666, 0777 where the owner may execute)
    for path in (tmp, *tmp.rglob("*")):
        if not path.is_symlink():  # symlinks are left alone
            os.chmod(path, (0o777 if path.is_dir() or path.stat().st_mode & 0o100 else 0o666) & ~mask)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def umask() -> int:
    """The process umask (read by setting a restrictive one for an instant and restoring it)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def write_json_atomic(path: str | os.PathLike, data: object) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        # the replaced file's mode, else what open() gives a new file (mkstemp creates 0600)
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def git_revision() -> str | None:
    """The git commit of crow's source tree, when it runs from a checkout."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return rev.stdout.strip() or None if rev.returncode == 0 else None


def crow_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("crow")
    except PackageNotFoundError:
        return "unknown"
