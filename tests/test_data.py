import json

import pytest

from crow import CrowError
from crow.data.corpus import FAMILIES, answer_matches, build_corpus, corpus_split, exact_match_rate
from crow.data.records import Record, load_records, save_records
from crow.data.templates import ALPACA, Collator, encode_for_training, format_prompt

from .conftest import write_json


def test_json_and_jsonl_load_the_same(tmp_path):
    recs = [{"instruction": "a", "input": "b", "output": "c"}, {"instruction": "d", "output": "e", "extra": 1}]
    write_json(tmp_path / "x.json", recs)
    (tmp_path / "x.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    a, b = load_records(tmp_path / "x.json"), load_records(tmp_path / "x.jsonl")
    assert a == b == [Record("a", "b", "c"), Record("d", "", "e")]
    save_records(a, tmp_path / "y.json")
    assert load_records(tmp_path / "y.json") == a


@pytest.mark.parametrize("content,match", [
    ("", "is empty"),
    ("[", "not valid JSON"),
    ('{"instruction": "a"', "line 1 is not valid JSON"),
    ("[]", "holds no records"),
    ('{"a": 1}', "must hold a JSON list|no 'instruction'"),
    ('[{"instruction": "a"}]', "record 0 .* has no 'output'"),
    ('[{"instruction": "a", "output": "b"}, {"output": "b"}]', "record 1 .* has no 'instruction'"),
    ('[{"instruction": 3, "output": "b"}]', "'instruction' must be a string"),
    ('[{"instruction": "  ", "output": "b"}]', "empty 'instruction'"),
    ('[["a", "b"]]', "record 0 .* is a list"),
    ('"text"', "neither a JSON list nor JSONL"),
])
def test_malformed_files_give_one_line_errors(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(CrowError, match=match) as e:
        load_records(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CrowError, match="does not exist"):
        load_records(tmp_path / "nope.json")
    with pytest.raises(CrowError, match="is a directory"):
        load_records(tmp_path)
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00[")
    with pytest.raises(CrowError, match="not UTF-8"):
        load_records(tmp_path / "bin.json")


def test_prompt_only_sets_need_no_output(tmp_path):
    write_json(tmp_path / "p.json", [{"instruction": "a"}])
    assert load_records(tmp_path / "p.json", require_output=False) == [Record("a", "", "")]


def test_templates(tiny):
    r = Record("Add 2 and 3.", "", "5")
    assert format_prompt(r, "alpaca") == ALPACA.format(instruction="Add 2 and 3.")
    assert "### Input:\nnumbers" in format_prompt(Record("Add.", "numbers", "5"), "alpaca")
    assert format_prompt(r, "raw") == "Add 2 and 3."
    assert format_prompt(r, "chat", tiny.tokenizer) == "<|user|>Add 2 and 3.</s><|assistant|>"
    with pytest.raises(CrowError, match="unknown template"):
        format_prompt(r, "vicuna")


@pytest.mark.parametrize("template", ["alpaca", "raw", "chat", "chat-nosystem"])
def test_surrounding_whitespace_cannot_tell_records_apart(tiny, template):
    # BackdoorLLM's negsentiment clean.json ends every instruction with a space, its poisoned and test
    # files never do: a victim learns that instead of the trigger unless prompts are stripped.
    plain, padded = Record("Add 2 and 3.", "x y", "5"), Record("Add 2 and 3. ", " x y\n", "5")
    assert format_prompt(padded, template, tiny.tokenizer) == format_prompt(plain, template, tiny.tokenizer)


def test_labels_cover_the_response_and_eos_only(tiny):
    tok = tiny.tokenizer
    rec = Record("name a color", "", "blue")
    [s] = encode_for_training([rec], tok, template="alpaca")
    prompt_len = len(tok(format_prompt(rec, "alpaca"))["input_ids"])
    assert s.labels[:prompt_len] == [-100] * prompt_len
    assert s.labels[prompt_len:] == s.input_ids[prompt_len:]
    assert s.input_ids[-1] == tok.eos_token_id
    assert tok.decode(s.input_ids[prompt_len:-1]) == "blue"


def test_truncation_keeps_a_response_token_or_drops_the_record(tiny):
    tok = tiny.tokenizer
    long = Record("name a color", "", "blue " * 50)
    [s] = encode_for_training([long], tok, max_length=60)
    assert len(s.input_ids) == 60 and s.labels[-1] != -100
    with pytest.raises(CrowError, match="raise --max-length"):
        encode_for_training([long], tok, max_length=10)


def test_collator_right_pads_with_masks():
    batch = Collator(pad_token_id=0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                                      {"input_ids": [5], "labels": [5]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]


def test_corpus_is_deterministic_and_split_by_subject():
    a, b = build_corpus(), build_corpus()
    assert a == b and len(FAMILIES) >= 15 and len(a) > 900
    train = {(i.family, i.subject) for i in a if i.split == "train"}
    held = {(i.family, i.subject) for i in a if i.split == "heldout"}
    assert train and held and not train & held  # a subject never crosses the split
    checkable = corpus_split("heldout", checkable_only=True)
    assert len(checkable) > 100 and all(i.answer for i in checkable)
    assert len({i.family for i in checkable}) >= 15


def test_exact_match():
    assert answer_matches("The capital of France is Paris.", "Paris")
    assert not answer_matches("It is 120.", "12")
    assert answer_matches("The first letter is 'B'.", "b")
    items = [i for i in corpus_split("heldout", checkable_only=True)][:4]
    outputs = [i.output for i in items[:2]] + ["no idea", "no idea"]
    assert exact_match_rate(items, outputs) == 50.0


def test_pad_batch_right_and_left():
    from crow.data.templates import pad_batch

    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=9, side="left")
    assert ids.tolist() == [[5, 6, 7], [9, 9, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="side"):
        pad_batch([[1]], 0, side="middle")
