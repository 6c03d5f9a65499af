"""Fixtures of the study tests: where the committed results, specs and scripts of each study lie.

The tests under ``experiments/`` check the record (every figure a study README quotes rebuilds from its committed
result files, and the study's scripts compute what they claim). They run with the product's tests
(``python -m pytest``) and skip what needs the BackdoorLLM data when ``../shared/data/backdoorllm`` is absent.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parent
ROOT = EXPERIMENTS.parent
SHARED_DATA = ROOT.parent / "shared" / "data" / "backdoorllm"


class _Folders:
    """``RESULTS / "backdoorllm-cpu"``: the one study folder of that name (``experiments/<study>/<kind>/<name>``)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __truediv__(self, name: str) -> Path:
        found = sorted(EXPERIMENTS.glob(f"*/{self.kind}/{name}"))
        if len(found) != 1:
            raise FileNotFoundError(f"{len(found)} study folders hold {self.kind}/{name}: {found}")
        return found[0]

    def glob(self, pattern: str) -> list[Path]:
        return sorted(EXPERIMENTS.glob(f"*/{self.kind}/{pattern}"))


RESULTS = _Folders("results")
SPECS = _Folders("specs")


def load_script(name: str):
    """A study's script (``experiments/<study>/scripts/<name>.py``, not a package), imported by file path. Registered in
    sys.modules first: dataclasses look their module up there."""
    path = _Folders("scripts") / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# the product tests' fixtures (tiny models built in the test session), for the scripts' tests
from tests.conftest import _seed, records, tiny, tiny_dir  # noqa: E402,F401
