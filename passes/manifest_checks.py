"""Offline validation of rendered launch manifests, before any of them is kept.

Per file, in order, the first failure raising :class:`~llmc.errors.VerificationError` with the
file, the document and the field:

1. YAML files pass yamllint (:data:`YAMLLINT_CONFIG`) and parse.
2. Kubernetes objects validate against the JSON Schema of Kubernetes :data:`KUBERNETES_VERSION`
   (the ``kubernetes-validate`` package, strict: unknown fields are errors, as with
   ``kubectl apply --validate=strict``).
3. RayClusters validate against the vendored schema of KubeRay :data:`KUBERAY_VERSION`, whose
   embedded core types resolve to the same Kubernetes version.
4. Scripts pass ``bash -n``.
5. Every file says what the plan says: one worker per stage with its rank, its GPU product and
   one GPU, neighbours and rendezvous wired by name.
"""

from __future__ import annotations

import json
import re
import subprocess
from importlib import resources

from llmc.errors import ToolchainError, VerificationError

KUBERNETES_VERSION = "1.33.0"
KUBERAY_VERSION = "v1.3"
KUBERAY_SCHEMA = "schemas/kuberay-v1.3-raycluster.schema.json"
YAMLLINT_CONFIG = """\
extends: default
rules:
  line-length: {max: 200}
  comments: {min-spaces-from-content: 2}
  truthy: {allowed-values: ["true", "false"], check-keys: true}
"""
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


class ManifestInvalid(VerificationError):
    """A rendered manifest failed validation (a template bug, or options that make it invalid)."""

    def __init__(self, path: str, where: str, problem: str):
        super().__init__(f"{path}: {where + ': ' if where else ''}{problem} (the template or the render options are wrong)")


def _require(module: str) -> None:
    from importlib.util import find_spec

    if find_spec(module) is None:
        raise ToolchainError(
            f"validating manifests needs the {module} package: install llmc with its deploy extra "
            "(pip install -e \".[deploy]\")"
        )


def validate_rendered(target: str, path: str, text: str, view, options) -> None:
    """Rules 1-5 for one rendered file of ``target``."""
    if path.endswith(".yaml"):
        documents = _lint_and_parse(path, text)
        if target == "launch":
            _check_launch(path, documents, view)
        elif target == "kubernetes":
            for i, doc in enumerate(documents):
                _kubernetes_schema(path, i, doc)
            _check_kubernetes(path, documents, view, options)
        elif target == "kuberay":
            for i, doc in enumerate(documents):
                _kuberay_schema(path, i, doc)
            _check_kuberay(path, documents, view)
    else:
        _bash_syntax(path, text)
        if target == "slurm":
            _check_slurm(path, text, view)
        elif target == "shell":
            _check_shell(path, text, view)


# --------------------------------------------------------------------------- rules 1-4


def _lint_and_parse(path: str, text: str) -> list[dict]:
    _require("yamllint")
    import yaml
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    problems = list(linter.run(text, YamlLintConfig(YAMLLINT_CONFIG)))
    if problems:
        p = problems[0]
        raise ManifestInvalid(path, f"line {p.line}", f"yamllint: {p.desc} ({p.rule})")
    try:
        return [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:  # yamllint catches syntax errors first; kept for safety
        raise ManifestInvalid(path, "", f"not YAML: {e}") from None


def _where(index: int, doc: dict, error) -> str:
    name = f"{doc.get('kind', '?')} {doc.get('metadata', {}).get('name', '?')}"
    field = ".".join(str(p) for p in error.absolute_path) or "(top level)"
    return f"document {index + 1} ({name}): {field}"


def _kubernetes_schema(path: str, index: int, doc: dict) -> None:
    _require("kubernetes_validate")
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        raise ManifestInvalid(path, _where(index, doc, e), f"{e.message} (Kubernetes {KUBERNETES_VERSION} schema)") from None
    except kubernetes_validate.SchemaNotFoundError as e:
        raise ManifestInvalid(path, f"document {index + 1}", e.message) from None


def _kubernetes_registry():
    """The pinned Kubernetes version's definitions, for the CRD schema's references to core types."""
    _require("kubernetes_validate")
    import kubernetes_validate
    from referencing import Registry, Resource

    definitions = resources.files(kubernetes_validate).joinpath(
        f"kubernetes-json-schema/v{KUBERNETES_VERSION}-local-strict/_definitions.json"
    )
    return Resource.from_contents(json.loads(definitions.read_text())) @ Registry()


def _kuberay_schema(path: str, index: int, doc: dict) -> None:
    _require("jsonschema")
    import jsonschema

    schema = json.loads(resources.files("llmc").joinpath(KUBERAY_SCHEMA).read_text())
    validator = jsonschema.Draft202012Validator(schema, registry=_kubernetes_registry())
    error = jsonschema.exceptions.best_match(validator.iter_errors(doc))
    if error is not None:
        raise ManifestInvalid(path, _where(index, doc, error), f"{error.message} (KubeRay {KUBERAY_VERSION} RayCluster schema)")


def _bash_syntax(path: str, text: str) -> None:
    result = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
    if result.returncode != 0:
        raise ManifestInvalid(path, "", f"bash -n: {result.stderr.strip().splitlines()[0]}")


# --------------------------------------------------------------------------- rule 5


def _fail(path: str, where: str, problem: str):
    raise ManifestInvalid(path, where, problem)


def _check_launch(path: str, documents: list[dict], view) -> None:
    (doc,) = documents
    device = next((d for d in view.devices if d.name == doc.get("device", {}).get("name")), None)
    if doc.get("kind") != "LaunchManifest" or device is None:
        _fail(path, "device.name", "the manifest does not name a device of the cluster")
    if device.stage is None:
        if doc.get("stage") is not None:
            _fail(path, "stage", f"idle device {device.name} declares a stage")
        return
    stage = view.stages[device.stage]
    if doc["stage"].get("layers") != [stage.layer_start, stage.layer_end]:
        _fail(path, "stage.layers", f"{doc['stage'].get('layers')} but the plan says [{stage.layer_start}, {stage.layer_end}]")
    if doc["stage"].get("graph_sha256") != stage.graph.sha256:
        _fail(path, "stage.graph_sha256", "does not match the stage graph")
    built = stage.engine.path if stage.engine is not None and stage.engine.status == "built" else None
    if doc["stage"].get("engine") != built:
        _fail(path, "stage.engine", f"{doc['stage'].get('engine')!r} but the build holds {built!r}")


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def _gpu_products(pod_spec: dict) -> list[str]:
    terms = pod_spec.get("affinity", {}).get("nodeAffinity", {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution", {}).get("nodeSelectorTerms", [])
    return [v for t in terms for e in t.get("matchExpressions", []) if e.get("key") == "nvidia.com/gpu.product"
            for v in e.get("values", [])]


def _check_kubernetes(path: str, documents: list[dict], view, options) -> None:
    jobs = {d["metadata"]["name"]: d for d in documents if d.get("kind") == "Job"}
    services = {d["metadata"]["name"]: d for d in documents if d.get("kind") == "Service"}
    if len(jobs) != len(view.stages) or len(services) != len(view.stages):
        _fail(path, "", f"{len(jobs)} Jobs and {len(services)} Services for {len(view.stages)} stages")
    for name in services:
        if not _DNS_1035.match(name):
            _fail(path, f"Service {name}", "metadata.name is not a DNS-1035 label")
    for stage in view.stages:
        job = jobs.get(stage.service)
        if job is None or stage.service not in services:
            _fail(path, f"stage {stage.index}", f"no Job and Service named {stage.service!r}")
        pod = job["spec"]["template"]["spec"]
        where = f"Job {stage.service}: spec.template.spec"
        container = pod["containers"][0]
        env = _env(container)
        expected = {"RANK": str(stage.index), "WORLD_SIZE": str(len(view.stages)),
                    "MASTER_ADDR": view.stages[0].service, "MASTER_PORT": str(options.master_port)}
        for key, value in expected.items():
            if env.get(key) != value:
                _fail(path, f"{where}.containers[0].env.{key}", f"{env.get(key)!r}, expected {value!r}")
        if str(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")) != "1":
            _fail(path, f"{where}.containers[0].resources.limits", "must request exactly one nvidia.com/gpu")
        if sorted(_gpu_products(pod)) != sorted(stage.gpu_products):
            _fail(path, f"{where}.affinity", f"nvidia.com/gpu.product {_gpu_products(pod)}, planned {list(stage.gpu_products)}")
        labels = job["spec"]["template"]["metadata"]["labels"]
        selector = services[stage.service]["spec"].get("selector", {})
        if any(labels.get(k) != v for k, v in selector.items()) or not selector:
            _fail(path, f"Service {stage.service}: spec.selector", "does not select its stage's pod")


def _check_kuberay(path: str, documents: list[dict], view) -> None:
    (cluster,) = documents
    groups = {g["groupName"]: g for g in cluster["spec"].get("workerGroupSpecs", [])}
    for group in view.sku_groups:
        spec = groups.get(group.name)
        where = f"workerGroupSpecs[{group.name}]"
        if spec is None:
            _fail(path, "spec.workerGroupSpecs", f"no worker group for SKU {group.sku}")
        if spec.get("replicas") != len(group.stages) or spec.get("maxReplicas") != len(group.stages):
            _fail(path, where, f"{spec.get('replicas')} replicas for {len(group.stages)} stages")
        pod = spec["template"]["spec"]
        if sorted(_gpu_products(pod)) != sorted(group.gpu_products):
            _fail(path, f"{where}.template.spec.affinity", f"nvidia.com/gpu.product {_gpu_products(pod)}")
        if str(pod["containers"][0].get("resources", {}).get("limits", {}).get("nvidia.com/gpu")) != "1":
            _fail(path, f"{where}.template.spec.containers[0]", "must request exactly one nvidia.com/gpu")
        if group.ray_resource not in spec["rayStartParams"].get("resources", ""):
            _fail(path, f"{where}.rayStartParams.resources", f"does not advertise {group.ray_resource}")
    if len(groups) != len(view.sku_groups):
        _fail(path, "spec.workerGroupSpecs", f"{len(groups)} groups for {len(view.sku_groups)} SKUs")


def _check_slurm(path: str, text: str, view) -> None:
    components = re.findall(r"^#SBATCH .*--constraint=(\S+)", text, re.M)
    separators = re.findall(r"^#SBATCH hetjob\s*$", text, re.M)
    if components != [s.slurm_feature for s in view.stages] or len(separators) != len(view.stages) - 1:
        _fail(path, "#SBATCH", f"{len(components)} het components ({len(separators)} separators) for {len(view.stages)} stages")
    ranks = re.findall(r"--het-group=(\d+) --export=ALL,RANK=(\d+)", text)
    if len(view.stages) == 1:
        ranks = [("0", r) for r in re.findall(r"^srun --export=ALL,RANK=(\d+)", text, re.M)]
    if ranks != [(str(s.index), str(s.index)) for s in view.stages]:
        _fail(path, "srun", f"het groups and ranks {ranks} do not follow the stages")


def _check_shell(path: str, text: str, view) -> None:
    # torchrun numbers ranks node by node; --rank-stages maps them back to the plan's stages.
    order = ",".join(str(stage) for node in view.nodes for stage in node.stages)
    if f"--rank-stages {order} " not in text:
        _fail(path, "torchrun", f"does not pass --rank-stages {order}")
    for rank, node in enumerate(view.nodes):
        if not re.search(rf"^\s+{re.escape(node.name)}\)\n\s+node_rank={rank}\n\s+stages={len(node.stages)}$", text, re.M):
            _fail(path, f"node {node.name}", f"no case branch with node_rank={rank} and stages={len(node.stages)}")
