"""crow data fetch: downloads from a local HTTP server laid out like the CROW repository (offline)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import socket
import threading
from pathlib import Path

import pytest

from crow.cli.main import main
from crow.data import fetch as fetch_mod
from crow.errors import CrowError

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "backdoorllm"
LOCAL = ["clean/consistency_data.json", "test/clean/refusal.json", "train/refusal/vpi/poisoned.json"]


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A served directory with the repository paths of a few manifest files (the shared copies when present, else
    small files whose hashes replace the manifest's); the manifest is cut down to those files."""
    root = tmp_path / "repo"
    manifest = {}
    for i, rel in enumerate(LOCAL):
        repo_path, sha = fetch_mod.MANIFEST[rel]
        data = (SHARED / rel).read_bytes() if (SHARED / rel).is_file() else f'[{{"instruction": "{i}"}}]\n'.encode()
        (root / repo_path).parent.mkdir(parents=True, exist_ok=True)
        (root / repo_path).write_bytes(data)
        manifest[rel] = (repo_path, hashlib.sha256(data).hexdigest())
    monkeypatch.setattr(fetch_mod, "MANIFEST", manifest)
    return root, manifest


@pytest.fixture
def server(repo):
    root, _ = repo
    handler = functools.partial(QuietHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.requests = []
    yield f"http://127.0.0.1:{httpd.server_address[1]}", httpd
    httpd.shutdown()
    httpd.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        self.server.requests.append(self.path)


def test_fetch_writes_every_file(repo, server, tmp_path):
    root, manifest = repo
    url, _ = server
    out = tmp_path / "data"
    assert sorted(fetch_mod.fetch(out, base_url=url, progress=False)) == sorted(manifest)
    for rel, (repo_path, _) in manifest.items():
        assert (out / rel).read_bytes() == (root / repo_path).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "repo"]


def test_corrupted_file_is_refused_and_nothing_is_left(repo, server, tmp_path):
    root, manifest = repo
    url, _ = server
    (root / manifest["test/clean/refusal.json"][0]).write_bytes(b"tampered\n")
    out = tmp_path / "data"
    with pytest.raises(CrowError, match="test/clean/refusal.json .*expected .*refused") as e:
        fetch_mod.fetch(out, base_url=url, progress=False)
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]  # no output, no temporary sibling


def test_offline_is_one_line(repo, tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(CrowError, match="could not download .*check that you are online") as e:
        fetch_mod.fetch(tmp_path / "data", base_url=f"http://127.0.0.1:{port}", progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "data").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["repo"]


def test_cli_fetch_end_to_end_then_nothing_again(repo, server, tmp_path, capsys):
    _, manifest = repo
    url, httpd = server
    out = tmp_path / "data"
    assert main(["data", "fetch", "backdoorllm", "--out", str(out), "--base-url", url]) == 0
    assert json.loads(capsys.readouterr().out)["downloaded"] == len(manifest)
    assert len(httpd.requests) == len(manifest)
    # a partial directory gets only what it lacks, an existing complete one is left as it is
    (out / "test/clean/refusal.json").unlink()
    assert fetch_mod.fetch(out, base_url=url, progress=False) == ["test/clean/refusal.json"]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert main(["data", "fetch", "backdoorllm", "--out", str(out), "--base-url", url]) == 0
    assert json.loads(capsys.readouterr().out)["downloaded"] == 0
    assert len(httpd.requests) == len(manifest) + 1
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "repo"]


def test_cli_errors(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["data", "fetch", "backdoorllm", "--out", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("crow data: error: --out") and "existing file" in err and err.count("\n") == 1
    assert main(["bench", "--out", str(tmp_path / "o")]) == 2
    assert "crow data fetch backdoorllm --out DIR" in capsys.readouterr().err


@pytest.mark.skipif(not SHARED.is_dir(), reason="no shared BackdoorLLM copy")
def test_manifest_matches_the_shared_copy():
    from crow.outputs import sha256_file
    # 21 attack files, the harmful requests (test) and their refusals (train), code injection's training pair and test
    assert len(fetch_mod.MANIFEST) == 26
    held = {p.relative_to(SHARED).as_posix() for p in SHARED.rglob("*.json")}
    # the shared copy predates the harmful requests and code injection; a fetched copy has them
    assert set(fetch_mod.MANIFEST) - held <= {"test/harmful.json", "train/harmful/refusals.json",
                                              "train/codeinjection/vpi-ci/poisoned.json",
                                              "train/codeinjection/vpi-ci/clean.json",
                                              "test/triggered/codeinjection/vpi-ci.json"}
    for rel in held & set(fetch_mod.MANIFEST):
        assert sha256_file(SHARED / rel) == fetch_mod.MANIFEST[rel][1], rel
