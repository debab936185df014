"""Host time of one eager call of llmc's low-bit linears, against the same calls from a CUDA graph.

    python benchmarks/kernels_host.py [--out DIR]   # on a CUDA machine

``benchmarks/kernels.py`` times the kernels replayed from a CUDA graph, which is how a decode
step runs when its launches are captured. Called one by one from Python (eager, or through the
TensorRT plugins' ``enqueue``, which runs the same launchers on TensorRT's stream), a call also
costs its host time: the launch rules, the workspace, Triton's dispatch, and for the plugin the
float32/float16 conversions of its interface. For each shape and row count this prints, in us per
call:

- ``intn_linear`` (int4 symmetric, groups of 128, 64 where K = 576) and ``fpx_linear`` (FP6 e3m2
  per channel), eager and from a graph;
- the plugins' enqueue bodies on TensorRT's raw pointers and stream: ``IntNLinear`` on asymmetric int4
  (``intn_linear_plugin.enqueue_buffers``), ``Int3Linear`` on asymmetric int3 in the same groups
  (``int3_enqueue_buffers``) and ``Fp6Linear`` on the FP6 weights above (``fpx_linear_plugin``), eager and from
  a graph (the float32 interface's conversions included);
- ``torch.matmul`` in float16 (cuBLAS), eager and from a graph.

Eager: the fastest of 9 trials of 200 back-to-back calls each, then a synchronize, the trials
spread over three passes through the whole table (host noise only ever adds time, and on a shared
host it comes in spells longer than one cell's trials). Graph: 100 calls captured back to back on
the same weights (L2-warm, so faster than kernels.py's L2-cold figures), 5 replays. Writes ``kernels_host.md`` under ``--out``
(default ``$OUT``, else the current directory).
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from pathlib import Path

import torch

SHAPES = ((576, 576), (4096, 4096), (4096, 11008))
ROWS = (1, 16)
PASSES = 3


def eager_us(call, calls: int = 200, trials: int = 3) -> float:
    for _ in range(20):
        call()
    best = float("inf")
    for _ in range(trials):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def graph_us(call, calls: int = 100, replays: int = 5) -> float:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            call()
    graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / (replays * calls) * 1e6


def enqueue(body, x, node, y, fields: dict):
    """A plugin's enqueue body as TensorRT calls it (raw pointers), on the stream current at the call (so that a
    graph captures it)."""
    dims = [tuple(x.shape), *(tuple(t.shape) for t in node)]
    pointers = [x.data_ptr(), *(t.data_ptr() for t in node)]
    return lambda: body(dims, pointers, [y.data_ptr()], torch.cuda.current_stream().cuda_stream, fields)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("kernels_host.py needs a CUDA GPU")

    from llmc.passes.fpx import FORMATS, fpx_quantize
    from llmc.passes.quantize_rtn import rtn_quantize
    from llmc.plugins import fp6_linear as fp
    from llmc.plugins import intn_linear as intn
    from llmc.plugins import fpx_linear_plugin as fpx_plugin
    from llmc.plugins import intn_linear_plugin as plugin

    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    lines = [f"Device: {props.name}, torch {torch.__version__}, {os.cpu_count()} host cores; "
             f"{time.strftime('%Y-%m-%d')}. us per call.", "",
             "| shape (K→N) | M | int4 eager | int4 graph | fp6 eager | fp6 graph | int4 plugin eager "
             "| int4 plugin graph | int3 plugin eager | int3 plugin graph | fp6 plugin eager | fp6 plugin graph "
             "| fp16 matmul eager | fp16 matmul graph |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    cells = []  # (shape, rows, [(eager or graph, call) per column], [us per column])
    for k, n in SHAPES:
        w = torch.randn(n, k) * 0.02
        group = 64 if k % 128 else 128
        int4 = intn.pack_intn(rtn_quantize(w, 4, group, True)).to("cuda")
        # FP6 weights as the kernel and the plugin node hold them (one pack for both)
        fp6_weights, fp6_arrays = fpx_plugin.node_inputs(fpx_quantize(w, FORMATS["e3m2"], None,
                                                                      scale_dtype=torch.float16))
        fp6 = fp6_weights.to("cuda")
        int4_node = [torch.as_tensor(a).cuda() for a in plugin.node_inputs(rtn_quantize(w, 4, group, False))]
        int3_node = [torch.as_tensor(a).cuda() for a in plugin.int3_node_inputs(rtn_quantize(w, 3, group, False))]
        fp6_node = [torch.as_tensor(a).cuda() for a in fp6_arrays]
        fp6_fields = {key: tuple(value) if isinstance(value, (tuple, list)) else (value,)
                      for key, value in fpx_plugin.node_attributes(fp6_weights).items() if key in fpx_plugin.FP6.fields}
        w16 = w.half().cuda()
        for m in ROWS:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            x32 = x.float()
            y = torch.empty(m, n, device="cuda", dtype=torch.float16)
            y32 = torch.empty(m, n, device="cuda")
            int4_call = functools.partial(intn.intn_linear, x, int4, out=y)
            fp6_call = functools.partial(fp.fpx_linear, x, fp6, out=y)
            int4_enqueue = enqueue(plugin.enqueue_buffers, x32, int4_node, y32, {"width": (4,), "group_size": (group,)})
            int3_enqueue = enqueue(plugin.int3_enqueue_buffers, x32, int3_node, y32,
                                   {"group_size": (group,), "symmetric": (0,)})
            fp6_enqueue = enqueue(fpx_plugin.FP6.enqueue, x32, fp6_node, y32, fp6_fields)
            fp16_call = functools.partial(torch.matmul, x, w16.t(), out=y)
            columns = [("eager", int4_call), ("graph", int4_call), ("eager", fp6_call), ("graph", fp6_call),
                       ("eager", int4_enqueue), ("graph", int4_enqueue),
                       ("eager", int3_enqueue), ("graph", int3_enqueue),
                       ("eager", fp6_enqueue), ("graph", fp6_enqueue),
                       ("eager", fp16_call), ("graph", fp16_call)]
            cells.append((f"{k}→{n}", m, columns, [graph_us(call) if how == "graph" else float("inf")
                                                     for how, call in columns]))
    for _ in range(PASSES):
        for _, _, columns, times in cells:
            for i, (how, call) in enumerate(columns):
                if how == "eager":
                    times[i] = min(times[i], eager_us(call))
    for shape, m, _, times in cells:
        line = f"| {shape} | {m} | " + " | ".join(f"{v:.1f}" for v in times) + " |"
        lines.append(line)
        print(line, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernels_host.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
