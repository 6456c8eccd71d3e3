"""bench/feature_loader_throughput.py end to end on cris_tiny: its JSON, and the bytes a
float16 cache saves the loader (exactly half the float32 feature bytes)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from bench_support import run_bench
from safetensors import safe_open

_DTYPE_BYTES = {"F16": 2, "F32": 4, "BOOL": 1}


def _row_bytes(cache: Path) -> dict[str, int]:
    """Bytes of one cache row per stored dtype (F16, BOOL, ...), from the shard's shapes."""
    meta = json.loads((cache / "meta.json").read_text())
    out: dict[str, int] = {}
    with safe_open(str(cache / meta["shards"][0]), framework="pt") as f:
        for name in f.keys():
            part = f.get_slice(name)
            kind = part.get_dtype()
            out[kind] = out.get(kind, 0) + math.prod(part.get_shape()[1:]) * _DTYPE_BYTES[kind]
    return out


def test_bench_reports_rates_and_half_the_bytes_for_float16(tmp_path: Path) -> None:
    data = tmp_path / "data"
    result = run_bench("feature_loader_throughput", "--preset", "cris_tiny", "--images", "8",
                       "--workers", "0,1", "--samples", "48", "--batch-size", "8", "--seconds",
                       "0.5", "--profile-items", "4", "--data-dir", str(data),
                       out=tmp_path / "result.json")
    assert result["machine"]["cpu_count"] >= 1 and result["cache"]["dtype"] == "float16"
    runs = {(r["storage"], r["items"], r["workers"]): r for r in result["throughput"]}
    assert set(runs) == {(s, i, w) for s in ("ram", "mmap") for i in ("kept", "float32")
                         for w in (0, 1)}
    for run in runs.values():
        assert run["samples_per_s"] > 0 and run["feature_gb_per_s"] > 0
        assert run["samples"] == run["batches"] * 8 and not run["pin_memory"]
    for storage in ("ram", "mmap"):
        ms = result["per_sample_ms"][storage]
        assert min(ms[k] for k in ("read_features", "letterbox_mask", "collate",
                                   "copy_into_reused")) > 0
        assert ms["float32_total"] > ms["kept_total"] > 0

    size = result["cache"]["input_size"]
    cache = data / "features" / result["cache"]["key"] / "train"
    row = _row_bytes(cache)
    assert set(row) == {"F16", "BOOL"}
    other = row["BOOL"] + size * size * 4 + 3 * 8  # pad mask, float32 mask, three int64 ids
    kept, wide = result["bytes_per_sample"]["kept"], result["bytes_per_sample"]["float32"]
    assert kept == {"features": row["F16"], "other": other, "total": row["F16"] + other}
    assert wide["features"] == 2 * kept["features"] and wide["other"] == other
    assert runs[("mmap", "float32", 1)]["bytes_per_sample"] == wide
    summary = result["summary"]
    assert summary["target_samples_per_s"] == 754.5
    assert summary["ram_kept_cores_for_target"] >= 1
    assert summary["mmap_float32_one_worker_workers_for_target"] >= 1
    assert summary["best"]["samples_per_s"] == max(r["samples_per_s"] for r in runs.values())
