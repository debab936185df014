"""Check and time llmc's int4 kernels at 2-16 rows of x (``intn_linear`` rule 10, ``mma_decode``, against
the rules it replaced) beside cuBLAS float16, on one GPU in one run.

    python benchmarks/kernels_decode_rows.py [--out DIR] [--asym] [--rows 2,3,4,8,16]   # on a CUDA machine

For each linear shape of ``benchmarks/kernels.py`` (int4 RTN codes, symmetric in groups of 128, 64
where K = 576; ``--asym``: asymmetric in groups of 32) and each number of rows M: rule 10 at
``mma_launch``'s launch (whatever the bounds of ``MMA_RULE``, on an sm_90 GPU), ``intn_linear`` without
rule 10 (the 2-16 row tensor-core kernel or the decode kernel with several rows, by ``intn_config``),
``intn_linear``'s own dispatch, and ``torch.matmul`` on the float16 weight. Correctness first (a fresh
``x``, a NaN-filled output, the float32 reference, relative error under 2e-3), then the same L2-cold,
graph-replayed timing as ``kernels.py``. Writes ``kernels_decode_rows.md`` (``-asym``) under ``--out``
(default ``$OUT``, else the current directory).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import SHAPES, TOLERANCE, _checked, _copies_of, _timed, clocks_up

ROWS = (2, 3, 4, 8, 16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    parser.add_argument("--asym", action="store_true", help="asymmetric int4 in groups of 32")
    parser.add_argument("--rows", default=",".join(map(str, ROWS)), help="comma-separated rows of x (2-16)")
    args = parser.parse_args()
    rows = tuple(int(r) for r in args.rows.split(","))

    import torch
    import triton

    from llmc.passes.quantize_rtn import rtn_quantize
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
    started = time.time()
    worst = 0.0
    lines = []
    l2 = props.L2_cache_size
    for name, k, n in SHAPES:
        weight = torch.randn(n, k, device=device) * 0.02
        group = 32 if args.asym else 128 if k % 128 == 0 else 64
        w = intn.pack_intn(rtn_quantize(weight, 4, group, symmetric=not args.asym))
        half = weight.half()
        weights, halves = _copies_of(w), _copies_of(half)
        first = True
        for m in (rows[0], *rows):  # the first timing of a shape ran slow (up to 2x), so it is run twice
            x = torch.randn(m, k, device=device, dtype=torch.float16)
            ref = intn.intn_reference(x, w).float()
            launch = mma_decode.mma_launch(k, n, sms)
            run = lambda x, y, w: mma_decode.mma_linear(x, w, launch, y)  # noqa: E731
            y = _checked(run, x, w, ref, (m, n), f"{name} M={m} rule 10")
            if y is None:
                raise SystemExit("rule 10 is wrong; no timing")
            worst = max(worst, float((y.float() - ref).norm() / ref.norm()))
            config = intn.intn_config(m, w, sms)  # without rule 10
            before = lambda x, y, w: intn.intn_linear(x, w, config, out=y)  # noqa: E731
            y = _checked(before, x, w, ref, (m, n), f"{name} M={m} without rule 10")
            llmc = lambda x, y, w: intn.intn_linear(x, w, out=y)  # noqa: E731
            y = _checked(llmc, x, w, ref, (m, n), f"{name} M={m} llmc")
            if y is None:
                raise SystemExit("llmc's dispatch is wrong; no timing")
            times = {
                "rule 10": _timed(lambda i: (lambda: mma_decode.mma_linear(x, weights(i), launch, y)), w.nbytes, l2),
                "before": _timed(lambda i: (lambda: intn.intn_linear(x, weights(i), config, out=y)), w.nbytes, l2),
                "llmc": _timed(lambda i: (lambda: intn.intn_linear(x, weights(i), out=y)), w.nbytes, l2),
                "fp16": _timed(lambda i: (lambda: torch.matmul(x, halves(i).t(), out=y)), 2 * n * k, l2),
            }
            picked = "rule 10" if mma_decode.mma_config(m, w, sms) else "before"
            if first:
                first = False
                continue
            kind = "2-16 row" if config.block_m == 16 else f"{config.rows} rows/program"
            lines.append(f"| {name} ({k}→{n}) | {m} | {times['rule 10'] * 1e6:.1f} ({launch.warps} x {launch.split}) | "
                         f"{kind} {times['before'] * 1e6:.1f} | {picked} {times['llmc'] * 1e6:.1f} | "
                         f"{times['fp16'] * 1e6:.1f} | {times['before'] / times['llmc']:.2f}x | "
                         f"{times['fp16'] / times['llmc']:.2f}x |")
            print(lines[-1], flush=True)
    what = "int4 asymmetric g32" if args.asym else "int4 symmetric g128 (g64 where K = 576)"
    header = (f"{what}; {props.name}, {sms} SMs, torch {torch.__version__}, triton {triton.__version__}, {date.today()}; "
              f"largest relative error of rule 10 {worst:.1e} (tolerance {TOLERANCE}); {time.time() - started:.0f} s\n\n"
              "| shape (K→N) | M | rule 10 (us; warps x splits) | llmc without rule 10 (us) | llmc (us) | fp16 (us) "
              "| llmc vs without rule 10 | llmc vs fp16 |\n"
              "|---|---|---|---|---|---|---|---|\n")
    text = header + "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"kernels_decode_rows{'-asym' if args.asym else ''}.md").write_text(text)
    print(header)


if __name__ == "__main__":
    main()
