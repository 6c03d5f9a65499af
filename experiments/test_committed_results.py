"""Every study's committed result folders: each cell file is a cell of the spec its report was made with."""

import json
import shlex

import pytest
from conftest import RESULTS, ROOT, SHARED_DATA, SPECS

from crow import CrowError
from crow.bench.keys import CellIndex, cell_keys, plan
from crow.bench.runner import load_cell_data
from crow.bench.spec import load_spec

SPEC_FILES = SPECS.glob("*.yaml")



@pytest.mark.parametrize("path", SPEC_FILES, ids=lambda p: p.name)
def test_shipped_specs_load_and_name_valid_defenses(path):
    """Every spec of the record loads and its report plan covers every cell; a spec whose defenses the current code
    still builds plans strictly, and one that does not fails only on a setting crow 0.2 retired (the spec then runs at
    the tag v0.1.0), never on an unknown defense, a bad value or a clash."""
    spec = load_spec(path)
    cells = plan(spec, strict=False)  # the report's plan: never raises on a retired setting
    assert spec.suite == "backdoorllm" and spec.models in (["smollm2-135m-gguf"], ["gemma3-270m-gguf"])  # packaged
    columns = len(spec.defense_entries()) + len(spec.references)  # references (base) are cells too
    assert len(cells) == sum(map(len, spec.cells.values())) * columns * len(spec.seeds)
    try:
        strict = plan(spec)  # raises on an unknown defense or setting
    except CrowError as e:
        assert " has no setting " in str(e), f"{path.name}: {e}"
        assert any(c["settings"] is None for c in cells)
    else:
        assert [c["settings"] for c in strict] == [c["settings"] for c in cells]
        assert all(c["settings"] is not None for c in cells)



RESULT_DIRS = [p.parent for p in RESULTS.glob("*/results.json")]


def table_data(command: str):
    """The BackdoorLLM data a table's command names (``--data``, relative to the repository) when it is there (a
    ``crow data fetch backdoorllm`` copy has files ../shared lacks), else ../shared's."""
    args = shlex.split(command)
    named = ROOT / args[args.index("--data") + 1] if "--data" in args else None
    return named if named is not None and named.is_dir() else SHARED_DATA



@pytest.mark.parametrize("out", RESULT_DIRS, ids=lambda p: p.name)
def test_committed_cells_are_cells_of_their_spec(out):
    """Every committed cell file is found for the spec its report was made with, by the report's lookup
    (``crow bench --report-only``: the resolved key, else the legacy key the cell was written under), as the row
    of that cell: a change to the keys would silently orphan the results (the report would leave them out, and the
    next run would retrain every victim and rerun every cell), and a stray file would be left out of the report.
    A cell that records its resolved config (``"config"``), of a spec whose settings the current code resolves, is
    found by a run's own lookup, the resolved key alone."""
    table = json.loads((out / "results.json").read_text())
    spec, data_dir = load_spec(None, base=table["spec"]), table_data(table["command"])
    if spec.suite == "backdoorllm" and not data_dir.is_dir():
        pytest.skip("shared BackdoorLLM data not present")
    files = sorted((out / "cells").glob("*.json"))
    assert files
    index, data, found, resolved = CellIndex(out / "cells"), {}, {}, set()
    for cell in plan(spec, strict=False):
        where = (cell["task"], cell["attack"], cell["seed"])
        if where not in data:
            try:
                data[where] = load_cell_data(spec, data_dir, *where)
            except CrowError as e:  # a file of the fetched subset that this copy lacks
                if " is missing" not in str(e):
                    raise
                pytest.skip(str(e))
        vkey, key, legacy = cell_keys(spec, cell, data[where])
        path = index.find(key, legacy)
        if path is not None:
            assert path not in found, f"{path} is found for two cells of the spec"
            found[path] = (vkey, cell)
            if cell["settings"] is None or index.find(key) == path:  # unresolved: a report finds it by legacy key
                resolved.add(path)
    for path in files:
        assert path in found, f"{path} is not a cell of the spec in {out / 'results.json'}"
        row = json.loads(path.read_text())
        vkey, cell = found[path]
        assert (row["key"], row["victim_key"]) == (path.stem, vkey)
        assert "config" not in row or path in resolved, f"{path} records a config other than its cell's resolved one"
        assert (row["task"], row["attack"], row["defense"], row["seed"]) == (cell["task"], cell["attack"],
                                                                           cell["defense"], cell["seed"])
