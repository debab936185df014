"""Check and time llmc's low-bit GEMM kernels against cuBLAS on one GPU, in one run.

    python benchmarks/kernels.py [--out DIR] [--shapes small|all]   # on a CUDA machine
    python benchmarks/kernels.py --compile-only                      # any host with Triton

For each linear shape (K in, N out) of SmolLM2-135M, Qwen2.5-0.5B and 7B/70B-class models, and
each batch of rows M in 1, 4, 16, 256, 2048:

1. Correctness first. Each kernel runs on a fresh random ``x`` into an output filled with NaN and
   is compared with its float32 torch reference (``*_reference``): every element written,
   ``|y - ref| / |ref|`` (Frobenius) under 2e-3 (float16 output rounding is 2^-11 per element).
2. Timing, L2-cold without flushing: each variant runs over enough copies of its weights to
   exceed four times the L2 cache (at most 512), back to back in one CUDA graph, timed with CUDA
   events (replays queued back to back, 20 ms of them first, then the median of 9, divided by the
   number of calls). A flush by ``zero_()`` (what
   ``do_bench`` does) leaves L2 full of dirty lines whose write-back is charged to the next
   kernel, and host launch gaps would be charged to small kernels; decode steps replayed from a
   graph over weights that do not stay in L2 have neither. Variants: the llmc kernel (int4 symmetric in groups of 128, 64 where K = 576; FP6 e3m2 and FP4 e2m1
per channel), ``torch.matmul`` in
   float16 and bfloat16 (cuBLAS), and dequantize-then-matmul (llmc's dequantize kernel, then
   cuBLAS float16).
3. Bytes: every byte a kernel must move once (packed weights and scales, x, y); GB/s is bytes
   over time, and "roofline" is that rate over the device-to-device copy rate measured here
   (bytes read plus written, 2 GiB buffers).

Before the table, a sweep of the decode (M = 1) launch shapes on the large shapes (outputs per
program, rows of words per step, warps, programs per SM), each checked against its reference,
picks the shape the table uses (best mean fraction of the roofline), with the portable rules
(``intn_config``, ``fpx_config``, whose defaults were set from it); with ``--no-sweep`` the int4, fp6
and fp4 columns are llmc's own dispatch (``intn_linear`` / ``fpx_linear`` without a launch), which on
an sm_90 GPU includes the Hopper rules (``mma_decode``, ``wgmma_prefill``).

Writes ``kernels.md`` and ``kernels.json`` under ``--out`` (default ``$OUT``, else the current
directory). ``--compile-only`` compiles every kernel variant for sm_80, sm_86, sm_89 and sm_90
with no GPU and prints registers, spills and shared memory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import date
from pathlib import Path

try:  # optional: the GPU parts of this script need Triton, --compile-only too
    import triton
    import triton.language as tl

    @triton.jit
    def _store_one(y_ptr):
        """One float per program: the floor of a launch replayed from a graph."""
        tl.store(y_ptr + tl.program_id(0), 1.0)
except ImportError:
    _store_one = None

ROOT = Path(__file__).resolve().parent.parent
SHAPES = [  # (model, K in, N out)
    ("SmolLM2-135M q/o", 576, 576),
    ("SmolLM2-135M gate/up", 576, 1536),
    ("SmolLM2-135M down", 1536, 576),
    ("Qwen2.5-0.5B q/o", 896, 896),
    ("Qwen2.5-0.5B gate/up", 896, 4864),
    ("Qwen2.5-0.5B down", 4864, 896),
    ("7B q/k/v/o", 4096, 4096),
    ("7B gate/up", 4096, 11008),
    ("7B down", 11008, 4096),
    ("70B gate/up", 8192, 28672),
]
LARGE = ("7B q/k/v/o", "7B gate/up", "7B down", "70B gate/up")
BATCHES = (1, 4, 16, 256, 2048)
TOLERANCE = 2e-3
WARM_SECONDS = 20e-3  # replays before the timed ones (see _timed)
REPLAYS = 9  # timed replays; the median is taken


def compile_only() -> None:
    from llmc.plugins.aot import TARGETS, compile_kernel, kernel_variants

    print(f"{'kernel':30s} " + " ".join(f"{'sm_' + str(t):>22s}" for t in TARGETS))
    failures = 0
    for variant in kernel_variants():
        cells = []
        for capability in TARGETS:
            if capability not in variant.targets:
                cells.append("-")
                continue
            try:
                c = compile_kernel(variant, capability)
                cells.append(f"{c.registers:3d} regs {c.spills}B loc {c.shared // 1024:3d}K")
            except Exception as e:  # noqa: BLE001 - report every target, then fail
                failures += 1
                cells.append(f"FAILED {type(e).__name__}")
        print(f"{variant.name:30s} " + " ".join(f"{c:>22s}" for c in cells))
    if failures:
        sys.exit(f"{failures} compilations failed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    parser.add_argument("--shapes", choices=("small", "all"), default="all")
    parser.add_argument("--compile-only", action="store_true")
    parser.add_argument("--explore", action="store_true",
                        help="check and time many candidate launch shapes per shape and batch (tuning)")
    parser.add_argument("--no-sweep", action="store_true",
                        help="skip the launch-shape sweeps: the table measures the shipped heuristics")
    parser.add_argument("--explore-tc", action="store_true",
                        help="check and time candidate 2-16 row (tensor-core) launches, two passes")
    args = parser.parse_args()
    if args.explore_tc:
        explore_tc(args.out)
        return
    if args.compile_only:
        compile_only()
        return
    if args.explore:
        explore(args.out, SHAPES if args.shapes == "all" else SHAPES[:3])
        return
    run(args.out, SHAPES if args.shapes == "all" else SHAPES[:3], do_sweeps=not args.no_sweep)


def run(out: Path, shapes, do_sweeps: bool = True) -> None:
    import torch
    import triton
    from triton.testing import do_bench

    from llmc.passes.fpx import FORMATS, fpx_quantize
    from llmc.passes.quantize_rtn import rtn_quantize
    from llmc.plugins import fp6_linear as fp
    from llmc.plugins import intn_linear as intn
    from llmc.plugins.splitk import sm_count

    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    sms = sm_count(device)
    torch.manual_seed(0)
    started = time.time()

    def bench(fn) -> float:
        return do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e-3  # seconds

    def timed(make_call, bytes_per_copy: int) -> float:
        return _timed(make_call, bytes_per_copy, props.L2_cache_size)

    copies_of = _copies_of

    # The two ceilings: device-to-device copy (bytes read + written) and a large fp16 product.
    copy_bw = copy_bandwidth(device)
    a = torch.randn(8192, 8192, dtype=torch.float16, device=device)
    matmul_flops = 2 * 8192**3 / bench(lambda: a @ a)
    del a
    print(f"{props.name}, {sms} SMs, L2 {props.L2_cache_size / 2**20:.0f} MiB, torch {torch.__version__}, "
          f"triton {triton.__version__}; copy {copy_bw / 1e9:.0f} GB/s, fp16 matmul {matmul_flops / 1e12:.0f} TFLOP/s",
          flush=True)

    # The floor of one graph node: an empty kernel (one store per program), timed like the table.
    ys = [torch.empty(1056, device=device) for _ in range(512)]
    floor = {g: timed(lambda i, g=g: (lambda: _store_one[(g,)](ys[i])), 1) * 1e6 for g in (1, sms, 8 * sms)}
    del ys
    print("empty-kernel floor (us) by grid: " + " ".join(f"{g}: {t:.2f}" for g, t in floor.items()), flush=True)

    e3m2, e2m1 = FORMATS["e3m2"], FORMATS["e2m1"]

    def make(k: int, n: int):
        weight = torch.randn(n, k, device=device) * 0.02
        group = 128 if k % 128 == 0 else 64  # SmolLM2's 576 inputs take groups of 64
        w_int4 = intn.pack_intn(rtn_quantize(weight, 4, group, symmetric=True))
        w_fp6 = fp.pack_fpx(fpx_quantize(weight, e3m2, None, scale_dtype=torch.float16))
        w_fp4 = fp.pack_fpx(fpx_quantize(weight, e2m1, None, scale_dtype=torch.float16))
        return weight.half(), weight.bfloat16(), w_int4, w_fp6, w_fp4

    def check(name, fn, reference, m, k, n) -> float:
        """Relative error of ``fn`` on a fresh x, into a NaN-poisoned output; raises past tolerance."""
        x = torch.randn(m, k, device=device, dtype=torch.float16)
        y = torch.full((m, n), float("nan"), device=device, dtype=torch.float16)
        fn(x, y)
        torch.cuda.synchronize()
        ref = reference(x).float()
        error = float((y.float() - ref).norm() / ref.norm())
        if not torch.isfinite(y).all() or not error < TOLERANCE:
            raise SystemExit(f"{name} M={m} K={k} N={n}: relative error {error:.2e} or unwritten output")
        return error

    # ---- 1. sweeps of the launch shapes. Candidates were pre-selected without a GPU from the
    # compiled code (instructions per weight in the inner loop, registers, warps per SM; see
    # docs/benchmarks/kernels-rounds.md). Every candidate is checked against its reference first.
    T, F = True, False
    sweeps = {  # name: (shapes, rows M, {format: [launch shape]}, programs per SM)
        "decode-large": ([s for s in shapes if s[0] in LARGE], 1, {
            "int4": [(256, 4, 2, T), (512, 4, 2, T), (1024, 2, 4, T), (256, 4, 2, F), (256, 8, 4, T)],
            "fp6": [(256, 2, 1, T), (512, 1, 2, F), (512, 1, 2, T), (1024, 1, 4, F), (256, 1, 1, T)]},
            (4, 8, 16)),
        "decode-small": ([s for s in shapes if s[0] not in LARGE], 1, {
            "int4": [(64, 4, 1, T), (128, 4, 1, T), (128, 4, 2, T), (256, 4, 2, T), (64, 8, 2, T)],
            "fp6": [(64, 2, 1, T), (128, 2, 1, T), (128, 1, 2, T), (256, 2, 1, T)]},
            (1, 2, 4, 8)),
        "tensor-cores": ([s for s in shapes if s[0] in ("7B gate/up", "70B gate/up")], 16, {
            "int4": [(32, 16, 4), (64, 16, 4), (128, 16, 4), (64, 32, 4), (128, 32, 8), (256, 16, 8)],
            "fp6": [(32, 16, 4), (64, 16, 4), (128, 16, 4), (64, 32, 4), (128, 32, 8), (256, 16, 8)]},
            (1, 2, 4)),
    }
    sweep = []
    best = {}
    if not do_sweeps:
        sweeps = {}
    for sweep_name, (sweep_shapes, m, candidates, per_sm) in sweeps.items():
        for label, k, n in sweep_shapes:
            _, _, w_int4, w_fp6, _ = make(k, n)
            x = torch.randn(m, k, device=device, dtype=torch.float16)
            for fmt_name, w, config_fn, linear, reference in (
                    ("int4", w_int4, intn.intn_config, intn.intn_linear, intn.intn_reference),
                    ("fp6", w_fp6, fp.fpx_config, fp.fpx_linear, fp.fpx_reference)):
                ref = reference(x, w).float()
                weights = copies_of(w)
                for shape, pps in [(c, p) for c in candidates[fmt_name] for p in per_sm]:
                    launch = (*shape[:3], pps, *shape[3:])
                    config = (config_fn(1, w, sms, decode=launch) if m == 1
                              else config_fn(m, w, sms, tensor_cores=launch))
                    y = linear(x, w, config)
                    error = float((y.float() - ref).norm() / ref.norm())
                    if not error < TOLERANCE:
                        raise SystemExit(f"sweep {fmt_name} {config} on {label}: relative error {error:.2e}")
                    seconds = timed(lambda i: (lambda wi=weights(i): linear(x, wi, config)), w.nbytes)
                    sweep.append(dict(sweep=sweep_name, shape=label, format=fmt_name, launch=list(launch),
                                      split=config.split.split, us=seconds * 1e6,
                                      roofline=(w.nbytes + 2 * m * (k + n)) / seconds / copy_bw))
            del w_int4, w_fp6
        print(f"{sweep_name} sweep (M = {m}), fraction of the copy roofline per shape, best four by mean:")
        for fmt_name in candidates:
            scores = {}
            for r in sweep:
                if r["sweep"] == sweep_name and r["format"] == fmt_name:
                    scores.setdefault(tuple(r["launch"]), []).append(r["roofline"])
            ranked = sorted(scores, key=lambda c: -sum(scores[c]) / len(scores[c]))
            best[(sweep_name, fmt_name)] = ranked[0] if ranked else None
            for c in ranked[:4]:
                print(f"  {fmt_name} {'/'.join(map(str, c))}: " + " ".join(f"{v:.2f}" for v in scores[c]), flush=True)

    # The dequantize kernel's block (dequantize-then-matmul is the prefill path).
    _, _, w_int4, w_fp6, _ = make(4096, 11008)
    deq_best = {"int4": intn.DEQUANTIZE_SHAPE, "fp6": fp.DEQUANTIZE_SHAPE_FPX}
    for fmt_name, w, dequantize in (("int4", w_int4, intn.intn_dequantize), ("fp6", w_fp6, fp.fpx_dequantize)):
        if not do_sweeps:
            break
        weights = copies_of(w)
        ref = dequantize(w).float()
        times = {}
        for block in ((64, 16), (128, 8), (256, 8), (256, 4), (512, 4)):
            if not torch.equal(dequantize(w, block=block).float(), ref):
                raise SystemExit(f"dequantize {fmt_name} block {block} differs")
            times[block] = timed(lambda i: (lambda wi=weights(i): dequantize(wi, block=block)), w.nbytes)
        deq_best[fmt_name] = min(times, key=times.get)
        print(f"dequantize {fmt_name} 4096x11008 (us): " + "  ".join(f"{b[0]}/{b[1]}: {t * 1e6:.1f}"
                                                              for b, t in times.items()), flush=True)
    del w_int4, w_fp6

    # ---- 2. correctness and timing per shape and batch
    def intn_call(x, y, w, config):
        if not best:  # llmc's own dispatch, the Hopper rules included
            return intn.intn_linear(x, w, out=y)
        if config is None:  # the portable rules at the swept launch shapes, the dequantize block picked above
            return torch.matmul(x, intn.intn_dequantize(w, block=deq_best["int4"]).t(), out=y)
        return intn.intn_linear(x, w, config, out=y)

    def fpx_call(x, y, w, config):
        if not best:
            return fp.fpx_linear(x, w, out=y)
        if config is None:
            return torch.matmul(x, fp.fpx_dequantize(w, block=deq_best["fp6"]).t(), out=y)
        return fp.fpx_linear(x, w, config, out=y)

    rows = []
    for label, k, n in shapes:
        w16, wbf, w_int4, w_fp6, w_fp4 = make(k, n)
        deq_int4 = intn.intn_dequantize_reference(w_int4).t().contiguous()  # [K, N] float32
        deq_fp6 = fp.fpx_dequantize_reference(w_fp6).t().contiguous()
        deq_fp4 = fp.fpx_dequantize_reference(w_fp4).t().contiguous()
        for m in BATCHES:
            klass = "decode-large" if label in LARGE else "decode-small"  # best[] is empty without sweeps
            cfg_int4 = intn.intn_config(m, w_int4, sms, decode=best.get((klass, "int4")),
                                        tensor_cores=best.get(("tensor-cores", "int4")))
            cfg_fp6 = fp.fpx_config(m, w_fp6, sms, decode=best.get((klass, "fp6")),
                                    tensor_cores=best.get(("tensor-cores", "fp6")))
            cfg_fp4 = fp.fpx_config(m, w_fp4, sms, tensor_cores=best.get(("tensor-cores", "fp6")))
            # name: (call(x, y, weights), weights, reference or None, weight bytes)
            variants = {
                "int4": (lambda x, y, w: intn_call(x, y, w, cfg_int4), w_int4,
                         lambda x: x.float() @ deq_int4, w_int4.nbytes),
                "fp6": (lambda x, y, w: fpx_call(x, y, w, cfg_fp6), w_fp6,
                        lambda x: x.float() @ deq_fp6, w_fp6.nbytes),
                "fp4": (lambda x, y, w: fpx_call(x, y, w, cfg_fp4), w_fp4,
                        lambda x: x.float() @ deq_fp4, w_fp4.nbytes),
                "fp16": (lambda x, y, w: torch.matmul(x, w.t(), out=y), w16,
                         lambda x: x.float() @ w16.float().t(), w16.numel() * 2),
                "bf16": (lambda x, y, w: torch.matmul(x, w.t(), out=y), wbf, None, wbf.numel() * 2),
                "deq+mm int4": (lambda x, y, w: torch.matmul(x, intn.intn_dequantize(w, block=deq_best["int4"]).t(),
                                                             out=y), w_int4,
                                lambda x: x.float() @ deq_int4, w_int4.nbytes),
                "deq+mm fp6": (lambda x, y, w: torch.matmul(x, fp.fpx_dequantize(w, block=deq_best["fp6"]).t(),
                                                            out=y), w_fp6,
                               lambda x: x.float() @ deq_fp6, w_fp6.nbytes),
            }
            xh = torch.randn(m, k, device=device, dtype=torch.float16)
            for name, (call, weights, reference, weight_bytes) in variants.items():
                error = None
                if reference is not None:
                    error = check(name, lambda x, y, call=call, weights=weights: call(x, y, weights),
                                  reference, m, k, n)
                x_in = xh.bfloat16() if name == "bf16" else xh
                y_out = torch.empty(m, n, device=device, dtype=x_in.dtype)
                copy = copies_of(weights)
                seconds = timed(lambda i, call=call, copy=copy, x_in=x_in, y_out=y_out:
                                (lambda wi=copy(i): call(x_in, y_out, wi)), weight_bytes)
                moved = weight_bytes + 2 * m * (k + n)
                rows.append(dict(shape=label, K=k, N=n, M=m, variant=name, us=seconds * 1e6,
                                 gbs=moved / seconds / 1e9, roofline=moved / seconds / copy_bw,
                                 tflops=2 * m * k * n / seconds / 1e12, rel_error=error))
        print(f"  {label} done ({time.time() - started:.0f}s)", flush=True)
        del w16, wbf, w_int4, w_fp6, w_fp4, deq_int4, deq_fp6, deq_fp4
        torch.cuda.empty_cache()

    meta = dict(device=props.name, sms=sms, l2_mib=props.L2_cache_size / 2**20, torch=torch.__version__,
                triton=triton.__version__, copy_gbs=copy_bw / 1e9, matmul_tflops=matmul_flops / 1e12,
                launch_shapes={f"{a}/{b}": list(v) for (a, b), v in best.items() if v},
                dequantize_blocks={k: list(v) for k, v in deq_best.items()}, seconds=time.time() - started,
                empty_kernel_us={str(g): t for g, t in floor.items()})
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels.json").write_text(json.dumps(dict(meta=meta, sweep=sweep, rows=rows), indent=1))
    table = markdown(meta, rows)
    (out / "kernels.md").write_text(table)
    print(table)


def clocks_up(device) -> None:
    """Run the GPU busy for a moment, so that the first timing does not meet idle clocks."""
    import torch

    warm = torch.randn(8192, 8192, dtype=torch.float16, device=device)
    for _ in range(100):
        warm @ warm


def copy_bandwidth(device) -> float:
    """Bytes per second (read plus written) of a device-to-device copy of 2 GiB: the roofline's rate."""
    import torch
    from triton.testing import do_bench

    src = torch.empty(2**30, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    rate = 2 * src.numel() * 2 / (do_bench(lambda: dst.copy_(src), warmup=10, rep=40, return_mode="median") * 1e-3)
    del src, dst
    return rate


def _timed(make_call, bytes_per_copy: int, l2_bytes: int) -> float:
    """Seconds per call of ``make_call(i)()`` cycling over copies of the weights (L2-cold), in a chain of graph
    replays queued back to back.

    After one replay waited for, the graph is queued for at least ``WARM_SECONDS`` (right after other work, the
    float32 reference of a check, the first replays ran up to 10% slower for about half a millisecond, and after
    FP6's reference of 8192x8192 13-14% slower over a 2 ms warm-up; 20 ms removed that), then
    ``REPLAYS`` more with an event after each; the median interval, over the calls. Waiting for each replay
    would charge the host's submission of the next (about 5 us) to its calls: with 3-9 copies of a large
    linear that was 0.3-1.6 us a call."""
    import torch

    copies = max(1, min(512, -(-4 * l2_bytes // bytes_per_copy)))
    calls = [make_call(i) for i in range(copies)]
    calls[0]()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(REPLAYS + 1)]
    events[0].record()
    graph.replay()
    events[1].record()
    events[1].synchronize()
    once = events[0].elapsed_time(events[1]) * 1e-3
    for _ in range(int(-(-WARM_SECONDS // once))):
        graph.replay()
    events[0].record()
    for event in events[1:]:
        graph.replay()
        event.record()
    events[-1].synchronize()
    times = sorted(events[i].elapsed_time(events[i + 1]) * 1e-3 / copies for i in range(REPLAYS))
    del graph, calls
    return times[REPLAYS // 2]


def _checked(call, x, w, ref, shape, what: str):
    """``call(x, y, w)`` into a NaN-poisoned ``y`` of ``shape``, compared with ``ref`` (None: not
    compared): ``y``, or None after printing why the candidate failed or was wrong."""
    import torch

    y = torch.full(shape, float("nan"), device=x.device, dtype=torch.float16)
    try:
        call(x, y, w)
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - report and go on
        print(f"  {what}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
        return None
    if ref is not None:
        error = float((y.float() - ref).norm() / ref.norm())
        if not (torch.isfinite(y).all() and error < TOLERANCE):
            print(f"  {what}: WRONG {error:.2e}", flush=True)
            return None
    return y


def _copies_of(w):
    """A function i -> the i-th copy of ``w`` (a tensor or a packed-weights dataclass)."""
    import dataclasses

    import torch

    cache = {0: w}

    def clone(value):
        if isinstance(value, torch.Tensor):
            return value.clone()
        if isinstance(value, tuple):
            return tuple(clone(v) for v in value)
        return value

    def get(i):
        if i not in cache:
            cache[i] = w.clone() if isinstance(w, torch.Tensor) else dataclasses.replace(
                w, **{f.name: clone(getattr(w, f.name)) for f in dataclasses.fields(w)})
        return cache[i]
    return get


def explore(out: Path, shapes) -> None:
    """Check, then time, candidate launch shapes (and kernel options) per shape and batch; prints
    one line per (shape, M) with every candidate's time and fraction of the copy roofline."""
    import torch

    from llmc.passes.fpx import FORMATS, fpx_quantize
    from llmc.passes.quantize_rtn import rtn_quantize
    from llmc.plugins import fp6_linear as fp
    from llmc.plugins import intn_linear as intn
    from llmc.plugins.splitk import sm_count

    _one = _store_one
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    sms = sm_count(device)
    l2 = props.L2_cache_size
    torch.manual_seed(0)
    copy_bw = copy_bandwidth(device)

    ys = [torch.empty(1056, device=device) for _ in range(512)]
    floor = {g: _timed(lambda i, g=g: (lambda: _one[(g,)](ys[i])), 1, l2) for g in (1, 132, 1056)}
    print(f"copy {copy_bw / 1e9:.0f} GB/s; empty-kernel floor (us) by grid: "
          + " ".join(f"{g}: {t * 1e6:.2f}" for g, t in floor.items()), flush=True)
    e3m2 = FORMATS["e3m2"]
    T, F = True, False
    int4_m1 = [None, (256, 4, 2, 8, T, T), (256, 16, 4, 4, F, T), (128, 16, 4, 4, F, T), (64, 64, 4, 1, T, T),
               (32, 128, 4, 1, F, T), (32, 512, 8, 0.5, F, T), (32, 256, 8, 0.5, T, T), (64, 128, 8, 0.5, F, T),
               (16, 256, 4, 1, F, T), (512, 8, 4, 2, T, T), (128, 32, 4, 2, T, T), (64, 32, 4, 2, F, T),
               # evict-first weight loads (7th field); the 2^25+ winners of the 2026-11-23 A/B runs
               (64, 16, 2, 8, T, T, T), (64, 8, 2, 16, T, T, T), (128, 8, 2, 8, T, T, T), (64, 32, 4, 4, T, T, T),
               (32, 512, 8, 0.5, F, T, T), (256, 4, 2, 8, T, T, T)]
    fp6_m1 = [None, (256, 2, 1, 8, T), (32, 256, 8, 0.5, F), (64, 64, 4, 1, F), (64, 32, 4, 1, T), (128, 16, 4, 2, T),
              (256, 8, 4, 2, F), (32, 128, 8, 0.5, T), (512, 4, 4, 2, F), (16, 128, 4, 1, F), (1024, 1, 4, 8, F),
              (64, 16, 4, 2, F), (128, 8, 4, 4, F), (64, 8, 2, 8, F),
              # round 4: 8 warps on 16 outputs, the small-shape winners
              (16, 128, 8, 1, F), (16, 64, 8, 1, F), (16, 64, 4, 2, F)]
    tc = [None, (64, 32, 4, 2), (128, 16, 4, 2), (32, 16, 4, 8)]
    results = []
    for label, k, n in shapes:
        weight = torch.randn(n, k, device=device) * 0.02
        group = 128 if k % 128 == 0 else 64
        w4 = intn.pack_intn(rtn_quantize(weight, 4, group, symmetric=True))
        w6 = fp.pack_fpx(fpx_quantize(weight, e3m2, None, scale_dtype=torch.float16))
        w16 = weight.half()
        del weight
        for m in (1, 4, 16):
            x = torch.randn(m, k, device=device, dtype=torch.float16)
            moved = lambda wb: wb + 2 * m * (k + n)  # noqa: E731
            cands = [("fp16", None, lambda x, y, w: torch.matmul(x, w.t(), out=y), w16, w16.numel() * 2, None)]
            ref4 = intn.intn_reference(x, w4).float()
            ref6 = fp.fpx_reference(x, w6).float()
            if m == 1:
                for c in int4_m1:
                    cfg = intn.intn_config(1, w4, sms, decode=c)
                    cands.append(("int4", c, lambda x, y, w, cfg=cfg: intn.intn_linear(x, w, cfg, out=y), w4, w4.nbytes, ref4))
                for c in fp6_m1:
                    cfg = fp.fpx_config(1, w6, sms, decode=c)
                    cands.append(("fp6", c, lambda x, y, w, cfg=cfg: fp.fpx_linear(x, w, cfg, out=y), w6, w6.nbytes, ref6))
            else:
                for c in tc[:1] + ([] if m == 4 else tc[1:]):
                    cfg = intn.intn_config(m, w4, sms, tensor_cores=c)
                    cands.append(("int4tc", c, lambda x, y, w, cfg=cfg: intn.intn_linear(x, w, cfg, out=y), w4, w4.nbytes, ref4))
                for c in tc:
                    cfg = fp.fpx_config(m, w6, sms, tensor_cores=c)
                    cands.append(("fp6tc", c, lambda x, y, w, cfg=cfg: fp.fpx_linear(x, w, cfg, out=y), w6, w6.nbytes, ref6))
            line = []
            for name, c, call, w, wbytes, ref in cands:
                y = _checked(call, x, w, ref, (m, n), f"{label} M={m} {name} {c}")
                if y is None:
                    continue
                copy = _copies_of(w)
                seconds = _timed(lambda i, call=call, copy=copy, y=y: (lambda wi=copy(i): call(x, y, wi)), wbytes, l2)
                results.append(dict(shape=label, K=k, N=n, M=m, name=name, cand=c, us=seconds * 1e6,
                                    roofline=moved(wbytes) / seconds / copy_bw))
                line.append(f"{name}{'' if c is None else list(c)}={seconds * 1e6:.1f}/{moved(wbytes) / seconds / copy_bw:.2f}")
            print(f"{label} M={m}: " + "  ".join(line), flush=True)
        del w4, w6, w16
        torch.cuda.empty_cache()
    out.mkdir(parents=True, exist_ok=True)
    (out / "explore.json").write_text(json.dumps(dict(copy_gbs=copy_bw / 1e9, floor_us={str(g): t * 1e6 for g, t in floor.items()},
                                                      results=results), indent=0))


# Round 3 candidates for 2-16 rows: (block_n, block_w, warps, programs per SM[, evict-first[, swap
# (decoded weight as the first operand)[, num_stages]]]); None = the shipped heuristic.
TC_FP6_LARGE = [None, (64, 16, 4, 4, False, False, 2), (64, 16, 4, 4, True, False, 2), (128, 16, 4, 4, True),
                (128, 16, 4, 4, True, False, 2), (64, 16, 4, 8, True, False, 2), (128, 32, 8, 2),
                (128, 32, 8, 2, False, False, 2), (64, 32, 4, 4, True, False, 2)]
TC_INT4_SMALL = [None, (32, 32, 4, 4), (32, 32, 4, 4, False, False, 2), (32, 16, 4, 8, False, False, 2),
                 (64, 16, 4, 8), (64, 16, 4, 8, False, False, 2), (64, 32, 8, 2), (64, 32, 8, 2, False, False, 2),
                 (32, 32, 4, 2), (32, 32, 4, 2, False, False, 2), (64, 16, 4, 8, True)]
TC_FP6_SMALL = [None, (32, 16, 4, 8, False, False, 2), (32, 16, 4, 8, True, False, 2), (64, 16, 4, 4, False, False, 2)]
TC_FP6_70B = [None, (64, 16, 4, 4, False, False, 2), (128, 16, 4, 4, True, False, 2), (128, 16, 4, 4, True)]
TC_INT4_LARGE = [None, (128, 16, 4, 2, False, False, 2), (128, 16, 4, 2, True, False, 2), (128, 16, 4, 4, True, False, 2),
                 (64, 16, 4, 4, False, False, 2), (64, 32, 8, 2, False, False, 2)]

TC_INT4_NARROW = [None, (16, 16, 4, 8), (16, 32, 4, 8), (16, 16, 2, 8), (32, 16, 8, 8), (16, 64, 4, 4),
                  (16, 16, 4, 8, False, False, 2), (32, 16, 4, 8, False, False, 2)]
TC_FP6_NARROW = [None, (16, 16, 4, 8), (16, 16, 4, 8, False, False, 2), (16, 32, 4, 8), (16, 16, 2, 8),
                 (32, 16, 8, 8), (32, 16, 4, 8, False, False, 2)]


def explore_tc(out: Path) -> None:
    """Check, then time (two alternating passes), candidate 2-16 row launches: FP6 on the 7B
    shapes, int4 and FP6 on the small ones, against cuBLAS float16 in the same process."""
    import torch

    from llmc.passes.fpx import FORMATS, fpx_quantize
    from llmc.passes.quantize_rtn import rtn_quantize
    from llmc.plugins import fp6_linear as fp
    from llmc.plugins import intn_linear as intn
    from llmc.plugins.splitk import sm_count

    device = torch.device("cuda")
    sms = sm_count(device)
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    torch.manual_seed(0)
    e3m2 = FORMATS["e3m2"]
    results = []
    started = time.time()
    plan = [(s, ("fp6", TC_FP6_LARGE)) for s in SHAPES if s[0] in LARGE[:3]]
    plan += [(s, ("int4", TC_INT4_SMALL)) for s in SHAPES[:6]]
    if os.environ.get("TC_PLAN") == "c":  # round 4: 16-output blocks and 8 warps on the small shapes
        plan = [(s, ("int4", TC_INT4_NARROW)) for s in SHAPES[:6]] + [(s, ("fp6", TC_FP6_NARROW)) for s in SHAPES[:6]]
    if os.environ.get("TC_PLAN") == "b":  # the second set: 70B FP6, int4 on the large shapes, FP6 small
        plan = [(s, ("fp6", TC_FP6_70B)) for s in SHAPES[-1:]] + [(s, ("int4", TC_INT4_LARGE)) for s in SHAPES[6:]]
        plan += [(s, ("fp6", TC_FP6_SMALL)) for s in SHAPES[:6]]
    for (label, k, n), (fmt, cands) in plan:
        weight = torch.randn(n, k, device=device) * 0.02
        group = 128 if k % 128 == 0 else 64
        if fmt == "int4":
            w = intn.pack_intn(rtn_quantize(weight, 4, group, symmetric=True))
            ref_fn, cfg_fn, lin = intn.intn_reference, intn.intn_config, intn.intn_linear
        else:
            w = fp.pack_fpx(fpx_quantize(weight, e3m2, None, scale_dtype=torch.float16))
            ref_fn, cfg_fn, lin = fp.fpx_reference, fp.fpx_config, fp.fpx_linear
        w16 = weight.half()
        del weight
        for m in (4, 16):
            x = torch.randn(m, k, device=device, dtype=torch.float16)
            ref = ref_fn(x, w).float()
            entries = [("fp16", lambda x, y, wi: torch.matmul(x, wi.t(), out=y), _copies_of(w16), w16.numel() * 2)]
            for c in cands:
                cfg = cfg_fn(m, w, sms, tensor_cores=c)
                call = (lambda x, y, wi, cfg=cfg: lin(x, wi, cfg, out=y))
                if _checked(call, x, w, ref, (m, n), f"{label} M={m} {fmt} {c}") is None:
                    continue
                entries.append((f"{fmt}{'' if c is None else list(c)}", call, _copies_of(w), w.nbytes))
            times = {name: [] for name, *_ in entries}
            for _ in range(int(os.environ.get("TC_PASSES", "2"))):
                for name, call, copy, nbytes in entries:
                    y = torch.empty(m, n, device=device, dtype=torch.float16)
                    times[name].append(_timed(lambda i, call=call, copy=copy, y=y: (lambda wi=copy(i): call(x, y, wi)),
                                              nbytes, l2) * 1e6)
            base = min(times["fp16"])
            ranked = sorted(times, key=lambda t: min(times[t]))
            print(f"{label} M={m} ({time.time() - started:.0f}s): " + "  ".join(
                f"{t}={'/'.join(f'{v:.1f}' for v in times[t])}({base / min(times[t]):.2f}x)" for t in ranked), flush=True)
            results.append(dict(shape=label, K=k, N=n, M=m, times=times))
        del w, w16
        torch.cuda.empty_cache()
    out.mkdir(parents=True, exist_ok=True)
    (out / "explore_tc.json").write_text(json.dumps(results, indent=1))


def markdown(meta: dict, rows: list[dict]) -> str:
    order = ["int4", "fp6", "fp4", "fp16", "bf16", "deq+mm int4", "deq+mm fp6"]
    lines = [
        f"Device: {meta['device']} ({meta['sms']} SMs), torch {meta['torch']}, triton {meta['triton']}; "
        f"measured copy {meta['copy_gbs']:.0f} GB/s, fp16 matmul {meta['matmul_tflops']:.0f} TFLOP/s; "
        f"empty kernel in a graph {', '.join(f'{t:.2f} us at {g} programs' for g, t in meta.get('empty_kernel_us', {}).items())}; "
        f"date {date.today().isoformat()}.",
        "",
        (f"Launch shapes picked by the sweeps: {meta['launch_shapes']}; dequantize blocks "
         f"{meta['dequantize_blocks']}." if meta["launch_shapes"] else
         "Launch shapes: llmc's own dispatch (intn_linear, fpx_linear without a launch)."),
        "",
        "Time per call in microseconds (L2-cold: weights cycled over copies exceeding 4x L2, calls "
        f"replayed from a CUDA graph back to back, median of {REPLAYS} after {WARM_SECONDS * 1e3:g} ms of them); in brackets "
        "the fraction of the copy roofline "
        "(bytes moved / time / copy rate). int4, fp6 and fp4 are the kernels llmc's rules pick for the "
        "shape, the rows and this GPU (the Hopper rules included on sm_90; dequantize-then-cuBLAS where "
        "the rules say so).",
        "",
        "| shape (K→N) | M | " + " | ".join(order) + " | best llmc vs fp16 |",
        "|---|---|" + "---|" * len(order) + "---|",
    ]
    keyed = {(r["shape"], r["M"], r["variant"]): r for r in rows}
    shapes = list(dict.fromkeys((r["shape"], r["K"], r["N"]) for r in rows))
    for shape, k, n in shapes:
        for m in BATCHES:
            cells = []
            for v in order:
                r = keyed.get((shape, m, v))
                cells.append("" if r is None else f"{r['us']:.1f} ({r['roofline']:.2f})")
            fp16 = keyed[(shape, m, "fp16")]["us"]
            llmc = min(keyed[(shape, m, v)]["us"] for v in ("int4", "fp6"))
            lines.append(f"| {shape} ({k}→{n}) | {m} | " + " | ".join(cells) + f" | {fp16 / llmc:.2f}x |")
    errors = [r["rel_error"] for r in rows if r["rel_error"] is not None]
    lines += ["", f"Largest relative error against the float32 references: {max(errors):.2e} "
              f"(tolerance {TOLERANCE}); every output element written (NaN-poisoned before each check)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
