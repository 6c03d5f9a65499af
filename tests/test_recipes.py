"""The measured recipes as presets (crow.presets) and crow purify's options generated from the configs: every preset
builds, through `crow purify --preset`, the UnlearnConfig the experiments measured (experiments/unlearn); options layer
the method's defaults < --preset < --config < the command line; a bad or foreign option is refused in one line naming
its flag."""

import dataclasses
from importlib import resources

import pytest

from crow import CrowError
from crow.cli.main import build_parser, main
from crow.cli.options import field_kind, flag
from crow.cli.purify_cmd import RUN_DEFAULTS, method_configs, resolve_options
from crow.defenses import get_defense
from crow.methods.crow import CrowConfig
from crow.methods.unlearn import UnlearnConfig
from crow.presets import load_preset, preset_names
from crow.training.config import TrainingConfig

#: preset -> the UnlearnConfig of the measured recipe and its sample length: SmolLM2-135M's is UnlearnConfig's defaults,
#: Gemma-3-270M's the same with a five times smaller learning rate; both measured on samples of 128 tokens
MEASURED = {"unlearn": (UnlearnConfig(), 128), "unlearn-gemma": (UnlearnConfig(learning_rate=2e-4), 128)}


def parse(tmp_path, *options):
    return build_parser().parse_args(["purify", "--model", "m", "--data", "d.json", "--out", str(tmp_path / "o"),
                                      *map(str, options)])


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_every_preset_is_checked():
    assert preset_names() == sorted(MEASURED) == ["unlearn", "unlearn-gemma"]


@pytest.mark.parametrize("name", sorted(MEASURED))
def test_a_preset_loads_and_names_only_valid_options(name):
    options = load_preset(name)
    valid = {f.name for f in dataclasses.fields(UnlearnConfig)} | set(RUN_DEFAULTS)
    assert options["method"] == "unlearn" and set(options) <= valid, options


@pytest.mark.parametrize("name", sorted(MEASURED))
def test_a_preset_builds_the_measured_recipe(name, tmp_path):
    expected, max_length = MEASURED[name]
    method, settings, run = resolve_options(parse(tmp_path, "--preset", name))
    assert method == "unlearn" and run == {"max_length": max_length, "template": "alpaca", "save_steps": 20}
    assert UnlearnConfig(**settings) == expected
    assert get_defense(method, **settings).config() == expected  # what crow purify trains
    default = dataclasses.asdict(UnlearnConfig())
    changed = {k: v for k, v in dataclasses.asdict(expected).items() if v != default[k]}
    assert changed == ({"learning_rate": 2e-4} if name == "unlearn-gemma" else {})


@pytest.mark.parametrize("name", sorted(MEASURED))
def test_a_presets_comments_name_the_command(name):
    text = resources.files("crow.presets").joinpath(f"{name}.yaml").read_text(encoding="utf-8")
    comments = [line for line in text.splitlines() if line.lstrip().startswith("#")]
    assert any(f"crow purify --preset {name} --model " in line for line in comments), comments


def test_the_command_line_overrides_a_config_file_which_overrides_a_preset(tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text("learning-rate: 5.0e-4\nholdout: 10\nmax_length: 256\n", encoding="utf-8")
    method, settings, run = resolve_options(parse(tmp_path, "--preset", "unlearn-gemma", "--config", config))
    assert method == "unlearn" and run["max_length"] == 256
    assert UnlearnConfig(**settings) == UnlearnConfig(learning_rate=5e-4, holdout=10)
    method, settings, run = resolve_options(parse(tmp_path, "--preset", "unlearn-gemma", "--config", config,
                                                  "--learning-rate", "3e-4", "--max-length", 64, "--refit-alpha", 0))
    assert run["max_length"] == 64
    assert UnlearnConfig(**settings) == UnlearnConfig(learning_rate=3e-4, holdout=10, refit_alpha=0.0)
    _, settings, run = resolve_options(parse(tmp_path, "--preset", "unlearn-gemma", "--epochs", "4"))
    assert UnlearnConfig(**settings) == UnlearnConfig(learning_rate=2e-4, epochs=4.0) and run["max_length"] == 128
    method, settings, _ = resolve_options(parse(tmp_path, "--preset", "unlearn-gemma", "--method", "finetune"))
    assert method == "finetune" and get_defense(method, **settings).config() == CrowConfig(alpha=0.0,
                                                                                          learning_rate=2e-4)


def test_an_unknown_preset_is_refused(tmp_path, capsys):
    with pytest.raises(CrowError, match="unknown preset 'smollm2'; valid: unlearn, unlearn-gemma"):
        load_preset("smollm2")
    code, _, err = run_cli(["purify", "--model", "m", "--data", "d.json", "--out", tmp_path / "o", "--preset",
                            "smollm2"], capsys)
    assert code == 2 and "--preset: invalid choice: 'smollm2'" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("method", ["crow", "finetune", "unlearn"])
def test_every_config_field_is_a_purify_option_of_its_type(method, tmp_path):
    """One flag per field of the method's config (``learning_rate`` -> ``--learning-rate``), parsed to the field's
    type and passed on as given; the fields of the other method's config are refused as foreign, naming the flag."""
    cls = method_configs()[method]
    given = {bool: True, str: "a target", float: 5e-4, int: 3}  # a value of each kind, for a field unset by default
    for f in dataclasses.fields(cls):
        kind = field_kind(cls, f)
        expected = given[kind] if f.default is None or kind is bool else f.default
        value = "true" if expected is True else str(expected)
        _, settings, _ = resolve_options(parse(tmp_path, "--method", method, flag(f.name), value))
        assert settings == {f.name: expected} and type(settings[f.name]) is type(expected), (f.name, settings)
    other = method_configs()["crow" if method == "unlearn" else "unlearn"]
    foreign = set(other.__dataclass_fields__) - set(cls.__dataclass_fields__)
    assert foreign and not foreign & set(TrainingConfig.__dataclass_fields__)
    for name in sorted(foreign):
        f = other.__dataclass_fields__[name]
        value = "a target" if f.default is None else str(f.default)
        with pytest.raises(CrowError, match=f"^{flag(name)} does not apply to --method {method}; its own options: "):
            resolve_options(parse(tmp_path, "--method", method, flag(name), value))


@pytest.mark.parametrize("contents, message", [
    ("learning_rate: -1\n", "--learning-rate must be a number > 0, got -1"),
    ("holdout: 0\n", "--holdout must be an integer >= 1 (clean samples held out), got 0"),
    ("holdout: many\n", "holdout: --holdout must be an integer, got 'many'"),
    ("radius: 0.5\n", "unknown option 'radius'"),
    ("alpha: 2\n", "--alpha does not apply to --method unlearn"),
])
def test_a_bad_option_from_a_config_file_is_refused_in_one_line_naming_the_flag(contents, message, tmp_path, capsys):
    config = tmp_path / "recipe.yaml"
    config.write_text(contents, encoding="utf-8")
    code, _, err = run_cli(["purify", "--model", "m", "--data", tmp_path / "d.json", "--out", tmp_path / "o",
                            "--preset", "unlearn", "--config", config], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()
