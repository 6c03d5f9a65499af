"""Download the BackdoorLLM subset ``crow bench`` uses from the CROW repository (which ships BackdoorLLM's data) at a
pinned commit; every file must have the sha256 of the copy this project ran on, else it is refused."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from types import MappingProxyType

from tqdm.auto import tqdm

from ..errors import CrowError
from ..outputs import sha256_file, staged_dir

# the files this project ran on: local path -> path in the repository at ``COMMIT`` and sha256 (package data)
_PINNED = json.loads(resources.files(__package__).joinpath("backdoorllm.json").read_text(encoding="utf-8"))
COMMIT = _PINNED["commit"]
BASE_URL = f"https://raw.githubusercontent.com/{_PINNED['repository']}/{COMMIT}"
MANIFEST = MappingProxyType({rel: (f["path"], f["sha256"]) for rel, f in _PINNED["files"].items()})


def plan(out: Path, base_url: str = BASE_URL, manifest=MANIFEST) -> list[tuple[str, str, str]]:
    """(local path, URL, sha256) of every manifest file that ``out`` lacks or holds with another hash."""
    return [(rel, f"{base_url.rstrip('/')}/{repo_path}", sha) for rel, (repo_path, sha) in sorted(manifest.items())
            if not (out / rel).is_file() or sha256_file(out / rel) != sha]


def fetch(out: str | Path, *, base_url: str = BASE_URL, progress: bool = True, timeout: float = 60.0) -> list[str]:
    """Download the missing files of :data:`MANIFEST` into ``out`` (all or nothing); returns their local paths."""
    out = Path(out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise CrowError(f"--out {out} is an existing file; pass a directory path")
    if not out.parent.is_dir():
        raise CrowError(f"the parent of --out ({out.parent}) does not exist; create it first")
    todo = plan(out, base_url, MANIFEST)
    if not todo:
        return []
    fresh = not out.exists()
    with staged_dir(out) if fresh else _scratch(out) as tmp, \
            tqdm(unit="B", unit_scale=True, disable=not progress, leave=False) as bar:
        for rel, url, sha in todo:
            bar.set_description(rel)
            _download(url, tmp / rel, sha, rel, bar, timeout)
        if not fresh:  # every file is complete: move each into place
            for rel, _, _ in todo:
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).replace(out / rel)
    return [rel for rel, _, _ in todo]


@contextlib.contextmanager
def _scratch(out: Path) -> Iterator[Path]:
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _download(url: str, dest: Path, sha: str, rel: str, bar, timeout: float) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as f:
            for chunk in iter(lambda: response.read(1 << 16), b""):
                f.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
    except urllib.error.HTTPError as e:
        raise CrowError(f"could not download {rel} from {url}: HTTP {e.code} {e.reason}; nothing was written") from e
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as e:
        reason = getattr(e, "reason", None) or e
        raise CrowError(f"could not download {rel} from {url} ({reason}); check that you are online (or pass "
                        "--base-url to a mirror) and rerun; nothing was written") from e
    if digest.hexdigest() != sha:
        raise CrowError(f"{rel} from {url} has sha256 {digest.hexdigest()[:16]}…, expected {sha[:16]}…: the file is "
                        "corrupted or changed and was refused; nothing was written. Rerun; report it if it persists")
