"""params.yaml loading and --set overrides."""

from pathlib import Path

import pytest

from cris_model.params import SECTIONS, apply_overrides, load_params

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
