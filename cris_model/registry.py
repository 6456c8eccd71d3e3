"""The MLflow model registry: register checkpoints as versions, promote and roll back.

A registered version is an MLflow pyfunc model logged from code (`mlflow_model.py`) with
the checkpoint directory as its only artifact, tagged with dataset, preset, data version,
git commit, training run, checkpoint hash and the val metrics (`val_mIoU`, ...). New
versions get the alias `challenger`; `promote` moves `champion` to the challenger when it
beats the champion's val mIoU by `promote_margin`, and keeps the replaced champions in the
registered-model tag `champion_history` (comma-separated versions, newest last) so that
`rollback` can restore them.

Registration is idempotent: a version is identified by its training run id and checkpoint
SHA-256 (tags set atomically with the version), and registering the same pair again reuses
that version instead of creating another one, so a retried registration is safe. `register`
itself retries while the tracking server is unreachable (`RegistryConfig.retries`, doubling
waits), and should a lost response have made MLflow create the same version twice, keeps
the first and deletes the copy: one model version per training run and checkpoint.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from cris_model.checkpoint import META_FILES, WEIGHTS, read_checkpoint_meta
from cris_model.data.fetch_checksums import sha256_file
from cris_model.data.manifest import data_version
from cris_model.params import SectionConfig, section
from cris_model.tracking import (
    MlflowTracker,
    client_errors,
    default_tracking_uri,
    first_line,
    fluent_uris,
    unreachable,
)

CHALLENGER = "challenger"  # alias of the newest registered version
CHAMPION = "champion"  # alias of the version in service
HISTORY_TAG = "champion_history"  # registered-model tag: replaced champions, newest last
ROLLED_BACK_TAG = "rolled_back"  # version tag set when a rollback removes it from service
MODEL_ARTIFACT = "model"  # name of the logged model inside its run
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\- ]+$")
_MODEL_URI_RE = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")
ONNX_ARTIFACT = "onnx"  # folder of the version's run that holds model.onnx (export_onnx)
_T = TypeVar("_T")


@dataclass(frozen=True)
class RegistryConfig(SectionConfig):
    """Where and how to register; built from params.yaml by `registry_config`."""

    SECTION = "registry"
    KEYS = ("model_name", "promote_margin", "data_version", "retries", "retry_backoff_s",
            "export_onnx")

    model_name: str = "cris"  # MLflow registered model name (registry.model_name)
    promote_margin: float = 0.0  # val mIoU lead a challenger needs (registry.promote_margin)
    data_version: str = ""  # data version tag; "" = hash of the prepared manifests, if given
    tracking_uri: str = ""  # "" = train.tracking_uri, else $MLFLOW_TRACKING_URI or ./mlruns.db
    experiment: str = "cris"  # experiment of a new registration run (train.experiment)
    retries: int = 4  # further attempts while the tracking server is unreachable
    retry_backoff_s: float = 2.0  # wait before the first retry; doubles on each one
    export_onnx: bool = False  # also log the model as ONNX (cris export) in the version's run

    def validate(self) -> None:
        """Raise ValueError on a model name MLflow refuses or a negative retry setting."""
        if not _NAME_RE.match(self.model_name):
            raise ValueError(f"registry.model_name {self.model_name!r} is not a valid model name")
        if self.retries < 0 or self.retry_backoff_s < 0:
            raise ValueError("registry.retries and registry.retry_backoff_s must be >= 0")

    def resolved_uri(self) -> str:
        """The tracking (and registry) URI to use."""
        return self.tracking_uri or default_tracking_uri()


def registry_config(params: Mapping[str, Any], tracking_uri: str = "") -> RegistryConfig:
    """RegistryConfig from params' `registry` section (+ train.tracking_uri, train.experiment).

    `tracking_uri`, when given, wins over params. Unknown registry keys are a ValueError.
    """
    reg = RegistryConfig.from_params(section(dict(params), "registry"))
    train = section(dict(params), "train")
    return replace(reg, tracking_uri=tracking_uri or str(train.get("tracking_uri") or ""),
                   experiment=str(train.get("experiment") or reg.experiment))


def git_commit(cwd: Path | None = None) -> str:
    """`git rev-parse HEAD` of the project's source tree, or "unknown" outside a git checkout."""
    where = cwd or Path(__file__).resolve().parent.parent
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True,
                              text=True, timeout=30, check=False)
    except FileNotFoundError:
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else "unknown"


def read_metrics(path: Path) -> dict[str, float]:
    """Numeric val metrics of an evaluate metrics.json (or a checkpoint's); must hold mIoU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: metrics file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of metrics")
    split = data.get("split", "val")
    if split != "val":
        raise ValueError(f"{path}: metrics of split {split!r}; registration compares val metrics")
    metrics = {k: float(v) for k, v in data.items()
               if isinstance(v, int | float) and not isinstance(v, bool) and k != "count"}
    if "mIoU" not in metrics:
        raise ValueError(f"{path}: no numeric mIoU")
    return metrics


def _metric_tag(name: str) -> str:
    """Metric name -> version tag key: mIoU -> val_mIoU, prec@0.5 -> val_prec_0.5."""
    return "val_" + re.sub(r"[^\w.\-]", "_", name)


@contextmanager
def _mlflow_errors(uri: str) -> Iterator[None]:
    """Re-raise MLflow client failures as RuntimeError naming the tracking URI."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RuntimeError(f"{uri}: MLflow request failed ({first})") from e


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _ensure_model(client: Any, name: str) -> None:
    """Create registered model `name` unless it exists."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise


def _run_exists(client: Any, run_id: str | None) -> bool:
    """Whether this tracking store holds run `run_id`."""
    from mlflow.exceptions import MlflowException

    if not run_id:
        return False
    try:
        client.get_run(run_id)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return True


def _find_version(client: Any, name: str, tags: Mapping[str, str]) -> Any | None:
    """The lowest version of `name` carrying every one of `tags`, or None; any other version
    with the same tags (MLflow re-sending a create whose answer was lost) is deleted."""
    clauses = [f"name = '{name}'"] + [f"tags.{k} = '{v}'" for k, v in tags.items()]
    found = sorted(client.search_model_versions(" and ".join(clauses)),
                   key=lambda mv: int(mv.version))
    for copy in found[1:]:
        client.delete_model_version(name, copy.version)
    return found[0] if found else None


def _retrying(action: Callable[[], _T], uri: str, config: RegistryConfig) -> _T:
    """Run `action` again, after doubling waits, while the tracking server is unreachable;
    RuntimeError naming `uri` once `config.retries` further attempts have failed too."""
    failures: tuple[type[BaseException], ...] = (*client_errors(), RuntimeError)
    for attempt in range(config.retries + 1):
        try:
            return action()
        except failures as e:
            if not unreachable(e):
                raise
            if attempt == config.retries:
                raise RuntimeError(f"{uri}: MLflow unreachable after {attempt + 1} attempt(s) "
                                   f"({first_line(e)})") from e
            wait = config.retry_backoff_s * 2**attempt
            print(f"cris: warning: {uri}: MLflow unreachable; retrying in {wait:g} s",
                  file=sys.stderr)
            time.sleep(wait)
    raise AssertionError("unreachable: the loop returns or raises")


def _stage_checkpoint(checkpoint: Path, dest: Path) -> Path:
    """Copy the inference files of a checkpoint (no optimizer state) into `dest`."""
    dest.mkdir(parents=True)
    for name in (WEIGHTS, *META_FILES):
        src = checkpoint / name
        if not src.is_file():
            raise FileNotFoundError(f"{src}: checkpoint file missing")
        shutil.copy2(src, dest / name)
    return dest


def _log_model(checkpoint: Path, uri: str, experiment: str, run_id: str | None,
               params: Mapping[str, Any]) -> tuple[str, str]:
    """Log the checkpoint as a pyfunc model from code into `run_id` (None: a new run in
    `experiment`); return (model URI, run id)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    import cris_model
    from cris_model import mlflow_model

    if run_id is None:
        tracker = MlflowTracker(uri, experiment)
        tracker.start("register", params)
        run_id = tracker.run_id
    with tempfile.TemporaryDirectory(prefix="cris-register-") as tmp:
        staged = _stage_checkpoint(checkpoint, Path(tmp) / "checkpoint")
        try:
            with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
                # An input example would make MLflow load and run the model while logging it;
                # the serving format is documented in mlflow_model.py instead.
                warnings.filterwarnings("ignore", message=".*input example was not provided")
                info = mlflow.pyfunc.log_model(
                    name=MODEL_ARTIFACT, python_model=mlflow_model.__file__,
                    artifacts={mlflow_model.CHECKPOINT_ARTIFACT: str(staged)},
                    signature=mlflow_model.signature(),
                    pip_requirements=[f"cris-mlops=={cris_model.__version__}",
                                      f"mlflow=={mlflow.__version__}"],
                )
        except MlflowException as e:
            raise RuntimeError(f"{uri}: logging the model into run {run_id} failed ({e})") from e
    return info.model_uri, str(run_id)


def _summary(client: Any, name: str, version: str | None, uri: str) -> dict[str, Any]:
    """tracking_uri, model_name, version, aliases and val mIoU of one version (None: none)."""
    if version is None:
        return {"tracking_uri": uri, "model_name": name, "version": None, "aliases": [],
                "mIoU": None}
    mv = client.get_model_version(name, version)
    miou = mv.tags.get(_metric_tag("mIoU"))
    return {"tracking_uri": uri, "model_name": name, "version": int(mv.version),
            "aliases": sorted(mv.aliases), "mIoU": None if miou is None else float(miou)}


def _dataset(data_dir: Path | None, dataset: str) -> str:
    """The dataset named in `data_dir/summary.json`, else `dataset`, else "unknown"."""
    summary = Path(data_dir) / "summary.json" if data_dir else None
    if summary is not None and summary.is_file():
        try:
            named = json.loads(summary.read_text(encoding="utf-8")).get("dataset")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise ValueError(f"{summary}: not a prepare summary ({e})") from e
        if named:
            return str(named)
    return dataset or "unknown"


def register(
    checkpoint: Path, config: RegistryConfig, *, metrics_path: Path | None = None,
    run_id: str | None = None, data_dir: Path | None = None, dataset: str = "",
) -> dict[str, Any]:
    """Register checkpoint directory `checkpoint` as a version of `config.model_name`.

    `metrics_path` is an evaluate metrics.json of the val split (default: the checkpoint's
    metrics.json); `run_id` the training run (default: the one in the checkpoint's
    extra.json), which receives the logged model; when none is given and the recorded one
    is not in this store, a new run in `config.experiment` does. `data_dir` (the prepared
    folder) gives the dataset and data version tags; `dataset` is the fallback name. Sets
    the alias `challenger`. Returns the version summary (tracking_uri, model_name, version,
    aliases, mIoU) plus model_uri, run_id (where the model was logged), `reused` (an
    identical registration existed) and `onnx`: with `config.export_onnx`, the runs:/ URI
    of the model exported as ONNX (`cris export`) and logged into that run, else None.
    """
    checkpoint = Path(checkpoint)
    meta = read_checkpoint_meta(checkpoint)
    metrics = read_metrics(metrics_path or checkpoint / "metrics.json")
    train_run = run_id or meta["extra"].get("run_id") or None
    key = {"train_run_id": train_run or "none",
           "checkpoint_sha256": sha256_file(checkpoint / WEIGHTS)}
    uri = config.resolved_uri()
    tags = {
        **key,
        "dataset": _dataset(data_dir, dataset),
        "preset": meta["config"].get("preset") or "unknown",
        "data_version": config.data_version or (data_version(data_dir) if data_dir else "unknown"),
        "git_commit": git_commit(),
        **{_metric_tag(k): repr(v) for k, v in sorted(metrics.items())},
    }
    def attempt(onnx: Path | None) -> dict[str, Any]:
        return _retrying(lambda: _register(checkpoint, config, key, tags, run_id, train_run,
                                           onnx), uri, config)

    if not config.export_onnx:
        return attempt(None)
    from cris_model.interop.onnx_export import export_checkpoint

    with tempfile.TemporaryDirectory(prefix="cris-onnx-") as tmp:
        onnx = Path(tmp) / "model.onnx"
        export_checkpoint(checkpoint, onnx)  # checked against PyTorch, once for all attempts
        return attempt(onnx)


def _log_onnx(client: Any, run_id: str, onnx: Path) -> str:
    """Log `onnx` into the run's ONNX_ARTIFACT folder unless already there; -> its runs:/ URI."""
    logged = {Path(f.path).name for f in client.list_artifacts(run_id, ONNX_ARTIFACT)}
    if onnx.name not in logged:
        client.log_artifact(run_id, str(onnx), ONNX_ARTIFACT)
    return f"runs:/{run_id}/{ONNX_ARTIFACT}/{onnx.name}"


def _register(checkpoint: Path, config: RegistryConfig, key: dict[str, str],
              tags: dict[str, str], run_id: str | None, train_run: str | None,
              onnx: Path | None = None) -> dict[str, Any]:
    """One attempt of `register`: reuse the version with this key, or log and create one;
    with `onnx`, that file is logged into the version's run too."""
    uri, name = config.resolved_uri(), config.model_name
    with _mlflow_errors(uri), fluent_uris(uri):  # logging and resolving the model use both
        client = _client(uri)
        existing = _find_version(client, name, key)
        if existing is None:
            _ensure_model(client, name)
            into = run_id or (train_run if _run_exists(client, train_run) else None)
            model_uri, logged_run = _log_model(
                checkpoint, uri, config.experiment, into,
                {"registry": {"checkpoint": str(checkpoint), **tags}})
            client.create_model_version(name, model_uri, run_id=logged_run, tags=tags,
                                        model_id=model_uri.removeprefix("models:/"))
            created = _find_version(client, name, key)
            assert created is not None, "a version was just created with these tags"
            version = str(created.version)
        else:
            version, logged_run = str(existing.version), str(existing.run_id)
            for k, v in tags.items():
                client.set_model_version_tag(name, version, k, v)
        onnx_uri = _log_onnx(client, logged_run, onnx) if onnx else None
        client.set_registered_model_alias(name, CHALLENGER, version)
        return {**_summary(client, name, version, uri), "model_uri": f"models:/{name}/{version}",
                "run_id": logged_run, "reused": existing is not None, "onnx": onnx_uri}


def _registered(client: Any, name: str) -> tuple[dict[str, str], list[str]]:
    """({alias: version}, champion history) of registered model `name`; empty when missing."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return {}, []
        raise
    aliases = {str(k): str(v) for k, v in (model.aliases or {}).items()}
    history = [v for v in model.tags.get(HISTORY_TAG, "").split(",") if v]
    return aliases, history


def _val_miou(client: Any, name: str, version: str) -> float:
    value = client.get_model_version(name, version).tags.get(_metric_tag("mIoU"))
    if value is None:
        raise ValueError(f"{name} version {version}: no {_metric_tag('mIoU')} tag to compare")
    return float(value)


def _promotion(client: Any, name: str, margin: float) -> tuple[bool, str]:
    """Move champion to the challenger if the rules allow; (promoted, reason)."""
    aliases, history = _registered(client, name)
    new, held = aliases.get(CHALLENGER), aliases.get(CHAMPION)
    if new is None:
        raise ValueError(f"{name}: no version has alias {CHALLENGER!r} (run `cris register`)")
    if held == new:
        return False, f"challenger v{new} is already the champion"
    if client.get_model_version(name, new).tags.get(ROLLED_BACK_TAG) == "true":
        return False, f"challenger v{new} was rolled back; register a new version"
    cand = _val_miou(client, name, new)
    if held is None:
        client.set_registered_model_alias(name, CHAMPION, new)
        return True, f"no champion yet: challenger v{new} (val mIoU {cand:.4f}) becomes champion"
    best = _val_miou(client, name, held)
    versus = (f"challenger v{new} val mIoU {cand:.4f} vs champion v{held} {best:.4f} "
              f"+ margin {margin:g}")
    if cand < best + margin:
        return False, f"{versus}: champion stays"
    if not history or history[-1] != held:
        history.append(held)
    client.set_registered_model_tag(name, HISTORY_TAG, ",".join(history))
    client.set_registered_model_alias(name, CHAMPION, new)
    return True, f"{versus}: promoted"


def _restore(client: Any, name: str) -> str:
    """Move champion back to the newest entry of the history; the reason, as text."""
    aliases, history = _registered(client, name)
    if not history:
        raise ValueError(f"{name}: no previous champion recorded; nothing to roll back to")
    current, target = aliases.get(CHAMPION), history.pop()
    if current is not None and current != target:
        client.set_model_version_tag(name, current, ROLLED_BACK_TAG, "true")
    client.set_registered_model_alias(name, CHAMPION, target)
    client.set_registered_model_tag(name, HISTORY_TAG, ",".join(history))
    return f"rolled back: champion v{current} -> v{target}"


def _report(client: Any, name: str, uri: str, promoted: bool, reason: str) -> dict[str, Any]:
    aliases, history = _registered(client, name)
    challenger = aliases.get(CHALLENGER)
    return {
        **_summary(client, name, aliases.get(CHAMPION), uri),
        "promoted": promoted, "reason": reason,
        "challenger": None if challenger is None else int(challenger),
        "previous_champion": int(history[-1]) if history else None,
    }


def promote(config: RegistryConfig) -> dict[str, Any]:
    """Make the challenger the champion if there is none or it wins by `promote_margin`.

    A tie counts as a win when the margin is 0. The replaced champion is pushed onto the
    history for `rollback`. Returns the champion's summary (tracking_uri, model_name,
    version, aliases, mIoU) plus `promoted`, `reason`, `challenger` (its version) and
    `previous_champion` (the version a rollback would restore, or None).
    """
    uri, name = config.resolved_uri(), config.model_name
    with _mlflow_errors(uri):
        client = _client(uri)
        promoted, reason = _promotion(client, name, config.promote_margin)
        return _report(client, name, uri, promoted, reason)


def rollback(config: RegistryConfig) -> dict[str, Any]:
    """Move `champion` back to the newest recorded previous champion; ValueError if none.

    The version taken out of service is tagged `rolled_back=true`, so `promote` will not
    reinstate it while it still holds the challenger alias. Returns what `promote` returns.
    """
    uri, name = config.resolved_uri(), config.model_name
    with _mlflow_errors(uri):
        client = _client(uri)
        reason = _restore(client, name)
        return _report(client, name, uri, False, reason)


def model_version(model_uri: str, tracking_uri: str = "") -> dict[str, Any]:
    """The version a models:/NAME@ALIAS or models:/NAME/VERSION URI names now, as the
    summary (tracking_uri, model_name, version, aliases, mIoU); ValueError when the URI has
    another form or the registry has no such version or alias."""
    found = _MODEL_URI_RE.match(model_uri)
    if found is None:
        raise ValueError(f"{model_uri}: not a registered model URI "
                         "(models:/NAME@ALIAS or models:/NAME/VERSION)")
    from mlflow.exceptions import MlflowException

    name, alias, version = found["name"], found["alias"], found["version"]
    uri = tracking_uri or default_tracking_uri()
    with _mlflow_errors(uri):
        client = _client(uri)
        if alias is not None:
            version = _registered(client, name)[0].get(alias)
            if version is None:
                raise ValueError(f"{model_uri}: no version of {name} has the alias {alias!r} "
                                 f"in {uri} yet (`cris register` sets {CHALLENGER!r}, "
                                 f"`cris promote` {CHAMPION!r})")
        try:
            return _summary(client, name, version, uri)
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise ValueError(f"{model_uri}: {name} has no version {version} in {uri}") from e


def download_checkpoint(model_uri: str, dest: Path, tracking_uri: str = "") -> Path:
    """Download a registered model (e.g. models:/cris@champion) into `dest`; return its
    checkpoint directory, ready for `Predictor.from_checkpoint`."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    from cris_model.mlflow_model import CHECKPOINT_ARTIFACT

    uri = tracking_uri or default_tracking_uri()
    try:
        with fluent_uris(uri):  # models:/ resolution reads the process-wide registry URI
            local = Path(download_artifacts(artifact_uri=model_uri, dst_path=str(dest),
                                            tracking_uri=uri, registry_uri=uri))
        flavor = Model.load(str(local)).flavors.get("python_function", {})
    except MlflowException as e:
        raise ValueError(f"{model_uri}: cannot fetch the model from {uri} ({e})") from e
    rel = flavor.get("artifacts", {}).get(CHECKPOINT_ARTIFACT, {}).get("path")
    if rel is None:
        raise ValueError(f"{model_uri}: not a CRIS model (no {CHECKPOINT_ARTIFACT!r} artifact)")
    return local / rel
