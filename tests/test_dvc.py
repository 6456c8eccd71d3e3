"""dvc.yaml against the Dagster asset graph, and `dvc repro` on a tiny synthetic dataset.

The graph test needs no DVC: it reads dvc.yaml as YAML. The repro test runs the real `dvc`
CLI (from .venv-dvc, which `make test` installs) in a temporary git repository.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from cris_model.params import apply_overrides, load_params
from pipelines.defs.stages import ASSET_TO_STAGE, FOREACH_SEPARATOR

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "data.synth_images=24", "train.epochs=1", "train.max_steps=2", "train.batch_size=8",
    "train.tracking=false", "train.progress=false", "eval.splits=[val]",
]
_TEMPLATE = re.compile(r"\$\{([^}]+)\}")


def _lookup(params: dict[str, Any], dotted: str) -> Any:
    node: Any = params
    for part in dotted.split("."):
        node = node[part]
    return node


def _render(text: str, params: dict[str, Any], item: str | None = None) -> str:
    """Substitute DVC's ${item} and ${section.key} templates the way `dvc repro` does."""
    def value(match: re.Match[str]) -> str:
        key = match.group(1).strip()
        return str(item) if key == "item" else str(_lookup(params, key))
    return _TEMPLATE.sub(value, text)


def _paths(entries: list[Any]) -> list[str]:
    """Paths of a deps/outs/metrics list whose entries are strings or {path: options}."""
    return [e if isinstance(e, str) else next(iter(e)) for e in entries or []]


def dvc_stages(dvc: dict[str, Any], params: dict[str, Any]) -> dict[str, dict[str, list[str]]]:
    """{stage name: {"deps": [...], "outs": [...]}} with foreach expanded to name@item."""
    out = {}
    for name, stage in dvc["stages"].items():
        if "foreach" in stage:
            items = _lookup(params, _TEMPLATE.fullmatch(stage["foreach"]).group(1))
            body, names = stage["do"], [(f"{name}{FOREACH_SEPARATOR}{i}", i) for i in items]
        else:
            body, names = stage, [(name, None)]
        for full, item in names:
            outs = _paths(body.get("outs")) + _paths(body.get("metrics")) + _paths(
                body.get("plots"))
            out[full] = {"deps": [_render(p, params, item) for p in _paths(body.get("deps"))],
                         "outs": [_render(p, params, item) for p in outs]}
    return out


def dvc_edges(stages: dict[str, dict[str, list[str]]]) -> set[tuple[str, str]]:
    """(producer, consumer) stage pairs: a dep at, inside or above a producer's output."""
    def related(dep: str, out: str) -> bool:
        return dep == out or dep.startswith(out + "/") or out.startswith(dep + "/")
    return {(producer, consumer)
            for consumer, stage in stages.items() for dep in stage["deps"]
            for producer, other in stages.items()
            if producer != consumer and any(related(dep, o) for o in other["outs"])}


def _base(stage: str) -> str:
    return stage.split(FOREACH_SEPARATOR, 1)[0]


def test_dvc_stages_and_dagster_assets_form_the_same_graph() -> None:
    from pipelines.definitions import defs
    from pipelines.defs.assets import SPLIT_PARTITIONS

    params = load_params(REPO / "params.yaml")
    stages = dvc_stages(yaml.safe_load((REPO / "dvc.yaml").read_text()), params)
    graph = defs.resolve_asset_graph()
    assets = {k.to_user_string() for k in graph.get_all_asset_keys()}
    asset_edges = {(p.to_user_string(), k.to_user_string())
                   for k in graph.get_all_asset_keys() for p in graph.get(k).parent_keys}

    assert set(ASSET_TO_STAGE) == assets
    assert {_base(s) for s in stages} == set(ASSET_TO_STAGE.values())
    stage_edges = {(_base(a), _base(b)) for a, b in dvc_edges(stages)}
    to_stage = {(ASSET_TO_STAGE[a], ASSET_TO_STAGE[b]) for a, b in asset_edges}
    assert stage_edges == to_stage
    evaluated = sorted(s.split(FOREACH_SEPARATOR)[1] for s in stages if FOREACH_SEPARATOR in s)
    assert evaluated == sorted(SPLIT_PARTITIONS.get_partition_keys()) == sorted(
        params["eval"]["splits"])


def test_graph_comparison_sees_a_missing_dependency() -> None:
    params = load_params(REPO / "params.yaml")
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    dvc["stages"]["trained_model"]["deps"].remove("data/features")
    edges = {(_base(a), _base(b)) for a, b in dvc_edges(dvc_stages(dvc, params))}
    assert ("clip_features", "trained_model") not in edges
    assert ("prepared_splits", "trained_model") in edges


def _dvc_binary() -> str | None:
    local = REPO / ".venv-dvc" / "bin" / "dvc"
    return str(local) if local.is_file() else shutil.which("dvc")


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.mark.slow
def test_dvc_repro_runs_skips_and_reruns_only_what_a_param_change_touches(tmp_path: Path) -> None:
    dvc = _dvc_binary()
    if dvc is None:
        pytest.skip("dvc CLI not installed (make setup-dvc creates .venv-dvc)")
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(REPO / "dvc.yaml", repo / "dvc.yaml")
    params = apply_overrides(load_params(REPO / "params.yaml"), TINY)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "CI": "1",
           "DVC_NO_ANALYTICS": "1", "GIT_CONFIG_NOSYSTEM": "1"}

    def run(*args: str) -> str:
        done = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True,
                              timeout=600, check=False)
        tail = f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        assert done.returncode == 0, f"{' '.join(args)}:\n{tail}"
        return done.stdout + done.stderr

    run("git", "init", "-q")
    run(dvc, "init", "-q")
    first = _ran(run(dvc, "repro"))
    assert first == {"raw_dataset", "prepared_splits", "clip_features", "trained_model",
                     "evaluation@val", "registered_model"}
    metrics = json.loads(run(dvc, "metrics", "show", "--json"))
    shown = json.dumps(metrics)
    assert '"mIoU"' in shown and "runs/eval/val/metrics.json" in shown
    registered = json.loads((repo / "runs" / "registered.json").read_text().splitlines()[-1])
    assert registered["version"] == 1 and "challenger" in registered["aliases"]

    assert _ran(run(dvc, "repro")) == set()

    params["train"]["lr"] = params["train"]["lr"] * 2
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _ran(run(dvc, "repro")) == {"trained_model", "evaluation@val", "registered_model"}
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert lock["stages"]["trained_model"]["params"]["params.yaml"]["train"]["lr"] == params[
        "train"]["lr"]
