"""Untrusted files: pickled code in checkpoints, links and special files in dataset archives,
and the addresses the servers we start listen on.

Each payload would create a marker file if any code of it ran; the tests assert that the
marker never appears and that nothing is written outside the output folder.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from fetch_servers import FileServer
from payloads import code_pickle
from PIL import Image
from reliability_support import cris, kill_env
from tiny_refer import tiny_training

from cris_model.checkpoint import load_checkpoint, save_checkpoint
from cris_model.cli import main
from cris_model.config import get_preset
from cris_model.data.fetch import FetchConfig, RetryPolicy, fetch
from cris_model.data.fetch_checksums import sha256_bytes
from cris_model.model import CRIS, build_model

REPO = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"


@pytest.fixture(scope="module")
def tiny() -> CRIS:
    torch.manual_seed(0)
    return build_model(get_preset("cris_tiny", random_init=True)).eval()


def _predict(ckpt: Path, tmp_path: Path) -> tuple[int, Path]:
    image = tmp_path / "scene.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(image)
    out = tmp_path / "mask.png"
    rc = main(["predict", "--checkpoint", str(ckpt), "--image", str(image), "--text", "red",
               "--out", str(out)])
    return rc, out


def test_weights_replaced_by_a_pickle_are_refused_without_running_it(
    tiny: CRIS, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "pwned"
    ckpt = save_checkpoint(tmp_path / "best", tiny)
    (ckpt / "model.safetensors").write_bytes(code_pickle(marker))
    with pytest.raises(ValueError, match="model.safetensors: unreadable safetensors"):
        load_checkpoint(ckpt)
    rc, out = _predict(ckpt, tmp_path)
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("cris: error: ") and err.count("\n") == 1
    assert not marker.exists() and not out.exists()


def test_pickles_and_code_pointers_beside_the_weights_are_ignored(
    tiny: CRIS, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    ckpt = save_checkpoint(tmp_path / "best", tiny, extra={
        "loader": "builtins.exec", "code": f"open({str(marker)!r}, 'w').close()",
        "python_model": "python_model.pkl", "_target_": "os.system"})
    payload = code_pickle(marker)
    for name in ("model.pt", "pytorch_model.bin", "optimizer.pt", "python_model.pkl",
                 "model.safetensors.pkl", "training_args.bin"):
        (ckpt / name).write_bytes(payload)
    model = load_checkpoint(ckpt)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 tiny.state_dict().values(), strict=True))
    rc, out = _predict(ckpt, tmp_path)
    assert rc == 0 and out.is_file()
    assert not marker.exists()


def test_config_naming_code_is_an_unknown_key_not_an_import(tiny: CRIS, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    ckpt = save_checkpoint(tmp_path / "best", tiny)
    config = json.loads((ckpt / "config.json").read_text())
    config["_target_"] = "builtins.exec"
    config["args"] = [f"open({str(marker)!r}, 'w').close()"]
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unknown model config keys"):
        load_checkpoint(ckpt)
    assert not marker.exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], Path]:
    """(the `cris train` arguments, less --out; a finished run's output folder)."""
    tmp = tmp_path_factory.mktemp("trained")
    common, _ = tiny_training(tmp, {"train": 2, "val": 1})
    first = cris(*common, "--out", str(tmp / "run"), env=kill_env(tmp, None))
    assert first.wait(timeout=300) == 0, first.communicate()[1]
    return common, tmp / "run"


@pytest.mark.parametrize("victim", ["train_state.safetensors", "train_state.json"])
def test_resume_from_a_poisoned_training_state_fails_in_one_line(
    trained: tuple[list[str], Path], tmp_path: Path, victim: str
) -> None:
    common, finished = trained
    out = shutil.copytree(finished, tmp_path / "run")
    marker = tmp_path / "pwned"
    (out / "last" / victim).write_bytes(code_pickle(marker))
    resumed = cris(*common, "--out", str(out), "--resume", env=kill_env(tmp_path, None))
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 1 and err.count("\n") == 1, err
    assert re.match(rf"cris: error: .*{re.escape(victim)}: unreadable", err), err
    assert not marker.exists()


# ---- dataset archives ---------------------------------------------------------------------

FAST = RetryPolicy(retries=0, timeout_s=5.0)


def _tar(members: list[tarfile.TarInfo], data: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info in members:
            body = data.get(info.name)
            if body is not None:
                info.size = len(body)
            tar.addfile(info, io.BytesIO(body) if body is not None else None)
    return buf.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


def _evil_archives(outside: Path) -> dict[str, tuple[bytes, str]]:
    """name -> (archive bytes, what the error must say)."""
    ok = {"ok.txt": b"ok", "evil": b"evil"}
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.writestr("ok.txt", b"ok")
        info = zipfile.ZipInfo("link")
        info.external_attr = (0o120777 << 16)  # a symbolic link, target in the body
        zf.writestr(info, str(outside))
    return {
        "hardlink.tgz": (_tar([_member("ok.txt"), _member("hard", tarfile.LNKTYPE,
                                                          str(outside / "secret"))], ok),
                         "'hard' is a link"),
        "relative-hardlink.tgz": (_tar([_member("ok.txt"), _member(
            "hard", tarfile.LNKTYPE, "../../outside/secret")], ok), "'hard' is a link"),
        "symlink-dir.tgz": (_tar([_member("d", tarfile.SYMTYPE, str(outside)),
                                  _member("d/evil")], ok), "'d' is a link"),
        "fifo.tgz": (_tar([_member("ok.txt"), _member("pipe", tarfile.FIFOTYPE)], ok),
                     "'pipe' is a special file"),
        "device.tgz": (_tar([_member("ok.txt"), _member("dev", tarfile.CHRTYPE)], ok),
                       "'dev' is a special file"),
        "dotdot-deep.tgz": (_tar([_member("ok.txt"), _member("a/./b/../../../evil")], ok),
                            "leaves the dataset folder"),
        "zip-symlink.zip": (zipped.getvalue(), "'link' is a symbolic link"),
    }


def test_links_special_files_and_traversal_in_archives_are_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("secret")
    archives = _evil_archives(outside)
    with FileServer({name: blob for name, (blob, _) in archives.items()}) as srv:
        for name, (blob, message) in archives.items():
            work = tmp_path / "work" / name
            cfg = FetchConfig(sha256=sha256_bytes(blob), retry=FAST, progress=False)
            with pytest.raises(ValueError, match=re.escape(message)):
                fetch(srv.url(name), work / "data", cfg)
            assert not (work / "data").exists()
            assert not (work / "data.partial" / "tree").exists(), name
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    assert (outside / "secret").read_text() == "secret"
    written = {p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("*")}
    assert written == {"outside", "work"}


# ---- listening addresses ------------------------------------------------------------------


def _bind_addresses(commands: str) -> list[str]:
    """Every host a command line asks a server to bind (--host X, -h X, -ip.bind=X)."""
    return re.findall(r"(?:--host[ =]|\s-h\s+|-ip\.bind=)(\S+)", commands)


def test_servers_we_start_bind_loopback_unless_configured(tmp_path: Path) -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    ui = subprocess.run(["make", "-n", "ui"], cwd=REPO, capture_output=True, text=True,
                        check=True).stdout
    assert "mlflow ui" in ui and "dagster dev" in ui
    assert _bind_addresses(ui) == [LOOPBACK, LOOPBACK]
    moved = subprocess.run(["make", "-n", "ui", "UI_HOST=10.1.2.3"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout
    assert _bind_addresses(moved) == ["10.1.2.3", "10.1.2.3"]  # only when configured

    from infra.mlflow_server import MlflowServer
    from infra.process import HOST
    from infra.s3 import S3Store

    assert HOST == LOOPBACK
    mlflow = MlflowServer(tmp_path / "mlflow")
    assert _bind_addresses(" ".join(mlflow._command())) == [LOOPBACK]
    assert mlflow.url.startswith(f"http://{LOOPBACK}:")
    store = S3Store(tmp_path / "s3", access_key="k", secret_key="s")
    if Path(store.weed).is_file():
        command = " ".join(store._command())
        assert _bind_addresses(command) == [LOOPBACK] and f"-ip={LOOPBACK}" in command
    assert store.endpoint_url.startswith(f"http://{LOOPBACK}:")
