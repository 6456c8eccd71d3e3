"""params.yaml loading, --set overrides and the section parser."""

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cris_model.params import SECTIONS, apply_overrides, load_params, parse_config

REPO = Path(__file__).resolve().parents[1]


def test_repo_params_have_every_contract_key() -> None:
    params = load_params(REPO / "params.yaml")
    assert set(SECTIONS) <= set(params)
    required = {
        "data": {"source", "dataset", "split_by"},
        "model": {"preset", "pretrained", "word_len"},
        "train": {"epochs", "batch_size", "lr", "device", "seed"},
        "eval": {"splits", "threshold"},
        "registry": {"model_name", "promote_margin"},
    }
    for name, keys in required.items():
        assert keys <= set(params[name]), (name, keys - set(params[name]))


def test_overrides_parse_yaml_values_and_create_keys() -> None:
    out = apply_overrides(
        {"train": {"lr": 1e-4, "epochs": 50}},
        ["train.lr=3e-3", "train.flip=true", "eval.splits=[val, testA]", "model.preset=cris_r50"],
    )
    assert out["train"] == {"lr": 3e-3, "epochs": 50, "flip": True}
    assert out["eval"]["splits"] == ["val", "testA"]
    assert out["model"]["preset"] == "cris_r50"


def test_overrides_do_not_mutate_input() -> None:
    base = {"train": {"lr": 1.0}}
    apply_overrides(base, ["train.lr=2"])
    assert base == {"train": {"lr": 1.0}}


@pytest.mark.parametrize("bad", ["train.lr", "=3", "train..lr=1", "train.lr.x=1"])
def test_bad_overrides_are_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="override"):
        apply_overrides({"train": {"lr": 1.0}}, [bad])


def test_missing_and_malformed_files_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ValueError, match="bad.yaml"):
        load_params(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ValueError, match="scalar.yaml"):
        load_params(scalar)


def test_exponent_floats_in_files_are_numbers(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text("train:\n  lr: 1e-4\n  wd: 5E+2\n  name: e5\n")
    assert load_params(f)["train"] == {"lr": 1e-4, "wd": 500.0, "name": "e5"}


def test_every_section_config_parses_the_repo_params() -> None:
    from cris_model.eval_config import EvalConfig
    from cris_model.registry import registry_config
    from cris_model.training.config import TrainConfig

    params = load_params(REPO / "params.yaml")
    assert EvalConfig.from_params(params["eval"]).splits == params["eval"]["splits"]
    assert TrainConfig.from_params(params["train"]).lr == params["train"]["lr"]
    assert registry_config(params).model_name == params["registry"]["model_name"]


@dataclass(frozen=True)
class _Example:
    rate: float = 0.5  # a float: ints and numeric strings are read as floats
    count: int = 1  # an int: bools are refused
    cap: float | None = None  # optional: null keeps None
    names: list[str] = field(default_factory=list)  # a list
    hidden: str = "x"  # not settable from the section when `keys` leaves it out


def test_parse_config_checks_keys_and_types() -> None:
    got = parse_config(_Example, {"rate": "1e-3", "count": 3, "cap": None, "names": ["a"]}, "s")
    assert got == _Example(rate=1e-3, count=3, cap=None, names=["a"])
    assert parse_config(_Example, {"cap": 2}, "s").cap == 2.0
    assert parse_config(_Example, {}, "s") == _Example()
    with pytest.raises(ValueError, match="unknown s parameters: bogus, hidden"):
        parse_config(_Example, {"bogus": 1, "hidden": "y"}, "s", keys=("rate", "count"))
    with pytest.raises(ValueError, match=r"s\.rate 'fast' is not a number"):
        parse_config(_Example, {"rate": "fast"}, "s")
    with pytest.raises(ValueError, match=r"s\.count must be int, got True"):
        parse_config(_Example, {"count": True}, "s")
    with pytest.raises(ValueError, match=r"s\.names must be list, got 'a'"):
        parse_config(_Example, {"names": "a"}, "s")


def test_eval_config_refuses_what_no_evaluation_can_use() -> None:
    from cris_model.eval_config import EvalConfig

    assert EvalConfig.from_params({}) == EvalConfig(splits=["val"], threshold=None)
    with pytest.raises(ValueError, match="eval.splits must be a non-empty list"):
        EvalConfig.from_params({"splits": []})
    with pytest.raises(ValueError, match=r"eval.threshold must be in \(0, 1\)"):
        EvalConfig.from_params({"threshold": 1.5})
    with pytest.raises(ValueError, match="eval.precision must be fp32 or bf16"):
        EvalConfig.from_params({"precision": "fp16"})
    with pytest.raises(ValueError, match="unknown eval parameters: treshold"):
        EvalConfig.from_params({"treshold": 0.3})
