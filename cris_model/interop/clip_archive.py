"""OpenAI CLIP TorchScript archives (RN50.pt, RN101.pt, ViT-B-16.pt) read as plain tensors.

A TorchScript `.pt` is a zip: `<name>/data.pkl` pickles the module tree (its attributes,
with tensors pointing at raw storages `<name>/data/<key>`), and `<name>/code/` holds the
modules' TorchScript source. Nothing here runs or compiles any of it, and torch.jit.load is
never called:

- data.pkl goes through an unpickler that resolves only a fixed list of names, each to a
  function of this module: tensor rebuilding (a strided view of bytes read from the zip),
  storage type names (a dtype), OrderedDict, TorchScript's list-building identities, and
  the archive's own `__torch__.*` classes, which become inert attribute holders. Any other
  global is refused.
- code/ is read as text only, for each class's `__parameters__` and `__buffers__` lists, so
  the result is exactly the module's state_dict() (plain tensor attributes such as a cached
  attention mask are not weights). OpenAI's three configuration scalars
  (`input_resolution`, `context_length`, `vocab_size`) are dropped, as open_clip does.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from cris_model.atomic import staged_file
from cris_model.backbone import create_clip
from cris_model.config import get_preset
from cris_model.data.fetch_checksums import sha256_file
from cris_model.interop.state_check import state_mismatch
from cris_model.tracking import first_line

OPENAI_PRESETS = ("cris_r50", "cris_r101", "cris_vit_b16")  # presets built on OpenAI's CLIPs
OPENAI_SCALARS = ("input_resolution", "context_length", "vocab_size")  # config, not weights
_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "DoubleStorage": torch.float64,
    "LongStorage": torch.int64, "IntStorage": torch.int32, "ShortStorage": torch.int16,
    "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
_LIST_BUILDERS = ("build_intlist", "build_doublelist", "build_boollist", "build_tensorlist",
                  "restore_type_tag")
ELSEWHERE = ("convert it where you trust the file: python -c \"import torch, safetensors.torch "
             "as s; m = torch.jit.load('FILE', map_location='cpu'); s.save_file({k: "
             "v.contiguous() for k, v in m.state_dict().items()}, 'OUT.safetensors')\"")


class Refused(pickle.UnpicklingError):
    """The archive needs more than this reader admits: reading it would mean running code."""


class ScriptObject:
    """An archive's `__torch__.*` object: its class name and pickled attributes, inert."""

    qualname = ""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise Refused(f"{self.qualname} has non-dict state")
        self.attributes = state


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: tuple, stride: tuple,
                    *_: Any) -> torch.Tensor:
    """A strided view of a flat storage tensor (what torch's _rebuild_tensor_v2 builds)."""
    if not isinstance(storage, torch.Tensor):
        raise Refused("tensor without a storage")
    try:
        return storage.as_strided(tuple(size), tuple(stride), int(offset))
    except (RuntimeError, TypeError, ValueError) as e:
        raise pickle.UnpicklingError(f"tensor outside its storage ({first_line(e)})") from e


def _rebuild_parameter(data: torch.Tensor, *_: Any) -> torch.Tensor:
    return data


def _identity(value: Any, *_: Any) -> Any:
    return value


class _ArchiveUnpickler(pickle.Unpickler):
    """Resolves only the names a TorchScript data.pkl of tensors needs (see module doc)."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(archive.open(f"{prefix}data.pkl"))
        self._archive, self._prefix = archive, prefix
        self._storages: dict[str, torch.Tensor] = {}
        self._classes: dict[str, type[ScriptObject]] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            qualname = f"{module}.{name}"
            if qualname not in self._classes:
                self._classes[qualname] = type(name, (ScriptObject,), {"qualname": qualname})
            return self._classes[qualname]
        allowed: dict[tuple[str, str], Callable[..., Any]] = {
            ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
            ("collections", "OrderedDict"): OrderedDict,
            **{("torch.jit._pickle", n): _identity for n in _LIST_BUILDERS},
        }
        if (module, name) in allowed:
            return allowed[(module, name)]
        if module == "torch" and name in _DTYPES:
            return _DTYPES[name]
        raise Refused(f"refers to {module}.{name}, which is not plain tensor data")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], torch.dtype)):
            raise Refused(f"unknown persistent id {str(pid)[:80]}")
        _, dtype, key, _location, numel = pid
        if key not in self._storages:
            raw = self._archive.read(f"{self._prefix}data/{key}")
            itemsize = torch.empty((), dtype=dtype).element_size()
            if len(raw) != int(numel) * itemsize:
                raise pickle.UnpicklingError(f"storage {key} holds {len(raw)} bytes, "
                                             f"expected {int(numel) * itemsize}")
            self._storages[key] = (torch.frombuffer(bytearray(raw), dtype=dtype) if raw
                                   else torch.empty(0, dtype=dtype))
        return self._storages[key]


def _prefix(archive: zipfile.ZipFile) -> str | None:
    """`<name>/` of a TorchScript archive (data.pkl beside a code/ folder), else None."""
    names = archive.namelist()
    for entry in names:
        if entry.endswith("/data.pkl") and entry.count("/") == 1:
            prefix = entry[: -len("data.pkl")]
            if any(n.startswith(prefix + "code/") for n in names):
                return prefix
    return None


def is_torchscript_archive(path: Path) -> bool:
    """Whether `path` is a TorchScript zip (a pickled module tree with its code/)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return _prefix(archive) is not None
    except (zipfile.BadZipFile, OSError):
        return False


def _declared(archive: zipfile.ZipFile, prefix: str, qualname: str) -> set[str]:
    """Names a class's TorchScript source lists in `__parameters__` and `__buffers__`,
    found by reading code/<module path>.py as text."""
    module, _, name = qualname.rpartition(".")
    source = f"{prefix}code/{module.replace('.', '/')}.py"
    try:
        text = archive.read(source).decode("utf-8")
    except (KeyError, UnicodeDecodeError) as e:
        raise Refused(f"no readable source {source} for class {qualname}") from e
    block = re.search(rf"^class {re.escape(name)}\(Module\):\n((?:[ \t].*\n?)*)", text, re.M)
    if block is None:
        raise Refused(f"{source} declares no module class {name}")
    lists = re.findall(r"^\s+__(?:parameters|buffers)__ = \[(.*)\]", block.group(1), re.M)
    return {n for item in lists for n in re.findall(r'"([^"]+)"', item)}


def _flatten(obj: ScriptObject, archive: zipfile.ZipFile, prefix: str) -> dict[str, torch.Tensor]:
    """The state dict of a module tree: declared parameters and buffers holding tensors."""
    out: dict[str, torch.Tensor] = {}
    declared: dict[str, set[str]] = {}
    stack: list[tuple[str, ScriptObject]] = [("", obj)]
    while stack:
        path, node = stack.pop()
        if node.qualname not in declared:
            declared[node.qualname] = _declared(archive, prefix, node.qualname)
        weights = declared[node.qualname]
        for attr, value in getattr(node, "attributes", {}).items():
            if isinstance(value, ScriptObject):
                stack.append((f"{path}{attr}.", value))
            elif attr in weights and isinstance(value, torch.Tensor):
                out[path + attr] = value
    return out


def read_clip_archive(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a TorchScript CLIP archive, running none of its code; OpenAI's
    configuration scalars left out. ValueError naming the file on anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: CLIP archive not found")
    try:
        with zipfile.ZipFile(path) as archive:
            prefix = _prefix(archive)
            if prefix is None:
                raise ValueError("not a TorchScript archive (no <name>/data.pkl with code/)")
            order = archive.read(f"{prefix}byteorder").decode() if (
                f"{prefix}byteorder" in archive.namelist()) else "little"
            if order.strip() != "little":
                raise ValueError(f"tensors stored {order.strip()}-endian")
            root = _ArchiveUnpickler(archive, prefix).load()
            if not isinstance(root, ScriptObject):
                raise ValueError("data.pkl does not hold a module")
            state = _flatten(root, archive, prefix)
    except Refused as e:
        raise ValueError(f"{path}: cannot be read without running code ({e}); "
                         f"{ELSEWHERE}") from e
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError, KeyError,
            ValueError, TypeError, IndexError, AttributeError) as e:
        raise ValueError(f"{path}: unreadable CLIP archive ({first_line(e)})") from e
    if not state:
        raise ValueError(f"{path}: the archive declares no weights")
    return {k: v.clone(memory_format=torch.contiguous_format) for k, v in state.items()
            if k not in OPENAI_SCALARS}


def _clip_state(preset: str) -> dict[str, torch.Tensor]:
    """The open_clip state dict (meta tensors: names and shapes only) of a preset's CLIP."""
    config = get_preset(preset)
    with torch.device("meta"):
        return create_clip(config.clip_model, config.clip_config, "", True).state_dict()


def fitting_preset(state: dict[str, torch.Tensor], path: Path, preset: str | None = None) -> str:
    """The preset whose CLIP these weights fit exactly: `preset` when given, else the first
    of OPENAI_PRESETS that fits; ValueError naming the file and the mismatch otherwise."""
    problems = []
    for name in (preset,) if preset else OPENAI_PRESETS:
        problem = state_mismatch(_clip_state(name), state)
        if problem is None:
            return name
        problems.append(f"{name}: {problem}")
    raise ValueError(f"{path}: weights fit no CLIP of {'; '.join(problems)} "
                     "(name the preset with --preset)")


def convert_clip_archive(path: Path, out: Path, preset: str | None = None) -> dict[str, Any]:
    """Write the weights of a TorchScript CLIP archive as a safetensors file `out` (usable
    as `model.pretrained`), once checked to fit the CLIP of `preset` (default: whichever of
    OPENAI_PRESETS fits). -> {source, sha256, out, preset, clip_model, tensors}."""
    path, out = Path(path), Path(out)
    state = read_clip_archive(path)
    name = fitting_preset(state, path, preset)
    digest = sha256_file(path)
    with staged_file(out) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "source": path.name,
                                             "source_sha256": digest})
    return {"source": str(path), "sha256": digest, "out": str(out), "preset": name,
            "clip_model": get_preset(name).clip_model or "inline", "tensors": len(state)}
