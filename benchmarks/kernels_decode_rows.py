"""Check and time llmc's int4 and FP6 kernels at 1-16 rows of x (``mma_decode``: ``intn_linear`` rule 10,
``fp6_linear`` rule 8, against the rules before them) beside cuBLAS float16, on one GPU in one run.

    python benchmarks/kernels_decode_rows.py [--out DIR] [--asym | --fp6 e3m2] [--rows 2,3,4,8,16]   # on a CUDA machine

For each linear shape of ``benchmarks/kernels.py`` (int4 RTN codes, symmetric in groups of 128, 64
where K = 576; ``--asym``: asymmetric in groups of 32; ``--fp6 e3m2`` or ``e2m3``: FP6 with one scale per
output, rows 1, 2, 3, 4, 8, 16 unless given) and each number of rows M: the ``mma_decode`` kernel at its launch
(``mma_launch``, whatever the bounds of ``MMA_RULE`` / ``FP6_MMA_RULE``, on an sm_90
GPU), llmc without it (``intn_config`` / ``fpx_config``), llmc's own dispatch, and ``torch.matmul`` on the
float16 weight. Correctness first (a fresh ``x``, a NaN-filled output, the float32 reference, relative
error under 2e-3), then the same L2-cold, graph-replayed timing as ``kernels.py``. Writes
``kernels_decode_rows.md`` (``-asym``, ``-e3m2``) under ``--out`` (default ``$OUT``, else the current
directory).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import SHAPES, TOLERANCE, _checked, _copies_of, _timed, clocks_up, copy_bandwidth

ROWS = (2, 3, 4, 8, 16)
FP6_ROWS = (1, 2, 3, 4, 8, 16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--asym", action="store_true", help="asymmetric int4 in groups of 32")
    kind.add_argument("--fp6", choices=("e3m2", "e2m3"), help="FP6 with one scale per output instead of int4")
    parser.add_argument("--rows", help="comma-separated rows of x (1-16; int4 2,3,4,8,16, FP6 1,2,3,4,8,16)")
    args = parser.parse_args()
    rows = tuple(int(r) for r in args.rows.split(",")) if args.rows else FP6_ROWS if args.fp6 else ROWS

    import torch
    import triton

    from llmc.passes.fpx import FORMATS, fpx_quantize
    from llmc.passes.quantize_rtn import rtn_quantize
    from llmc.plugins import fp6_linear as fp
    from llmc.plugins import intn_linear as intn
    from llmc.plugins import mma_decode
    from llmc.plugins.splitk import sm_count

    device = torch.device("cuda")
    if not mma_decode.available(device):
        raise SystemExit("rule 10 runs on compute capability 9.0 GPUs only")
    props = torch.cuda.get_device_properties(device)
    sms = sm_count(device)
    torch.manual_seed(0)
    clocks_up(device)
    copy_rate = copy_bandwidth(device)
    started = time.time()
    worst = 0.0
    lines = []
    l2 = props.L2_cache_size
    for name, k, n in SHAPES:
        weight = torch.randn(n, k, device=device) * 0.02
        if args.fp6:
            w = fp.pack_fpx(fpx_quantize(weight, FORMATS[args.fp6], None, scale_dtype=torch.float16))
            reference, linear, config_of = fp.fpx_reference, fp.fpx_linear, fp.fpx_config
        else:
            group = 32 if args.asym else 128 if k % 128 == 0 else 64
            w = intn.pack_intn(rtn_quantize(weight, 4, group, symmetric=not args.asym))
            reference, linear, config_of = intn.intn_reference, intn.intn_linear, intn.intn_config
        half = weight.half()
        weights, halves = _copies_of(w), _copies_of(half)
        first = True
        for m in (rows[0], *rows):  # the first timing of a shape ran slow (up to 2x), so it is run twice
            x = torch.randn(m, k, device=device, dtype=torch.float16)
            ref = reference(x, w).float()
            launch = mma_decode.mma_launch(m, k, n, sms, mma_decode.kernel_of(w))
            run = lambda x, y, w: mma_decode.mma_linear(x, w, launch, y)  # noqa: E731
            y = _checked(run, x, w, ref, (m, n), f"{name} M={m} mma_decode")
            if y is None:
                raise SystemExit("the mma_decode kernel is wrong; no timing")
            worst = max(worst, float((y.float() - ref).norm() / ref.norm()))
            config = config_of(m, w, sms)  # without the mma_decode rule
            before = lambda x, y, w: linear(x, w, config, out=y)  # noqa: E731
            y = _checked(before, x, w, ref, (m, n), f"{name} M={m} without the mma_decode rule")
            llmc = lambda x, y, w: linear(x, w, out=y)  # noqa: E731
            y = _checked(llmc, x, w, ref, (m, n), f"{name} M={m} llmc")
            if y is None:
                raise SystemExit("llmc's dispatch is wrong; no timing")
            forced = lambda i: (lambda: mma_decode.mma_linear(x, weights(i), launch, y))  # noqa: E731
            times = {
                "mma": _timed(forced, w.nbytes, l2),
                "before": _timed(lambda i: (lambda: linear(x, weights(i), config, out=y)), w.nbytes, l2),
                "llmc": _timed(lambda i: (lambda: linear(x, weights(i), out=y)), w.nbytes, l2),
                "fp16": _timed(lambda i: (lambda: torch.matmul(x, halves(i).t(), out=y)), 2 * n * k, l2),
            }
            picked = "mma" if mma_decode.mma_config(m, w, sms) else "before"
            if first:
                first = False
                continue
            kind = ("2-16 row" if config.block_m == 16 else "1 row" if config.rows == 1 and m == 1
                    else f"{config.rows} rows/program")
            moved = w.nbytes + 2 * m * (k + n)
            lines.append(f"| {name} ({k}→{n}) | {m} | {times['mma'] * 1e6:.1f} ({launch.warps} x {launch.split}) | "
                         f"{kind} {times['before'] * 1e6:.1f} | {picked} {times['llmc'] * 1e6:.1f} | "
                         f"{times['fp16'] * 1e6:.1f} | {times['before'] / times['llmc']:.2f}x | "
                         f"{times['fp16'] / times['llmc']:.2f}x | {moved / times['llmc'] / copy_rate:.2f} |")
            print(lines[-1], flush=True)
    what = (f"FP6 {args.fp6} per channel" if args.fp6 else "int4 asymmetric g32" if args.asym
            else "int4 symmetric g128 (g64 where K = 576)")
    header = (f"{what}; {props.name}, {sms} SMs, torch {torch.__version__}, triton {triton.__version__}, {date.today()}; "
              f"copy {copy_rate / 1e9:.0f} GB/s; largest relative error of the mma_decode kernel {worst:.1e} "
              f"(tolerance {TOLERANCE}); {time.time() - started:.0f} s\n\n"
              "| shape (K→N) | M | mma_decode (us; warps x splits) | llmc without it (us) | llmc (us) | fp16 (us) "
              "| llmc vs without it | llmc vs fp16 | llmc roofline |\n"
              "|---|---|---|---|---|---|---|---|---|\n")
    text = header + "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = f"-{args.fp6}" if args.fp6 else "-asym" if args.asym else ""
    (args.out / f"kernels_decode_rows{suffix}.md").write_text(text)
    print(header)


if __name__ == "__main__":
    main()
