"""Load on a served model: concurrent clients, every answer checked against its serial answer.

Starts `mlflow models serve` (infra/scoring_server.py) on loopback for a registered model,
sends each request of a small set alone (its serial answer), then lets 1, 4 and 8 clients
send one-row requests (an image and its phrase, `dataframe_split`) all at once, and counts
the answers that differ from the serial one (wrong) and the non-200 answers (errors).
Prints requests/s and p50/p95 latency per client count as one JSON line.

    .venv/bin/python bench/serve_load.py                     # random-init cris_tiny, synth images
    .venv/bin/python bench/serve_load.py --tracking-uri sqlite:///$PWD/demo/mlflow.db \\
        --data demo/assets/prepared          # the demo's champion (an absolute store path)
"""

from __future__ import annotations

import argparse
import base64
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench_common import emit, machine

from infra.process import started
from infra.scoring_server import ScoringServer, invoke

MAX_ERRORS_KEPT = 3  # error messages a result keeps (the first ones)


def payloads(data_dir: Path, count: int) -> list[dict[str, Any]]:
    """`count` one-row requests: (image, phrase) pairs of the prepared val split, one per image,
    the image sizes taking turns so that a mix-up shows in the mask's shape too."""
    from cris_model.data.dataset import open_split

    rows, image_dir = open_split(data_dir, "val")
    firsts = rows.drop_duplicates("image_id")
    rank = firsts.groupby(["height", "width"]).cumcount()  # sizes take turns
    firsts = firsts.assign(_rank=rank).sort_values(["_rank", "height", "width"], kind="stable")
    out = []
    for _, row in firsts.head(count).iterrows():
        encoded = base64.b64encode((image_dir / str(row["file_name"])).read_bytes()).decode()
        out.append({"dataframe_split": {"columns": ["image", "text"],
                                        "data": [[encoded, str(row["sentence"])]]}})
    if len(out) < count:
        raise ValueError(f"{data_dir}: val has {len(out)} images, {count} requests asked for")
    return out


def serial_answers(url: str, requests: list[dict[str, Any]]) -> list[Any]:
    """Each request's answer when it is the only one in flight; RuntimeError unless 200."""
    answers = []
    for i, payload in enumerate(requests):
        status, body = invoke(url, payload)
        if status != 200:
            raise RuntimeError(f"request {i} alone: HTTP {status}: {body.get('message', body)}")
        answers.append(body["predictions"])
    return answers


def load(url: str, requests: list[dict[str, Any]], expected: list[Any], clients: int,
         per_client: int) -> dict[str, Any]:
    """`clients` threads, released together, each sending `per_client` requests in turn
    (client c starts at request c); -> counts, requests/s and latency percentiles."""
    start = threading.Barrier(clients)
    lock = threading.Lock()
    latencies: list[float] = []
    wrong, errors = 0, []

    def client(c: int) -> None:
        nonlocal wrong
        start.wait()
        for r in range(per_client):
            k = (c + r) % len(requests)
            tick = time.perf_counter()
            status, body = invoke(url, requests[k])
            took = time.perf_counter() - tick
            with lock:
                latencies.append(took)
                if status != 200:
                    errors.append(f"HTTP {status}: {str(body.get('message', body))[-300:]}")
                elif body["predictions"] != expected[k]:
                    wrong += 1

    tick = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    seconds = time.perf_counter() - tick
    ms = sorted(1000 * t for t in latencies)
    return {"clients": clients, "requests": len(ms), "seconds": round(seconds, 3),
            "requests_per_s": round(len(ms) / seconds, 2),
            "p50_ms": round(statistics.median(ms), 1),
            "p95_ms": round(ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))], 1),
            "wrong": wrong, "errors": len(errors), "first_errors": errors[:MAX_ERRORS_KEPT]}


def _tiny_champion(root: Path) -> tuple[str, Path]:
    """(tracking URI, prepared data) with a random-init cris_tiny as models:/cris@champion."""
    import torch

    from cris_model.checkpoint import save_checkpoint
    from cris_model.config import get_preset
    from cris_model.data.manifest import prepare_dataset
    from cris_model.data.synth import generate
    from cris_model.model import build_model
    from cris_model.registry import RegistryConfig, promote, register

    generate(root / "raw", images=40, seed=0)
    prepare_dataset(root / "raw", "refcoco", "unc", root / "data")
    torch.manual_seed(0)
    model = build_model(get_preset("cris_tiny", random_init=True)).eval()
    ckpt = save_checkpoint(root / "best", model, metrics={"mIoU": 0.0})
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = RegistryConfig(model_name="cris", tracking_uri=uri)
    register(ckpt, cfg, dataset="synth")
    promote(cfg)
    return uri, root / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-uri", default="models:/cris@champion")
    parser.add_argument("--tracking-uri", default="",
                        help="registry holding --model-uri ('' = register a random-init "
                             "cris_tiny in a temporary SQLite store and serve that)")
    parser.add_argument("--data", default="", help="prepared data whose val images to send "
                        "(default: the temporary store's synthetic data)")
    parser.add_argument("--clients", default="1,4,8", help="client counts, comma-separated")
    parser.add_argument("--requests", type=int, default=25, help="requests per client")
    parser.add_argument("--distinct", type=int, default=6, help="distinct requests in the mix")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cris-serve-load-") as tmp:
        uri, data = args.tracking_uri, Path(args.data) if args.data else None
        if not uri:
            uri, made = _tiny_champion(Path(tmp))
            data = data or made
        if data is None:
            sys.exit("serve_load: --data is needed with --tracking-uri")
        requests = payloads(data, args.distinct)
        server = ScoringServer(Path(tmp) / "server", args.model_uri, uri)
        with started(server):
            expected = serial_answers(server.url, requests)
            runs = [load(server.url, requests, expected, int(c), args.requests)
                    for c in args.clients.split(",")]
            alive = serial_answers(server.url, requests[:1]) == expected[:1]
    emit({"benchmark": "serve_load", "machine": machine(), "model_uri": args.model_uri,
          "tracking_uri": args.tracking_uri or "temporary random-init cris_tiny",
          "distinct_requests": len(requests), "requests_per_client": args.requests,
          "runs": runs, "server_alive_after": alive}, args.out)


if __name__ == "__main__":
    main()
