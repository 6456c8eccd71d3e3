"""Inference latency and throughput of CRIS on one GPU: reference settings against ours (JSON).

- reference: fp32 weights at batch 1, fp16 autocast at batch 64; NCHW, the grouped
  dynamic convolution, eager: the reference CRIS's settings, the in-run baseline;
- fast: BatchNorm folded, bf16 weights, channels-last, the matmul dynamic convolution,
  reshape-mean pooling (`cris_model.accel.prepare_for_inference`), eager and replayed as a
  CUDA graph (`cris_model.accel.CapturedCall`); --variants times it again with one lever
  off (nofold: BatchNorm kept; avgpool: CLIP's AvgPool2d) or more on (compiled: every
  block through torch.compile, `cris_model.accel.compile_regions`; overlap: the text tower
  on a second CUDA stream), alone or joined with + (compiled+overlap);
- one image, N expressions: the image encoded once and the head run on N phrases (two
  captured graphs), against N single calls.

Agreement: the fast model's logits and masks against the fp32 reference's on the same inputs.
With --profile, the costliest GPU kernels of the fast model at the large batch.

    python bench/infer_latency.py [--preset cris_r50 --batch-size 64 --expressions 8]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from bench_common import emit, failure, machine, save, sync
from train_throughput import PHRASES, top_kernels

from cris_model.accel import CapturedCall, compile_regions, prepare_for_inference
from cris_model.backbone import tokenize
from cris_model.config import get_preset
from cris_model.layers import use_mean_pooling
from cris_model.model import CRIS, build_model

VARIANTS = ("nofold", "avgpool", "compiled", "overlap")  # levers; join with + to combine


def _time_ms(fn: Callable[[], Any], calls: int, blocks: int, device: torch.device) -> float:
    """Median over `blocks` of the mean wall time of `calls` calls, in ms (device synced)."""
    fn()
    sync(device)
    times = []
    for _ in range(blocks):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(device)
        times.append((time.perf_counter() - start) / calls * 1e3)
    return statistics.median(times)


def _inputs(batch: int, size: int, word_len: int, device: torch.device,
            seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 3, size, size, generator=gen).to(device)
    pick = torch.randint(len(PHRASES), (batch,), generator=gen)
    return image, tokenize(PHRASES, word_len)[pick].to(device)


def _reference(preset: str) -> CRIS:
    """fp32, NCHW, grouped conv, AvgPool2d; random weights with BatchNorm statistics that
    are not the identity."""
    torch.manual_seed(0)
    ref = build_model(get_preset(preset, random_init=True, pretrained="",
                                 dynamic_conv="grouped")).eval()
    use_mean_pooling(ref, False)
    for m in ref.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.8, 1.2)
    return ref


def _fast(ref: CRIS, device: torch.device, fold: bool = True, mean_pool: bool = True) -> CRIS:
    """The reference's weights served fast: BatchNorm folded, bf16, channels-last (on a
    GPU), matmul projector, reshape-mean pooling; `fold`/`mean_pool` turn one lever off."""
    fast = copy.deepcopy(ref)
    fast.projector.dynamic_conv = "matmul"
    use_mean_pooling(fast, mean_pool)
    prepare_for_inference(fast, torch.bfloat16, channels_last=device.type == "cuda", fold=fold)
    return fast.to(device)


def _variants(ref: CRIS, name: str, image: torch.Tensor, text: torch.Tensor,
              big: tuple[torch.Tensor, torch.Tensor], args: argparse.Namespace,
              device: torch.device) -> dict[str, Any]:
    """Batch-1 (graphed on a GPU) and large-batch figures of one variant of fast, rounded;
    a variant that fails is reported under `<name>_error` instead."""
    try:
        with torch.inference_mode():
            found = _variant(ref, name, image, text, big, args, device)
    except RuntimeError as e:
        return {f"{name}_error": failure(e)["error"]}
    return {k: round(v, 5) for k, v in found.items()}


def _variant(ref: CRIS, name: str, image: torch.Tensor, text: torch.Tensor,
             big: tuple[torch.Tensor, torch.Tensor], args: argparse.Namespace,
             device: torch.device) -> dict[str, float]:
    """One variant: levers joined by '+' (e.g. compiled+overlap) applied to fast."""
    levers = set(name.split("+"))
    out: dict[str, float] = {}
    model = _fast(ref, device, fold="nofold" not in levers, mean_pool="avgpool" not in levers)
    if "compiled" in levers:
        compile_regions(model)
        start = time.perf_counter()
        model(image, text)
        sync(device)
        out[f"fast_{name}_first_call_s"] = time.perf_counter() - start
        want = _fast(ref, device)(big[0][:16], big[1][:16]).float()
        got = model(big[0][:16], big[1][:16]).float()
        out[f"fast_{name}_vs_fast_logits_rel_error"] = ((got - want).norm()
                                                        / want.norm()).item()
    one = _TwoStreams(model) if "overlap" in levers else model
    b1_ms, large_ms = _time_model(one, image, text, big, args, device)
    out[f"fast_{name}_b1_ms"] = b1_ms
    out[f"fast_{name}_b{args.batch_size}_samples_per_s"] = args.batch_size / large_ms * 1e3
    return out


class _TwoStreams:
    """model(image, text) with the text tower on a second CUDA stream, so that at batch 1,
    where neither tower fills the GPU, the two run side by side (also inside a captured
    graph, as two branches); sequential on the CPU."""

    def __init__(self, model: CRIS) -> None:
        self.model = model
        self.side = torch.cuda.Stream() if torch.cuda.is_available() else None

    def __call__(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        if self.side is None or not image.is_cuda:
            return self.model(image, text)
        main = torch.cuda.current_stream()
        self.side.wait_stream(main)
        with torch.cuda.stream(self.side):
            words = self.model.encode_text(text)
        feats = self.model.encode_image(image)
        main.wait_stream(self.side)
        return self.model.head({**feats, **words})


def _time_model(model: Callable[..., torch.Tensor], image: torch.Tensor, text: torch.Tensor,
                big: tuple[torch.Tensor, torch.Tensor], args: argparse.Namespace,
                device: torch.device) -> tuple[float, float]:
    """(ms of a batch-1 call, graphed on a GPU; ms of a large-batch call)."""
    one = CapturedCall(model, [image, text]) if device.type == "cuda" else model
    b1 = _time_ms(lambda: one(image, text), args.calls, args.blocks, device)
    return b1, _time_ms(lambda: model(*big), max(args.calls // 10, 3), args.blocks, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cris_r50")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--expressions", type=int, default=8)
    parser.add_argument("--calls", type=int, default=50, help="calls per timed block")
    parser.add_argument("--blocks", type=int, default=5, help="timed blocks (median)")
    parser.add_argument("--profile", type=int, default=0, help="profiled fast large-batch calls")
    parser.add_argument("--variants", default="", help="comma list of variants of fast, each "
                        "levers joined by +: nofold, avgpool (that lever off), compiled (every "
                        "block compiled), overlap (text tower on a second stream)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    unknown = {lever for name in filter(None, args.variants.split(","))
               for lever in name.split("+")} - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {', '.join(sorted(unknown))}; choose from "
                     f"{', '.join(VARIANTS)}")
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    config = get_preset(args.preset)
    size, word_len = config.input_size, config.word_len
    ref = _reference(args.preset)
    fast = _fast(ref, device)
    ref = ref.to(device)
    graphs = device.type == "cuda"
    fig: dict[str, Any] = {}
    with torch.inference_mode():
        image, text = _inputs(1, size, word_len, device)
        fig["reference_b1_fp32_ms"] = _time_ms(lambda: ref(image, text), args.calls,
                                               args.blocks, device)
        fig["fast_b1_eager_ms"] = _time_ms(lambda: fast(image, text), args.calls, args.blocks,
                                           device)
        if graphs:
            single = CapturedCall(fast, [image, text])
            fig["fast_b1_graph_ms"] = _time_ms(lambda: single(image, text), args.calls * 4,
                                               args.blocks, device)
        n = args.expressions
        _, texts = _inputs(n, size, word_len, device, seed=1)
        one = (single if graphs else fast)
        fig[f"{n}_single_calls_ms"] = _time_ms(
            lambda: [one(image, texts[i:i + 1]) for i in range(n)], args.calls, args.blocks,
            device)
        encode = CapturedCall(fast.encode_image, [image]) if graphs else fast.encode_image
        feats = encode(image)
        keys = fast.image_keys

        def head(t: torch.Tensor, *maps: torch.Tensor) -> torch.Tensor:
            return fast.head({**dict(zip(keys, maps, strict=True)), **fast.encode_text(t)})

        maps = [feats[k] for k in keys]
        heads = CapturedCall(head, [texts, *maps]) if graphs else head

        def shared() -> torch.Tensor:
            f = encode(image)
            return heads(texts, *[f[k] for k in keys])

        fig[f"1_image_{n}_expressions_ms"] = _time_ms(shared, args.calls, args.blocks, device)
        big_image, big_text = _inputs(args.batch_size, size, word_len, device, seed=2)
        batch_calls = max(args.calls // 10, 3)
        with torch.autocast(device.type, dtype=torch.float16, enabled=graphs):
            ms = _time_ms(lambda: ref(big_image, big_text), batch_calls, args.blocks, device)
        fig[f"reference_b{args.batch_size}_fp16_samples_per_s"] = args.batch_size / ms * 1e3
        ms = _time_ms(lambda: fast(big_image, big_text), batch_calls, args.blocks, device)
        fig[f"fast_b{args.batch_size}_samples_per_s"] = args.batch_size / ms * 1e3
        kernels = (top_kernels(lambda: fast(big_image, big_text), args.profile, device)
                   if args.profile else None)
        want_logits = ref(big_image[:16], big_text[:16]).float()
        got_logits = fast(big_image[:16], big_text[:16]).float()
        rel = ((got_logits - want_logits).norm() / want_logits.norm()).item()
        same = ((want_logits > 0) == (got_logits > 0)).float().mean().item()
    ratios = {
        "b1": fig["reference_b1_fp32_ms"] / fig.get("fast_b1_graph_ms", fig["fast_b1_eager_ms"]),
        f"b{args.batch_size}": fig[f"fast_b{args.batch_size}_samples_per_s"]
        / fig[f"reference_b{args.batch_size}_fp16_samples_per_s"],
        f"{n}_expressions_shared_vs_single": fig[f"1_image_{n}_expressions_ms"]
        / fig[f"{n}_single_calls_ms"],
    }
    result = {
        "bench": "infer_latency", "machine": machine(), "preset": args.preset,
        "input_size": size, "batch_size": args.batch_size, "expressions": n,
        "figures": {k: round(v, 3) for k, v in fig.items()},
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "agreement_vs_fp32": {"logits_rel_error": round(rel, 5),
                              "mask_pixel_agreement": round(same, 5), "samples": 16},
        **({"top_kernels_fast": kernels} if kernels else {}),
    }
    if args.variants:
        del fast
        ref, variants = ref.cpu(), {}
        result["variants"] = variants
        for name in args.variants.split(","):
            if args.out:  # what is measured survives a variant that runs out of time
                save(result, args.out)
            variants.update(_variants(ref, name, image, text, (big_image, big_text), args,
                                      device))
    emit(result, args.out or None)

if __name__ == "__main__":
    main()
