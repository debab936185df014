"""`llmc run`: the emitted stage graphs as a pipeline, one process per stage.

The transport is torch.distributed with the gloo backend (CPU tensors over TCP); each process
runs one stage graph in ONNX Runtime. A process learns its place from the environment contract
torchrun uses: ``RANK`` (= stage index), ``WORLD_SIZE`` (= number of stages), ``MASTER_ADDR``
and ``MASTER_PORT`` (stage 0's rendezvous). ``llmc run OUT`` starts the processes on this host;
the launch manifests (Kubernetes Jobs, Slurm, torchrun on bare metal) start the same
``llmc run-stage OUT`` worker on the planned devices.

The schedule, which every stage derives from the same job description, so that messages need
no headers:

1. Prompts are tokenised on stage 0 and grouped into micro-batches of equal prompt length (the
   stage graphs have no padding mask), at most ``micro_batch_size`` sequences each.
2. Work items run in the order ``for step in range(new_tokens): for mb in micro_batches``;
   step 0 is a micro-batch's prefill, step s > 0 feeds the token of step s - 1.
3. Stage k receives its input from stage k - 1 and sends its output to stage k + 1; the last
   stage sends the greedy token ids back to stage 0, which feeds them into the micro-batch's
   next step. With several micro-batches in flight every stage has work while the others do.
4. Sends are asynchronous (``isend``), receives blocking: a ring of blocking sends could wait on
   each other, asynchronous ones cannot.
5. Every step runs (no stop at end-of-sequence) so the tokens line up with the references.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from llmc.errors import InputError, ToolchainError, VerificationError

REFERENCE = "run/reference.json"
TOKENIZER_DIR = "tokenizer"
DEFAULT_PORT = 29500


@dataclass(frozen=True)
class MicroBatch:
    prompts: tuple[int, ...]  # indices into the job's prompt list
    input_ids: tuple[tuple[int, ...], ...]  # [batch][prompt_len]

    @property
    def batch(self) -> int:
        return len(self.input_ids)

    @property
    def prompt_len(self) -> int:
        return len(self.input_ids[0])


@dataclass(frozen=True)
class Job:
    """What every stage needs to follow the schedule; built on stage 0 and broadcast."""

    micro_batches: tuple[MicroBatch, ...]
    new_tokens: int
    hidden_size: int
    vocab_size: int


@dataclass
class StageTimes:
    stage: int
    busy_s: float = 0.0  # ONNX Runtime time
    wait_s: float = 0.0  # blocked in receives


@dataclass
class RunResult:
    prompts: list[str]
    tokens: list[list[int]]  # generated token ids per prompt
    texts: list[str]
    stages: int
    micro_batches: int
    micro_batch_size: int
    new_tokens: int
    wall_s: float  # first prefill to last token, sessions already open
    first_token_s: float  # until the first micro-batch's first token reached stage 0
    tokens_per_s: float
    stage_busy_s: list[float]
    bubble_fraction: float  # 1 - mean stage busy time / wall time
    checks: list[dict] = field(default_factory=list)

    @property
    def all_match(self) -> bool:
        return all(c["match"] for c in self.checks)


# --------------------------------------------------------------------------- the build


def read_build(build: Path) -> dict:
    """plan.json of a build directory, with a one-line error when it is not one, or is unusable:
    exit 6 naming the files that differ from SHA256SUMS when it changed since the compile, else
    exit 2 naming the file and the field (see :func:`llmc.artifacts.read_plan`)."""
    from llmc.artifacts import read_plan, unusable

    doc = read_plan(build)
    for stage in doc["stages"]:
        graph = build / stage_graph(stage["index"])
        if not graph.is_file():
            raise unusable(build, InputError(f"{build}: {stage_graph(stage['index'])} is missing; recompile the build"))
    return doc


def stage_graph(index: int) -> str:
    return f"stages/stage_{index}.onnx"


def read_reference(build: Path) -> dict | None:
    path = build / REFERENCE
    return json.loads(path.read_text()) if path.is_file() else None


def load_build_tokenizer(build: Path):
    from transformers import AutoTokenizer

    path = build / TOKENIZER_DIR
    if not path.is_dir():
        raise InputError(f"{build}: no {TOKENIZER_DIR}/ in the build; recompile it with this llmc")
    return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)


def make_job(prompt_ids: list[list[int]], new_tokens: int, micro_batch_size: int, model: dict) -> Job:
    """Micro-batches of equal prompt length, in first-appearance order (rule 1)."""
    if micro_batch_size < 1 or new_tokens < 1:
        raise InputError("--micro-batch-size and --new-tokens must be at least 1")
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise InputError("every prompt must have at least one token")
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(prompt_ids):
        by_length.setdefault(len(ids), []).append(i)
    micro_batches = []
    for members in by_length.values():
        for start in range(0, len(members), micro_batch_size):
            chunk = members[start:start + micro_batch_size]
            micro_batches.append(MicroBatch(tuple(chunk), tuple(tuple(prompt_ids[i]) for i in chunk)))
    return Job(tuple(micro_batches), new_tokens, model["hidden_size"], model["vocab_size"])


# --------------------------------------------------------------------------- one stage


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None or not value.isdigit():
        raise InputError(
            f"run-stage needs the torchrun environment: {name} is {value!r} "
            "(set RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, or use `llmc run`)"
        )
    return int(value)


def open_session(graph: Path, threads: int, device: str):
    """An ONNX Runtime session for one stage: on the CPU as the compile's check, or on this
    process's GPU (``LOCAL_RANK`` among the visible ones)."""
    from llmc.passes.export import open_stage_sessions

    if device == "cpu":
        return open_stage_sessions([graph], threads)[0]
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise ToolchainError(
            "--device cuda needs onnxruntime-gpu (ONNX Runtime here offers "
            f"{', '.join(ort.get_available_providers())}); install it, or pass --device cpu"
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    providers = [("CUDAExecutionProvider", {"device_id": int(os.environ.get("LOCAL_RANK", "0"))}), "CPUExecutionProvider"]
    return ort.InferenceSession(str(graph), options, providers=providers)


def stage_worker(
    build: Path,
    prompts: list[str] | None,
    new_tokens: int | None,
    micro_batch_size: int,
    threads: int,
    result_path: Path | None,
    timeout_s: float = 600.0,
    device: str = "cpu",
    rank_stages: tuple[int, ...] | None = None,
) -> RunResult | None:
    """Run this process's stage; stage 0 returns (and writes) the result, the others None.

    ``rank_stages[r]`` is the stage rank ``r`` runs (default: the stage is the rank). torchrun
    numbers ranks node by node, and the plan may visit a node more than once.
    """
    from datetime import timedelta

    import torch.distributed as dist

    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    doc = read_build(build)
    stages = len(doc["stages"])
    if world != stages:
        raise InputError(f"{build}: the plan has {stages} stages but WORLD_SIZE is {world}; start one process per stage")
    rank_stages = tuple(rank_stages) if rank_stages else tuple(range(world))
    if sorted(rank_stages) != list(range(world)):
        raise InputError(f"--rank-stages {','.join(map(str, rank_stages))} must list each of the {world} stages once")
    rank_of = {stage: r for r, stage in enumerate(rank_stages)}
    stage = rank_stages[rank]
    driver = rank_of[0]  # stage 0 tokenises, collects the tokens and reports
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    try:
        job_box: list = [None]
        texts: list[str] = []
        if stage == 0:
            tokenizer = load_build_tokenizer(build)
            reference = read_reference(build)
            texts, ids = _prompts_and_ids(tokenizer, prompts, reference)
            new_tokens = new_tokens or (reference["new_tokens"] if reference else 16)
            job_box[0] = make_job(ids, new_tokens, micro_batch_size, doc["model"])
        dist.broadcast_object_list(job_box, src=driver)
        job: Job = job_box[0]
        session = open_session(build / stage_graph(stage), threads, device)
        dist.barrier()  # sessions are open everywhere: time the pipeline, not the loading
        start = time.perf_counter()
        tokens, times, first_token_s = _run_schedule(session, job, stage, world, rank_of)
        wall = time.perf_counter() - start
        gathered = [None] * world if stage == 0 else None
        dist.gather_object(times, gathered, dst=driver)
        if stage != 0:
            return None
        result = _result(build, job, texts, tokens, wall, first_token_s, gathered, world)
        if result_path is not None:
            result_path.write_text(json.dumps(asdict(result), indent=1))
        return result
    finally:
        dist.destroy_process_group()


def _prompts_and_ids(tokenizer, prompts: list[str] | None, reference: dict | None) -> tuple[list[str], list[list[int]]]:
    if not prompts:
        if reference is None:
            raise InputError("no prompt given and the build records none; pass --prompt or --prompts-file")
        prompts = [r["prompt"] for r in reference["prompts"]]
    return list(prompts), [list(tokenizer(p)["input_ids"]) for p in prompts]


def _run_schedule(session, job: Job, stage: int, world: int, rank_of: dict[int, int]):
    """Rules 2-4 for one stage. Stage 0 returns the tokens [micro-batch][step] -> ids."""
    import torch
    import torch.distributed as dist

    first, last = stage == 0, stage == world - 1
    times = StageTimes(stage)
    input_names = [i.name for i in session.get_inputs()]
    output_names = [o.name for o in session.get_outputs()]
    caches = [_empty_cache(session, mb.batch) for mb in job.micro_batches]
    tokens: list[list[np.ndarray]] = [[] for _ in job.micro_batches]
    pending = []
    first_token_s = None
    start = time.perf_counter()

    def receive(shape, dtype, source):
        buffer = torch.empty(shape, dtype=dtype)
        t = time.perf_counter()
        dist.recv(buffer, src=source)
        times.wait_s += time.perf_counter() - t
        return buffer.numpy()

    def send(array, target):
        nonlocal pending
        pending = [(w, buf) for w, buf in pending if not w.is_completed()]
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        pending.append((dist.isend(tensor, dst=target), tensor))  # the buffer must outlive the send

    for step in range(job.new_tokens):
        for m, mb in enumerate(job.micro_batches):
            seq = mb.prompt_len if step == 0 else 1
            positions = (np.broadcast_to(np.arange(mb.prompt_len, dtype=np.int64), (mb.batch, seq)) if step == 0
                         else np.full((mb.batch, 1), mb.prompt_len + step - 1, dtype=np.int64))
            feeds = {"position_ids": np.ascontiguousarray(positions)}
            if first:
                if step == 0:
                    feeds["input_ids"] = np.asarray(mb.input_ids, dtype=np.int64)
                else:
                    if not last:  # the previous step's token comes back from the last stage
                        tokens[m].append(receive((mb.batch,), torch.int64, rank_of[world - 1]))
                        if first_token_s is None:
                            first_token_s = time.perf_counter() - start
                    feeds["input_ids"] = tokens[m][-1][:, None].astype(np.int64)
            else:
                feeds["hidden_states_in"] = receive((mb.batch, seq, job.hidden_size), torch.float32, rank_of[stage - 1])
            feeds.update(caches[m])
            t = time.perf_counter()
            outputs = dict(zip(output_names, session.run(output_names, {n: feeds[n] for n in input_names})))
            times.busy_s += time.perf_counter() - t
            for name, value in outputs.items():
                if name.startswith("present_"):
                    caches[m]["past_" + name.removeprefix("present_")] = value
            if last:
                next_ids = outputs["logits"][:, -1].argmax(axis=-1).astype(np.int64)
                if first:
                    tokens[m].append(next_ids)
                    if first_token_s is None:
                        first_token_s = time.perf_counter() - start
                else:
                    send(next_ids, rank_of[0])
            else:
                send(outputs["hidden_states_out"], rank_of[stage + 1])
    if first and not last:  # the last step's tokens are still on their way
        for m, mb in enumerate(job.micro_batches):
            tokens[m].append(receive((mb.batch,), torch.int64, rank_of[world - 1]))
            if first_token_s is None:
                first_token_s = time.perf_counter() - start
    for work, _ in pending:
        work.wait()
    return tokens, times, first_token_s or 0.0


def _empty_cache(session, batch: int) -> dict[str, np.ndarray]:
    cache = {}
    for graph_input in session.get_inputs():
        if graph_input.name.startswith("past_"):
            _, kv_heads, _, head_dim = graph_input.shape
            cache[graph_input.name] = np.zeros((batch, kv_heads, 0, head_dim), dtype=np.float32)
    return cache


def _result(build, job, texts, tokens, wall, first_token_s, times, world) -> RunResult:
    tokenizer = load_build_tokenizer(build)
    per_prompt: list[list[int]] = [[] for _ in texts]
    for mb, steps in zip(job.micro_batches, tokens):
        stacked = np.stack(steps, axis=1)  # [batch, new_tokens]
        for row, prompt in enumerate(mb.prompts):
            per_prompt[prompt] = [int(t) for t in stacked[row]]
    generated = sum(len(t) for t in per_prompt)
    busy = [t.busy_s for t in sorted(times, key=lambda t: t.stage)]
    return RunResult(
        prompts=texts,
        tokens=per_prompt,
        texts=[tokenizer.decode(t, skip_special_tokens=True) for t in per_prompt],
        stages=world,
        micro_batches=len(job.micro_batches),
        micro_batch_size=max(mb.batch for mb in job.micro_batches),
        new_tokens=job.new_tokens,
        wall_s=wall,
        first_token_s=first_token_s,
        tokens_per_s=generated / wall if wall > 0 else 0.0,
        stage_busy_s=busy,
        bubble_fraction=max(0.0, 1.0 - sum(busy) / (world * wall)) if wall > 0 else 0.0,
    )


# --------------------------------------------------------------------------- references


def check_against_references(build: Path, result: RunResult, threads: int = 1) -> RunResult:
    """Compare each prompt's tokens with a reference; fills ``result.checks``.

    A prompt the compile recorded (the export check's prompt) is compared with the torch model's
    greedy tokens recorded then (same weights as the stages). Any other prompt is compared with
    the same graphs run in sequence in this one process (ONNX Runtime, no pipeline), which the
    compile itself checked against torch.
    """
    from llmc.passes.export import run_stages_greedy

    reference = read_reference(build) or {"prompts": []}
    recorded = {r["prompt"]: r for r in reference["prompts"]}
    tokenizer = None
    graphs = [build / stage_graph(i) for i in range(result.stages)]
    checks = []
    for prompt, tokens in zip(result.prompts, result.tokens):
        entry = recorded.get(prompt)
        expected, sources = [], []
        if entry is not None:
            expected = entry["tokens"][:len(tokens)]
            sources.append(f"torch model with the build's weights, recorded at compile ({entry['source']}), "
                           f"first {len(expected)} tokens")
        if len(expected) < len(tokens):  # beyond what the compile recorded
            tokenizer = tokenizer or load_build_tokenizer(build)
            ids = np.asarray([tokenizer(prompt)["input_ids"]], dtype=np.int64)
            sequential = [int(t) for t in run_stages_greedy(graphs, ids, len(tokens), threads).tokens[0]]
            expected = expected + sequential[len(expected):]
            sources.append("the same stage graphs in sequence in one process (ONNX Runtime)"
                           + (" beyond them" if entry is not None else ""))
        source = "; ".join(sources)
        differs = [i for i, (a, b) in enumerate(zip(tokens, expected)) if a != b]
        checks.append({
            "prompt": prompt, "match": not differs, "first_divergence": differs[0] if differs else None,
            "reference": source,
        })
    result.checks = checks
    return result


# --------------------------------------------------------------------------- the launcher


def _free_port(address: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def stage_command(build: Path, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "llmc.cli", "run-stage", str(build), *args]


def run_local(
    build: Path,
    prompts: list[str] | None = None,
    new_tokens: int | None = None,
    micro_batch_size: int = 1,
    threads: int = 1,
    timeout_s: float = 600.0,
    device: str = "cpu",
) -> RunResult:
    """Start one ``llmc run-stage`` process per stage on this host and collect stage 0's result."""
    doc = read_build(build)
    world = len(doc["stages"])
    with tempfile.TemporaryDirectory(prefix="llmc-run-") as tmp:
        tmp = Path(tmp)
        args = ["--micro-batch-size", str(micro_batch_size), "--threads", str(threads),
                "--timeout", str(int(timeout_s)), "--device", device]
        if new_tokens:
            args += ["--new-tokens", str(new_tokens)]
        if prompts:
            (tmp / "prompts.json").write_text(json.dumps(prompts))
            args += ["--prompts-json", str(tmp / "prompts.json")]
        base_env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
                        WORLD_SIZE=str(world), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS=str(threads))
        processes = []
        for rank in range(world):
            extra = ["--result", str(tmp / "result.json")] if rank == 0 else []
            log = (tmp / f"stage_{rank}.log").open("w")
            env = dict(base_env, RANK=str(rank), LOCAL_RANK=str(rank))
            processes.append((subprocess.Popen(stage_command(build, args + extra), env=env, stdout=log,
                                               stderr=subprocess.STDOUT), log))
        failed = _wait_all(processes, timeout_s)
        if failed == (0, 6) and (tmp / "result.json").is_file():
            failed = None  # stage 0 ran and found a mismatch: the caller reports it with the text
        if failed is not None:
            rank, code = failed
            tail = (tmp / f"stage_{rank}.log").read_text().strip().splitlines()[-1:] or ["(no output)"]
            if tail[0].startswith("llmc: error: "):
                kind = {2: InputError, 6: VerificationError}.get(code, ToolchainError)
                raise kind(f"stage {rank}: {tail[0].removeprefix('llmc: error: ')}")
            raise ToolchainError(f"stage {rank} process exited with {code}: {tail[0]}")
        data = json.loads((tmp / "result.json").read_text())
    return RunResult(**data)


def _wait_all(processes, timeout_s: float) -> tuple[int, int] | None:
    """Wait for every stage; on the first failure stop the others. Returns (rank, code) of it."""
    deadline = time.monotonic() + timeout_s + 60
    try:
        while True:
            codes = [p.poll() for p, _ in processes]
            bad = next(((r, c) for r, c in enumerate(codes) if c not in (None, 0)), None)
            if bad is not None:
                return bad
            if all(c == 0 for c in codes):
                return None
            if time.monotonic() > deadline:
                return next(r for r, c in enumerate(codes) if c is None), 124
            time.sleep(0.05)
    finally:
        for p, log in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()


def run_on_ray(
    build: Path,
    address: str,
    prompts: list[str] | None = None,
    new_tokens: int | None = None,
    micro_batch_size: int = 1,
    threads: int = 1,
    timeout_s: float = 600.0,
    device: str = "cpu",
) -> RunResult:
    """One Ray actor per stage, placed by the SKU resource its worker group advertises.

    ``address`` is a Ray cluster's (``auto`` inside one, as the KubeRay manifest does) or
    ``local``: a Ray instance on this host that declares the plan's SKU resources itself. The
    actors run :func:`stage_worker` with the torchrun environment, stage 0's node as rendezvous.
    """
    try:
        import ray
    except ImportError:
        raise ToolchainError("--ray needs the ray package: pip install \"ray>=2.9\"") from None
    from llmc.passes.manifests import VIEW_FILE, view_from_json

    read_build(build)
    if not (build / VIEW_FILE).is_file():
        raise InputError(f"{build}: no {VIEW_FILE}; recompile the build with this llmc")
    view = view_from_json((build / VIEW_FILE).read_text())
    resources = [f"llmc-sku-{group.name}" for group in view.sku_groups for _ in group.stages]
    by_stage = {i: f"llmc-sku-{g.name}" for g in view.sku_groups for i in g.stages}
    local = address == "local"
    if local:
        counts = {r: float(resources.count(r)) for r in resources}
        ray.init(num_cpus=len(view.stages) + 1, resources=counts, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    else:
        ray.init(address=address, log_to_driver=False)
    try:
        actor = ray.remote(_StageActor)
        actors = [
            actor.options(num_cpus=1, num_gpus=1 if device == "cuda" else 0, resources={by_stage[i]: 1}).remote()
            for i in range(len(view.stages))
        ]
        master_addr, master_port = ray.get(actors[0].rendezvous.remote(), timeout=timeout_s)
        env = {"MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port), "WORLD_SIZE": str(len(actors))}
        if local:
            env["GLOO_SOCKET_IFNAME"] = "lo"
        calls = [a.run.remote(dict(env, RANK=str(i), LOCAL_RANK="0"), str(build), prompts, new_tokens,
                              micro_batch_size, threads, timeout_s, device) for i, a in enumerate(actors)]
        try:
            results = ray.get(calls, timeout=timeout_s + 60)
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, (InputError, ToolchainError, VerificationError)):
                raise cause from None
            raise ToolchainError(f"a stage actor failed: {str(e).strip().splitlines()[-1]}") from None
    finally:
        ray.shutdown()
    return RunResult(**results[0])


class _StageActor:
    """A Ray actor that runs one stage (decorated with ray.remote by :func:`run_on_ray`)."""

    def rendezvous(self) -> tuple[str, int]:
        import ray

        address = ray.util.get_node_ip_address()
        return address, _free_port(address)

    def run(self, env, build, prompts, new_tokens, micro_batch_size, threads, timeout_s, device):
        os.environ.update(env)
        result = stage_worker(Path(build), prompts, new_tokens, micro_batch_size, threads, None, timeout_s, device)
        if result is None:
            return None
        return asdict(check_against_references(Path(build), result, threads))


def format_result(result: RunResult) -> str:
    lines = []
    for prompt, text, check in zip(result.prompts, result.texts, result.checks or [None] * len(result.prompts)):
        verdict = ""
        if check is not None:
            verdict = ("  [greedy tokens match the reference]" if check["match"]
                       else f"  [DIFFERS from the reference at token {check['first_divergence']}]")
        lines.append(f"{prompt!r} -> {text!r}{verdict}")
    lines.append(
        f"{result.stages} stage processes, {len(result.prompts)} prompts in {result.micro_batches} micro-batches "
        f"(<= {result.micro_batch_size} sequences), {result.new_tokens} tokens each: "
        f"{result.tokens_per_s:.1f} tokens/s, {result.wall_s:.2f} s, first token {result.first_token_s * 1e3:.0f} ms, "
        f"bubble {result.bubble_fraction:.0%}"
    )
    return "\n".join(lines)


def verify(result: RunResult) -> None:
    bad = [c for c in result.checks if not c["match"]]
    if bad:
        c = bad[0]
        raise VerificationError(
            f"the pipeline's greedy tokens differ from the reference for {len(bad)} of {len(result.checks)} prompts "
            f"(first: {c['prompt']!r} at token {c['first_divergence']}; reference: {c['reference']})"
        )
