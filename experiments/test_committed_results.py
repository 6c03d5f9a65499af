"""Every study's committed result folders: each cell file is a cell of the spec its report was made with."""

import json
from pathlib import Path

import numpy as np
import pytest

from crow import CrowError
from crow.bench.data import backdoorllm_cell
from crow.bench.runner import cell_keys, load_cell_data, plan, victim_key
from crow.bench.spec import load_spec
from crow.cli.main import main
from crow.data.records import Record, save_records

from conftest import RESULTS, SHARED_DATA, SPECS, load_script
from tests.conftest import make_records


SPEC_FILES = SPECS.glob("*.yaml")



@pytest.mark.parametrize("path", SPEC_FILES, ids=lambda p: p.name)
def test_shipped_specs_load_and_name_valid_defenses(path):
    spec = load_spec(path)
    cells = plan(spec)  # raises on an unknown defense or setting
    assert spec.suite == "backdoorllm" and spec.models in (["smollm2-135m-gguf"], ["gemma3-270m-gguf"])  # packaged
    columns = len(spec.defense_entries()) + len(spec.references)  # references (base) are cells too
    assert len(cells) == sum(map(len, spec.cells.values())) * columns * len(spec.seeds)



RESULT_DIRS = [p.parent for p in RESULTS.glob("*/results.json")]



@pytest.mark.parametrize("out", RESULT_DIRS, ids=lambda p: p.name)
def test_committed_cells_are_cells_of_their_spec(out):
    """Every committed cell file is a cell of the spec its report was made with, under the key the
    current code computes: a change to the keys would silently orphan the results (the next run would
    retrain every victim and rerun every cell), and a stray file would be left out of the report."""
    spec = load_spec(None, base=json.loads((out / "results.json").read_text())["spec"])
    if spec.suite == "backdoorllm" and not SHARED_DATA.is_dir():
        pytest.skip("shared BackdoorLLM data not present")
    data, expected = {}, {}
    for cell in plan(spec):
        where = (cell["task"], cell["attack"], cell["seed"])
        data.setdefault(where, load_cell_data(spec, SHARED_DATA, *where))
        vkey, ckey = cell_keys(spec, cell, data[where])
        expected[ckey] = (vkey, cell)
    files = sorted((out / "cells").glob("*.json"))
    assert files
    for path in files:
        assert path.stem in expected, f"{path} is not a cell of the spec in {out / 'results.json'}"
        row = json.loads(path.read_text())
        vkey, cell = expected[path.stem]
        assert (row["key"], row["victim_key"]) == (path.stem, vkey)
        assert (row["task"], row["attack"], row["defense"], row["seed"]) == (cell["task"], cell["attack"],
                                                                           cell["defense"], cell["seed"])

