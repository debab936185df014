"""`manifests`: launch manifests for every target, rendered from jinja2 templates and validated.

The templates see one typed view model (:class:`LaunchView`), built from the plan, the cluster
and the exported graphs, plus the deployment options (:class:`DeployOptions`: image, namespace,
volume...). The view is written into the build (``manifests/launch-view.json``) so that
``llmc render`` re-renders any target with other options without recompiling.

Targets, each a template versioned by the API it writes (``templates/<target>/<api>.j2``):

- ``launch``: one ``llmc/v1`` LaunchManifest per declared device (idle devices say so).
- ``kubernetes``: per stage a headless ``v1`` Service and a ``batch/v1`` Job.
- ``kuberay``: a ``ray.io/v1`` RayCluster with one worker group per GPU SKU.
- ``slurm``: a heterogeneous ``sbatch`` job, one component per stage.
- ``shell``: a torchrun launcher for bare metal, one invocation per node.

Every target starts the same worker, ``llmc run-stage BUILD`` (see :mod:`llmc.run`). Every
rendered file is validated before it is kept (:mod:`llmc.passes.manifest_checks`), so a template
mistake fails the compile instead of the deployment. The pass also bundles what the workers need
besides the graphs: the tokenizer and the reference tokens of the export check.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

from llmc.errors import InputError
from llmc.ir import Artifact, EngineBuild, Program
from llmc.pipeline import Pass, PassContext, PassResult

TARGETS = ("launch", "kubernetes", "kuberay", "slurm", "shell")
TEMPLATES = {  # target -> template, named by the API version it writes
    "launch": "launch/llmc-v1.yaml.j2",
    "kubernetes": "kubernetes/v1.yaml.j2",
    "kuberay": "kuberay/ray.io-v1.yaml.j2",
    "slurm": "slurm/sbatch-hetjob.sh.j2",
    "shell": "shell/torchrun.sh.j2",
}
VIEW_FILE = "manifests/launch-view.json"
IDLE_REASON = "the model fits on fewer devices without a slower stage"
# Tokenizer files copied into the build for the stage workers (those the checkpoint has).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def template_environment(search_path: Path | None = None):
    """The one jinja2 environment: package templates (or ``search_path``), StrictUndefined, stable output."""
    from importlib import resources

    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(search_path or resources.files("llmc.templates"))),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )


# --------------------------------------------------------------------------- the view model


@dataclass(frozen=True)
class GraphView:
    path: str
    sha256: str
    inputs: dict[str, list]
    outputs: dict[str, list]


@dataclass(frozen=True)
class MemoryView:  # predicted bytes
    weights: int
    kv_cache: int
    embedding: int
    lm_head: int
    activations: int
    capacity: int


@dataclass(frozen=True)
class StageView:
    index: int
    device: str  # "box-a/gpu1"
    node: str
    gpu: int  # index of the GPU within its node
    sku: str
    compute_capability: str
    gpu_products: tuple[str, ...]  # values of nvidia.com/gpu.product for this SKU
    slurm_feature: str
    layer_start: int
    layer_end: int
    holds_embedding: bool
    holds_lm_head: bool
    graph: GraphView
    memory: MemoryView
    service: str  # DNS name of this stage (Kubernetes Service and Job)
    previous: str | None = None  # device names of the neighbours
    next: str | None = None
    previous_service: str | None = None
    next_service: str | None = None
    engine: EngineBuild | None = None  # the build-engines pass's record; None: the build ran without it


@dataclass(frozen=True)
class DeviceView:
    name: str
    node: str
    gpu: int
    sku: str
    compute_capability: str
    stage: int | None


@dataclass(frozen=True)
class NodeView:
    """A node that runs stages, in pipeline order."""

    name: str
    stages: tuple[int, ...]
    gpus: tuple[int, ...]  # local GPU indices, one per stage, in stage order


@dataclass(frozen=True)
class SkuGroupView:
    name: str  # DNS-safe SKU name
    sku: str
    gpu_products: tuple[str, ...]
    ray_resource: str
    stages: tuple[int, ...]


@dataclass(frozen=True)
class LaunchView:
    """Everything the templates read, from the plan, the cluster and the exported graphs."""

    llmc_version: str
    cluster: str
    model: str
    stages: tuple[StageView, ...]
    devices: tuple[DeviceView, ...]
    workload: dict[str, int]
    api_version: str = "llmc/v1"
    idle_reason: str = IDLE_REASON

    @property
    def nodes(self) -> tuple[NodeView, ...]:
        order: dict[str, list[StageView]] = {}
        for s in self.stages:
            order.setdefault(s.node, []).append(s)
        return tuple(NodeView(n, tuple(s.index for s in ss), tuple(s.gpu for s in ss)) for n, ss in order.items())

    @property
    def sku_groups(self) -> tuple[SkuGroupView, ...]:
        groups: dict[str, list[StageView]] = {}
        for s in self.stages:
            groups.setdefault(s.sku, []).append(s)
        return tuple(
            SkuGroupView(dns_label(sku), sku, ss[0].gpu_products, f"llmc-sku-{dns_label(sku)}", tuple(s.index for s in ss))
            for sku, ss in groups.items()
        )

    @property
    def ray_cluster_name(self) -> str:
        return dns_label(f"{self.cluster}-llmc")

    @property
    def slurm_file_name(self) -> str:
        return f"manifests/slurm/{self.cluster}.sbatch"

    @property
    def shell_file_name(self) -> str:
        return f"manifests/shell/{self.cluster}.sh"


@dataclass(frozen=True)
class DeployOptions:
    """Where and how the targets run; ``llmc render`` takes each as an option."""

    image: str = "llmc:0.1.0"  # a container image with llmc[onnx] and onnxruntime-gpu installed
    namespace: str = "default"
    build_claim: str = "llmc-build"  # PersistentVolumeClaim holding the build directory
    build_path: str = "/build"  # where the build is mounted (or lies, for Slurm)
    master_port: int = 29500
    device: str = "cuda"  # what the stage workers run on: "cuda" or "cpu"
    threads: int = 1
    timeout_s: int = 600
    slurm_time: str = "01:00:00"
    gpu_products: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (SKU, labels) overrides


def worker_command(build: str, options: DeployOptions) -> list[str]:
    """The stage worker every target starts (the rank comes from the environment)."""
    return ["llmc", "run-stage", build, "--device", options.device, "--threads", str(options.threads),
            "--timeout", str(options.timeout_s)]


def ray_command(build: str, options: DeployOptions) -> list[str]:
    return ["llmc", "run", build, "--ray", "auto", "--device", options.device, "--threads", str(options.threads),
            "--timeout", str(options.timeout_s)]


def dns_label(text: str) -> str:
    """``text`` as an RFC 1035 label (lower case, digits, '-', starting with a letter)."""
    label = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    if not label or not label[0].isalpha():
        label = f"llmc-{label}"
    if len(label) > 63:
        raise InputError(f"'{text}' makes a DNS name longer than 63 characters ('{label}'); use a shorter cluster name")
    return label


def gpu_products(sku) -> tuple[str, ...]:
    """Values GPU feature discovery gives ``nvidia.com/gpu.product`` on this SKU's nodes.

    GFD writes NVML's product name with spaces as '-'; the catalog lists NVML's names among
    each SKU's aliases ("NVIDIA A100-SXM4-40GB", "Tesla T4"). A SKU the catalog lacks keeps its
    own name (override with ``llmc render --gpu-product SKU=LABEL``).
    """
    names = [a for a in sku.aliases if a.startswith(("NVIDIA ", "Tesla "))]
    return tuple(dict.fromkeys(n.replace(" ", "-") for n in names)) or (dns_label(sku.name),)


def build_view(program: Program, cluster, graphs: dict[str, GraphView], workload: dict[str, int]) -> LaunchView:
    import llmc

    stages = program.plan.stages
    by_device = {s.device: s for s in stages}
    devices = {d.name: d for d in cluster.devices}
    services = [dns_label(f"{cluster.name}-stage-{s.index}") for s in stages]
    engines = {(e.stage, e.sku): e for e in program.engines}
    views = []
    for k, s in enumerate(stages):
        device = devices[s.device]
        views.append(StageView(
            index=s.index, device=s.device, node=device.node, gpu=_gpu_index(s.device), sku=device.sku.name,
            compute_capability=device.sku.compute_capability, gpu_products=gpu_products(device.sku),
            slurm_feature=device.sku.name, layer_start=s.layer_start, layer_end=s.layer_end,
            holds_embedding=s.holds_embedding, holds_lm_head=s.holds_lm_head,
            graph=graphs[f"stages/stage_{s.index}.onnx"],
            memory=MemoryView(**{f: getattr(s.memory, f) for f in MemoryView.__dataclass_fields__}),
            service=services[k],
            previous=stages[k - 1].device if k > 0 else None,
            next=stages[k + 1].device if k + 1 < len(stages) else None,
            previous_service=services[k - 1] if k > 0 else None,
            next_service=services[k + 1] if k + 1 < len(stages) else None,
            engine=engines.get((s.index, device.sku.name)),
        ))
    return LaunchView(
        llmc_version=llmc.__version__, cluster=cluster.name, model=program.model.architecture,
        stages=tuple(views),
        devices=tuple(
            DeviceView(d.name, d.node, _gpu_index(d.name), d.sku.name, d.sku.compute_capability,
                       by_device[d.name].index if d.name in by_device else None)
            for d in cluster.devices
        ),
        workload=dict(workload),
    )


def _gpu_index(device: str) -> int:
    return int(device.rsplit("/gpu", 1)[1])


def view_to_json(view: LaunchView) -> str:
    from dataclasses import asdict

    return json.dumps(asdict(view), indent=1, sort_keys=True) + "\n"


def view_from_json(text: str) -> LaunchView:
    from pydantic import TypeAdapter

    return TypeAdapter(LaunchView).validate_json(text)


def with_gpu_products(view: LaunchView, overrides: tuple[tuple[str, tuple[str, ...]], ...]) -> LaunchView:
    if not overrides:
        return view
    table = dict(overrides)
    unknown = sorted(set(table) - {s.sku for s in view.stages})
    if unknown:
        raise InputError(f"--gpu-product names SKU {unknown[0]!r}, which no stage uses "
                         f"(stages use {', '.join(sorted({s.sku for s in view.stages}))})")
    return replace(view, stages=tuple(replace(s, gpu_products=table.get(s.sku, s.gpu_products)) for s in view.stages))


# --------------------------------------------------------------------------- rendering


def manifest_filename(device: str) -> str:
    return f"manifests/{device.replace('/', '-')}.yaml"


def target_files(target: str, view: LaunchView) -> list[str]:
    """The files a target writes, relative to the build directory."""
    if target == "launch":
        return [manifest_filename(d.name) for d in view.devices]
    return {
        "kubernetes": [f"manifests/kubernetes/{view.cluster}.yaml"],
        "kuberay": [f"manifests/kuberay/{view.cluster}.yaml"],
        "slurm": [view.slurm_file_name],
        "shell": [view.shell_file_name],
    }[target]


def render_target(target: str, view: LaunchView, options: DeployOptions, template_dir: Path | None = None) -> dict[str, str]:
    """Rendered and validated files of one target: {path relative to the build: text}.

    A template error (StrictUndefined included) or a failed check raises ``ManifestInvalid``.
    """
    import jinja2

    from llmc.passes.manifest_checks import ManifestInvalid, validate_rendered

    if target not in TEMPLATES:
        raise InputError(f"unknown target {target!r} (targets: {', '.join(TARGETS)})")
    view = with_gpu_products(view, options.gpu_products)
    env = template_environment(template_dir)
    try:
        files = _render(target, env.get_template(TEMPLATES[target]), view, options)
    except jinja2.TemplateError as e:
        line = getattr(e, "lineno", None) or _template_line(e.__traceback__, TEMPLATES[target])
        where = f"line {line}" if line else ""
        raise ManifestInvalid(f"templates/{TEMPLATES[target]}", where, f"{type(e).__name__}: {e.message}") from None
    for path, text in files.items():
        validate_rendered(target, path, text, view, options)
    return files


def _template_line(traceback, template: str) -> int | None:
    """The template line a render-time error (e.g. an undefined variable) came from: jinja2
    rewrites tracebacks so that template frames carry the template's file and line."""
    line = None
    while traceback is not None:
        if traceback.tb_frame.f_code.co_filename.replace("\\", "/").endswith(template):
            line = traceback.tb_lineno
        traceback = traceback.tb_next
    return line


def _render(target: str, template, view: LaunchView, options: DeployOptions) -> dict[str, str]:
    from llmc.passes.manifest_checks import KUBERAY_VERSION, KUBERNETES_VERSION

    common = dict(
        view=view, options=options, kubernetes_version=KUBERNETES_VERSION, kuberay_version=KUBERAY_VERSION,
        command=worker_command(options.build_path, options), ray_command=ray_command(options.build_path, options),
        shell_command=worker_command('"$build"', options),
    )
    files = {}
    if target == "launch":
        stages = {s.index: s for s in view.stages}
        for device, path in zip(view.devices, target_files(target, view)):
            stage = stages.get(device.stage) if device.stage is not None else None
            files[path] = template.render(device=device, stage=stage, **common)
    else:
        (path,) = target_files(target, view)
        files[path] = template.render(**common)
    return files


def render_build(build: Path, targets: tuple[str, ...], options: DeployOptions, out: Path | None = None) -> list[str]:
    """Re-render ``targets`` of a build from its view (no recompile); returns the files written.

    Into the build itself (its SHA256SUMS updated, so `llmc inspect` still vouches for it) or,
    with ``out``, into another directory.
    """
    from llmc.artifacts import SUMS, update_sums, write_atomically

    if not (build / VIEW_FILE).is_file():
        raise InputError(f"{build}: no {VIEW_FILE}; not an llmc build, or compiled before `llmc render` existed")
    view = view_from_json((build / VIEW_FILE).read_text())
    files: dict[str, str] = {}
    for target in targets:
        files.update(render_target(target, view, options))
    root = out or build
    for path, text in sorted(files.items()):
        write_atomically(root / path, text.encode())
    if out is None and (build / SUMS).is_file():
        update_sums(build, files)
    return sorted(files)


# --------------------------------------------------------------------------- the pass


@dataclass(frozen=True)
class ManifestsPass(Pass):
    name = "manifests"
    uses_cluster = True
    batch: int
    prompt_tokens: int
    generated_tokens: int
    # The export check's prompt: its torch reference tokens go into the build for `llmc run`.
    check_prompt: str = "The State of the Union is"
    check_tokens: int = 16
    targets: tuple[str, ...] = field(default=TARGETS)

    def requires(self, program: Program) -> None:
        if program.plan is None:
            raise ValueError("manifests need a plan; run 'plan' first")
        if not any(a.kind == "onnx" for a in program.artifacts):
            raise ValueError("manifests need the stage graphs; run 'export' first")

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        from llmc.artifacts import sha256_file

        graphs = {}
        for a in program.artifacts:
            if a.kind == "onnx":
                meta = json.loads(ctx.path(a.ref.replace(".onnx", ".json")).read_text())
                graphs[a.path] = GraphView(a.path, sha256_file(ctx.path(a.ref)), meta["inputs"], meta["outputs"])
        workload = dict(batch=self.batch, prompt_tokens=self.prompt_tokens, generated_tokens=self.generated_tokens)
        view = build_view(program, ctx.cluster, graphs, workload)
        options = DeployOptions()
        files = {VIEW_FILE: view_to_json(view)}
        for target in self.targets:
            files.update(render_target(target, view, options))
        files.update(self._bundle(program, ctx))
        artifacts = []
        for path, text in sorted(files.items()):
            target = ctx.workdir / path
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(text, Path):
                shutil.copyfile(text, target)
            else:
                target.write_text(text)
            artifacts.append(Artifact(path=path, ref=ctx.ref(path), kind="manifest"))
        kept = tuple(a for a in program.artifacts if a.kind != "manifest")
        idle = sum(1 for d in view.devices if d.stage is None)
        return PassResult(
            replace(program, artifacts=kept + tuple(artifacts)),
            f"{len(view.devices)} device manifests ({len(view.stages)} stages, {idle} idle devices), "
            f"targets {', '.join(t for t in self.targets if t != 'launch')} validated",
        )

    def _bundle(self, program: Program, ctx: PassContext) -> dict:
        """The tokenizer and the torch reference tokens of the check prompt, for `llmc run`."""
        import numpy as np

        from llmc.checkpoint import load_model, load_tokenizer
        from llmc.passes.export import hf_greedy_reference
        from llmc.run import REFERENCE, TOKENIZER_DIR

        checkpoint = ctx.path(program.model.checkpoint)
        files: dict = {f"{TOKENIZER_DIR}/{n}": checkpoint / n for n in TOKENIZER_FILES if (checkpoint / n).is_file()}
        ids = [int(t) for t in load_tokenizer(checkpoint)(self.check_prompt)["input_ids"]]
        reference = hf_greedy_reference(load_model(program, ctx), np.asarray([ids], dtype=np.int64), self.check_tokens)
        files[REFERENCE] = json.dumps({
            "new_tokens": self.check_tokens,
            "prompts": [{
                "prompt": self.check_prompt, "input_ids": ids,
                "tokens": [int(t) for t in reference.tokens[0]],
                "source": "greedy, KV cache, the quantized weights the stage graphs hold",
            }],
        }, indent=1) + "\n"
        return files
