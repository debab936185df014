"""Check and time llmc's low-bit GEMM kernels against cuBLAS on one GPU, in one run.

    python benchmarks/kernels.py [--out DIR] [--shapes small|all]   # on a CUDA machine
    python benchmarks/kernels.py --compile-only                      # any host with Triton

For each linear shape (K in, N out) of SmolLM2-135M, Qwen2.5-0.5B and 7B/70B-class models, and
each batch of rows M in 1, 4, 16, 256, 2048:

1. Correctness first. Each kernel runs on a fresh random ``x`` into an output filled with NaN and
   is compared with its float32 torch reference (``*_reference``): every element written,
   ``|y - ref| / |ref|`` (Frobenius) under 2e-3 (float16 output rounding is 2^-11 per element).
2. Timing: ``triton.testing.do_bench`` (CUDA events, L2 flushed before every run, median) of
   the llmc kernel (int4 symmetric in groups of 128, 64 where K = 576; FP6 e3m2 and FP4 e2m1
per channel), ``torch.matmul`` in
   float16 and bfloat16 (cuBLAS), and dequantize-then-matmul (llmc's dequantize kernel, then
   cuBLAS float16).
3. Bytes: every byte a kernel must move once (packed weights and scales, x, y); GB/s is bytes
   over time, and "roofline" is that rate over the device-to-device copy rate measured here
   (bytes read plus written, 2 GiB buffers).

Before the table, a sweep of the decode (M = 1) launch shapes on the large shapes (block of
outputs, rows of words per step, warps, pipeline stages, programs per SM; and the tensor-core
kernel at 16 rows) prints the best three per shape; the heuristics in ``intn_config`` and
``fpx_config`` were set from it.

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


def compile_only() -> None:
    from llmc.plugins.aot import TARGETS, compile_kernel, kernel_variants

    print(f"{'kernel':30s} " + " ".join(f"{'sm_' + str(t):>22s}" for t in TARGETS))
    failures = 0
    for variant in kernel_variants():
        cells = []
        for capability in TARGETS:
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
    args = parser.parse_args()
    if args.compile_only:
        compile_only()
        return
    run(args.out, SHAPES if args.shapes == "all" else SHAPES[:3])


def run(out: Path, shapes) -> None:
    import torch
    import triton
    from triton.testing import do_bench

    from llmc.passes.fpx import FORMATS, fpx_quantize
    from llmc.passes.quantize_rtn import rtn_quantize
    from llmc.plugins import fp6_linear as fp
    from llmc.plugins import intn_linear as intn
    from llmc.plugins.splitk import choose_split, sm_count

    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    sms = sm_count(device)
    torch.manual_seed(0)
    started = time.time()

    def bench(fn) -> float:
        return do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e-3  # seconds

    # The two ceilings: device-to-device copy (bytes read + written) and a large fp16 product.
    src = torch.empty(2**30, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    copy_bw = 2 * src.numel() * 2 / bench(lambda: dst.copy_(src))
    del src, dst
    a = torch.randn(8192, 8192, dtype=torch.float16, device=device)
    matmul_flops = 2 * 8192**3 / bench(lambda: a @ a)
    del a
    print(f"{props.name}, {sms} SMs, L2 {props.L2_cache_size / 2**20:.0f} MiB, torch {torch.__version__}, "
          f"triton {triton.__version__}; copy {copy_bw / 1e9:.0f} GB/s, fp16 matmul {matmul_flops / 1e12:.0f} TFLOP/s",
          flush=True)

    e3m2, e2m1 = FORMATS["e3m2"], FORMATS["e2m1"]

    def make(k: int, n: int):
        weight = torch.randn(n, k, device=device) * 0.02
        group = 128 if k % 128 == 0 else 64  # SmolLM2's 576 inputs take groups of 64
        w_int4 = intn.pack_intn(rtn_quantize(weight, 4, group, symmetric=True))
        w_fp6 = fp.pack_fpx(fpx_quantize(weight, e3m2, fp.fpx_tile(k, None), scale_dtype=torch.float16))
        w_fp4 = fp.pack_fpx(fpx_quantize(weight, e2m1, fp.fpx_tile(k, None), scale_dtype=torch.float16))
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

    # ---- 1. sweep the decode (M = 1) launch shape on the large shapes
    sweep = []
    gemv_shapes = {fmt_name: [(bn, bw, warps, stages) for bn in (128, 256) for bw in block_ws
                              for warps in (4, 8) for stages in (1, 3)]
                   for fmt_name, block_ws in (("int4", (16, 32)), ("fp6", (8, 16)))}
    for label, k, n in [s for s in shapes if s[0] in LARGE]:
        _, _, w_int4, w_fp6, _ = make(k, n)
        x = torch.randn(1, k, device=device, dtype=torch.float16)
        for fmt_name, w, config_cls, linear, rows in (
                ("int4", w_int4, intn.IntNConfig, intn.intn_linear, k // 8),
                ("fp6", w_fp6, fp.FpxConfig, fp.fpx_linear, k // 16)):
            candidates = [(1, bn, bw, warps, stages, pps) for bn, bw, warps, stages in gemv_shapes[fmt_name]
                          for pps in (2, 4, 8)]
            candidates += [(16, bn, 16, 4, 3, pps) for bn in (32, 64) for pps in (1, 2, 4)]  # tensor cores
            for block_m, bn, bw, warps, stages, pps in candidates:
                block_rows = bw if block_m == 1 else 16
                tc_rows = k // 16 if fmt_name == "fp6" else k // 8
                split = choose_split(-(-n // bn), rows if block_m == 1 else tc_rows, block_rows, pps * sms)
                config = config_cls(block_m, bn, bw, warps, stages, split)
                try:
                    seconds = bench(lambda: linear(x, w, config))
                except Exception as e:  # noqa: BLE001 - a launch shape that does not fit (registers, smem)
                    print(f"  skip {fmt_name} {config}: {type(e).__name__}")
                    continue
                sweep.append(dict(shape=label, format=fmt_name, block_m=block_m, block_n=bn, block_w=bw,
                                  warps=warps, stages=stages, programs_per_sm=pps, split=split.split,
                                  us=seconds * 1e6, roofline=(w.nbytes + 2 * (k + n)) / seconds / copy_bw))
        del w_int4, w_fp6
    print("decode (M = 1) launch sweep, best per shape (fraction of copy roofline):")
    for label in dict.fromkeys(r["shape"] for r in sweep):
        for fmt_name in ("int4", "fp6"):
            mine = sorted((r for r in sweep if r["shape"] == label and r["format"] == fmt_name),
                          key=lambda r: -r["roofline"])
            top = ", ".join(f"{r['roofline']:.2f} m{r['block_m']} n{r['block_n']} w{r['block_w']} "
                            f"warps{r['warps']} st{r['stages']} pps{r['programs_per_sm']} split{r['split']}"
                            for r in mine[:3])
            print(f"  {label:14s} {fmt_name}: {top}", flush=True)

    # ---- 2. correctness and timing per shape and batch
    rows = []
    for label, k, n in shapes:
        w16, wbf, w_int4, w_fp6, w_fp4 = make(k, n)
        deq_int4 = intn.intn_dequantize_reference(w_int4).t().contiguous()  # [K, N] float32
        deq_fp6 = fp.fpx_dequantize_reference(w_fp6).t().contiguous()
        deq_fp4 = fp.fpx_dequantize_reference(w_fp4).t().contiguous()
        for m in BATCHES:
            cfg_int4 = intn.intn_config(m, w_int4, sms)
            cfg_fp6 = fp.fpx_config(m, w_fp6, sms)
            cfg_fp4 = fp.fpx_config(m, w_fp4, sms)
            variants = {
                "int4": (lambda x, y: intn.intn_linear(x, w_int4, cfg_int4, out=y), lambda x: x.float() @ deq_int4,
                         w_int4.nbytes),
                "fp6": (lambda x, y: fp.fpx_linear(x, w_fp6, cfg_fp6, out=y), lambda x: x.float() @ deq_fp6,
                        w_fp6.nbytes),
                "fp4": (lambda x, y: fp.fpx_linear(x, w_fp4, cfg_fp4, out=y), lambda x: x.float() @ deq_fp4,
                        w_fp4.nbytes),
                "fp16": (lambda x, y: torch.matmul(x, w16.t(), out=y), lambda x: x.float() @ w16.float().t(),
                         w16.numel() * 2),
                "bf16": (lambda x, y: y.copy_(torch.matmul(x.bfloat16(), wbf.t())), None, wbf.numel() * 2),
                "deq+mm int4": (lambda x, y: torch.matmul(x, intn.intn_dequantize(w_int4).t(), out=y),
                                lambda x: x.float() @ deq_int4, w_int4.nbytes),
                "deq+mm fp6": (lambda x, y: torch.matmul(x, fp.fpx_dequantize(w_fp6).t(), out=y),
                               lambda x: x.float() @ deq_fp6, w_fp6.nbytes),
            }
            xh = torch.randn(m, k, device=device, dtype=torch.float16)
            xb = xh.bfloat16()
            yh = torch.empty(m, n, device=device, dtype=torch.float16)
            for name, (fn, reference, weight_bytes) in variants.items():
                error = check(name, fn, reference, m, k, n) if reference is not None else None
                if name == "bf16":
                    seconds = bench(lambda: torch.matmul(xb, wbf.t()))
                else:
                    seconds = bench(lambda: fn(xh, yh))
                moved = weight_bytes + 2 * m * (k + n)
                rows.append(dict(shape=label, K=k, N=n, M=m, variant=name, us=seconds * 1e6,
                                 gbs=moved / seconds / 1e9, roofline=moved / seconds / copy_bw,
                                 tflops=2 * m * k * n / seconds / 1e12, rel_error=error))
        print(f"  {label} done ({time.time() - started:.0f}s)", flush=True)
        del w16, wbf, w_int4, w_fp6, w_fp4, deq_int4, deq_fp6, deq_fp4
        torch.cuda.empty_cache()

    meta = dict(device=props.name, sms=sms, l2_mib=props.L2_cache_size / 2**20, torch=torch.__version__,
                triton=triton.__version__, copy_gbs=copy_bw / 1e9, matmul_tflops=matmul_flops / 1e12,
                seconds=time.time() - started)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels.json").write_text(json.dumps(dict(meta=meta, sweep=sweep, rows=rows), indent=1))
    table = markdown(meta, rows)
    (out / "kernels.md").write_text(table)
    print(table)


def markdown(meta: dict, rows: list[dict]) -> str:
    order = ["int4", "fp6", "fp4", "fp16", "bf16", "deq+mm int4", "deq+mm fp6"]
    lines = [
        f"Device: {meta['device']} ({meta['sms']} SMs), torch {meta['torch']}, triton {meta['triton']}; "
        f"measured copy {meta['copy_gbs']:.0f} GB/s, fp16 matmul {meta['matmul_tflops']:.0f} TFLOP/s; "
        f"date {date.today().isoformat()}.",
        "",
        "Time in microseconds (median, L2 flushed); in brackets the fraction of the copy roofline "
        "(bytes moved / time / copy rate).",
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
