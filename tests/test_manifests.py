"""Launch manifests: every target rendered from the view model, validated offline, re-rendered
by `llmc render`; a broken template fails with the file, document and field named."""

from __future__ import annotations

import json
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from llmc.artifacts import verify_sums
from llmc.ir import EngineBuild
from llmc.catalog import load_catalog
from llmc.cli import cli
from llmc.passes.manifest_checks import ManifestInvalid
from llmc.passes.manifests import (
    TARGETS,
    DeployOptions,
    DeviceView,
    GraphView,
    LaunchView,
    MemoryView,
    StageView,
    gpu_products,
    render_target,
    view_from_json,
    view_to_json,
)

GOLDENS = Path(__file__).parent / "goldens" / "manifests"


def example_view() -> LaunchView:
    """A hand-made view: A100 + L4 in one node, H100 in another, one idle L4."""
    catalog = load_catalog()
    placed = [("box-a/gpu0", "A100-40G", 0, 8), ("box-a/gpu1", "L4", 8, 9), ("box-b/gpu0", "H100-80G", 9, 30)]
    stages = []
    for k, (device, sku, start, end) in enumerate(placed):
        stages.append(StageView(
            index=k, device=device, node=device.split("/")[0], gpu=int(device[-1]), sku=sku,
            compute_capability=catalog[sku].compute_capability, gpu_products=gpu_products(catalog[sku]),
            slurm_feature=sku, layer_start=start, layer_end=end, holds_embedding=k == 0, holds_lm_head=k == 2,
            graph=GraphView(f"stages/stage_{k}.onnx", f"{k:064x}",
                            {"input_ids" if k == 0 else "hidden_states_in": ["batch", "seq"], "position_ids": ["batch", "seq"]},
                            {"logits" if k == 2 else "hidden_states_out": ["batch", "seq", 576]}),
            memory=MemoryView(1000 * (k + 1), 2000, 300 if k == 0 else 0, 300 if k == 2 else 0, 500, 40 * 2**30),
            service=f"mixed-lab-stage-{k}",
            previous=placed[k - 1][0] if k else None, next=placed[k + 1][0] if k < 2 else None,
            previous_service=f"mixed-lab-stage-{k - 1}" if k else None,
            next_service=f"mixed-lab-stage-{k + 1}" if k < 2 else None,
            engine=(EngineBuild(k, sku, "9.0", "skipped", None, None, (), False, "no sm90 builder here",
                                "llmc build-engines OUT --device H100-80G") if sku == "H100-80G" else
                    EngineBuild(k, sku, catalog[sku].compute_capability, "built",
                                f"engines/{sku}-sm{catalog[sku].compute_capability.replace('.', '')}-trtrtx1.7/"
                                f"stage_{k}.engine", "tensorrt_rtx 1.7", ("llmc::IntNLinear v1 x7",), False, "",
                                f"llmc build-engines OUT --device {sku}")),
        ))
    devices = tuple(DeviceView(s.device, s.node, s.gpu, s.sku, s.compute_capability, s.index) for s in stages)
    devices += (DeviceView("box-b/gpu1", "box-b", 1, "L4", "8.9", None),)
    return LaunchView(llmc_version="0.1.0", cluster="mixed-lab", model="llama", stages=tuple(stages),
                      devices=devices, workload={"batch": 8, "prompt_tokens": 512, "generated_tokens": 128})


def test_gpu_product_labels_come_from_the_catalogs_nvml_names():
    catalog = load_catalog()
    assert gpu_products(catalog["A100-40G"]) == ("NVIDIA-A100-SXM4-40GB",)
    assert gpu_products(catalog["H100-80G"]) == ("NVIDIA-H100-80GB-HBM3",)
    assert gpu_products(catalog["T4"]) == ("Tesla-T4", "NVIDIA-T4")


@pytest.mark.parametrize("target", TARGETS)
def test_every_target_matches_its_golden(target, update_goldens):
    files = render_target(target, example_view(), DeployOptions())
    for path, text in files.items():
        golden = GOLDENS / path.removeprefix("manifests/")
        if update_goldens:
            golden.parent.mkdir(parents=True, exist_ok=True)
            golden.write_text(text)
        assert golden.is_file(), f"no golden {golden}: run pytest --update-goldens and review the diff"
        assert text == golden.read_text(), f"{path} differs from {golden} (pytest --update-goldens, then review)"


def test_the_view_round_trips_through_json():
    view = example_view()
    assert view_from_json(view_to_json(view)) == view


def test_kubernetes_target_wires_stages_by_service_name():
    files = render_target("kubernetes", example_view(), DeployOptions(image="registry.local/llmc:1"))
    documents = list(yaml.safe_load_all(next(iter(files.values()))))
    jobs = [d for d in documents if d["kind"] == "Job"]
    assert [d["kind"] for d in documents] == ["Service", "Job"] * 3
    for k, job in enumerate(jobs):
        pod = job["spec"]["template"]["spec"]
        env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
        assert env["RANK"] == str(k) and env["WORLD_SIZE"] == "3" and env["MASTER_ADDR"] == "mixed-lab-stage-0"
        assert pod["containers"][0]["command"][:3] == ["llmc", "run-stage", "/build"]
        assert pod["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": 1}
        assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "llmc-build"
    assert env["LLMC_PREVIOUS_STAGE"] == "mixed-lab-stage-1" and env["LLMC_NEXT_STAGE"] == ""
    terms = jobs[1]["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms[0]["matchExpressions"][0] == {"key": "nvidia.com/gpu.product", "operator": "In", "values": ["NVIDIA-L4"]}


def test_kuberay_target_has_one_worker_group_per_sku():
    files = render_target("kuberay", example_view(), DeployOptions())
    (cluster,) = yaml.safe_load_all(next(iter(files.values())))
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"a100-40g", "l4", "h100-80g"}
    assert all(g["replicas"] == 1 for g in groups.values())
    assert json.loads(json.loads(groups["l4"]["rayStartParams"]["resources"])) == {"llmc-sku-l4": 1}


def _broken_templates(tmp_path: Path, target_file: str, old: str, new: str) -> Path:
    templates = tmp_path / "templates"
    shutil.copytree(Path(str(resources.files("llmc.templates"))), templates)
    path = templates / target_file
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    return templates


@pytest.mark.parametrize("target, template, old, new, message", [
    # A misspelled field: the Kubernetes schema (strict) rejects it, naming document and field.
    ("kubernetes", "kubernetes/v1.yaml.j2", "      containers:\n", "      containerz:\n",
     "manifests/kubernetes/mixed-lab.yaml: document 2 (Job mixed-lab-stage-0): spec.template.spec: "),
    # A field the KubeRay CRD does not have.
    ("kuberay", "kuberay/ray.io-v1.yaml.j2", "      replicas:", "      replica:",
     "manifests/kuberay/mixed-lab.yaml: document 1 (RayCluster mixed-lab-llmc): spec.workerGroupSpecs.2: "
     "Additional properties are not allowed ('replica' was unexpected) (KubeRay v1.3 RayCluster schema)"),
    # Broken indentation: yamllint names the line.
    ("launch", "launch/llmc-v1.yaml.j2", "  node: {{", "   node: {{", "manifests/box-a-gpu0.yaml: line "),
    # A shell syntax error: bash -n.
    ("shell", "shell/torchrun.sh.j2", "esac\n", "esca\n", "manifests/shell/mixed-lab.sh: bash -n: "),
    # An undefined variable: StrictUndefined stops the render.
    ("slurm", "slurm/sbatch-hetjob.sh.j2", "{{ options.slurm_time }}", "{{ options.slurm_tiem }}",
     "templates/slurm/sbatch-hetjob.sh.j2: line 10: UndefinedError: "),
    # Valid YAML, but an engine the build does not hold.
    ("launch", "launch/llmc-v1.yaml.j2", "engine: {{ stage.engine.path | tojson }}", 'engine: "engines/stage.engine"',
     "manifests/box-a-gpu0.yaml: stage.engine: 'engines/stage.engine' but the build holds "
     "'engines/A100-40G-sm80-trtrtx1.7/stage_0.engine'"),
    # Valid YAML and schema, but not what the plan says: the wrong GPU.
    ("kubernetes", "kubernetes/v1.yaml.j2", "values: {{ s.gpu_products | list | tojson }}", 'values: ["NVIDIA-T4"]',
     "spec.template.spec.affinity: nvidia.com/gpu.product ['NVIDIA-T4'], planned ['NVIDIA-A100-SXM4-40GB']"),
])
def test_a_broken_template_fails_validation_with_a_clear_message(tmp_path, target, template, old, new, message):
    templates = _broken_templates(tmp_path, template, old, new)
    with pytest.raises(ManifestInvalid) as caught:
        render_target(target, example_view(), DeployOptions(), template_dir=templates)
    assert message in str(caught.value), str(caught.value)
    assert "\n" not in str(caught.value) and caught.value.exit_code == 6


def test_compile_writes_validated_manifests_for_every_target(pipeline_build):
    out = pipeline_build
    plan = json.loads((out / "plan.json").read_text())
    assert len(plan["stages"]) == 3
    for path in ("manifests/kubernetes/tiny-lab.yaml", "manifests/kuberay/tiny-lab.yaml",
                 "manifests/slurm/tiny-lab.sbatch", "manifests/shell/tiny-lab.sh", "manifests/launch-view.json",
                 "manifests/box-a-gpu0.yaml", "manifests/box-a-gpu1.yaml", "manifests/box-b-gpu0.yaml",
                 "run/reference.json", "tokenizer/tokenizer.json"):
        assert (out / path).is_file(), path
    view = view_from_json((out / "manifests/launch-view.json").read_text())
    assert [(s.layer_start, s.layer_end) for s in view.stages] == [(s["layer_start"], s["layer_end"]) for s in plan["stages"]]
    by_sku = {}
    for s in plan["stages"]:
        by_sku.setdefault(s["sku"], []).append(s["index"])
    assert {g.sku: list(g.stages) for g in view.sku_groups} == by_sku
    assert sorted(stage for node in view.nodes for stage in node.stages) == [0, 1, 2]
    for script in ("manifests/slurm/tiny-lab.sbatch", "manifests/shell/tiny-lab.sh"):
        assert subprocess.run(["bash", "-n", str(out / script)]).returncode == 0
    # Each stage's launch manifest names its engine, or says why there is none and how to build it.
    engines = {e["stage"]: e for e in plan["engines"]}
    for s in plan["stages"]:
        manifest = yaml.safe_load((out / f"manifests/{s['device'].replace('/', '-')}.yaml").read_text())
        engine = engines[s["index"]]
        assert manifest["stage"]["engine"] == engine["path"]
        if engine["path"] is not None:
            assert (out / engine["path"]).is_file()


def test_render_rerenders_without_recompiling(pipeline_build, tmp_path):
    build = tmp_path / "build"
    shutil.copytree(pipeline_build, build)
    result = CliRunner().invoke(cli, ["render", str(build), "--target", "kubernetes", "--image", "registry.local/llmc:2",
                                      "--namespace", "inference", "--gpu-product", "pico=NVIDIA-L4", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["files"] == ["manifests/kubernetes/tiny-lab.yaml"]
    text = (build / "manifests/kubernetes/tiny-lab.yaml").read_text()
    assert "registry.local/llmc:2" in text and 'namespace: "inference"' in text and '["NVIDIA-L4"]' in text
    assert verify_sums(build) == []  # SHA256SUMS follows the re-render

    elsewhere = tmp_path / "rendered"
    result = CliRunner().invoke(cli, ["render", str(build), "-o", str(elsewhere)])
    assert result.exit_code == 0, result.output
    assert {p.relative_to(elsewhere).as_posix() for p in elsewhere.rglob("*") if p.is_file()} == {
        "manifests/box-a-gpu0.yaml", "manifests/box-a-gpu1.yaml", "manifests/box-b-gpu0.yaml",
        "manifests/kubernetes/tiny-lab.yaml", "manifests/kuberay/tiny-lab.yaml", "manifests/slurm/tiny-lab.sbatch",
        "manifests/shell/tiny-lab.sh",
    }


def test_render_refuses_what_it_cannot_render(tmp_path, pipeline_build):
    result = CliRunner().invoke(cli, ["render", str(tmp_path)])
    assert result.exit_code == 2 and "no manifests/launch-view.json" in result.stderr
    result = CliRunner().invoke(cli, ["render", str(pipeline_build), "--gpu-product", "L4"])
    assert result.exit_code == 2 and "expected SKU=LABEL" in result.stderr
