"""`manifests`: one launch manifest per declared device, rendered from a jinja2 template.

Every rendered manifest is parsed back and checked against the plan before it is kept, so a
template mistake fails the compile instead of the deployment.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

from llmc.ir import Artifact, Program
from llmc.pipeline import Pass, PassContext, PassResult


def template_environment():
    """The one jinja2 environment: package templates, StrictUndefined, stable output."""
    from importlib import resources

    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(resources.files("llmc.templates"))),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )


def manifest_filename(device: str) -> str:
    return f"manifests/{device.replace('/', '-')}.yaml"


def check_manifest(text: str, device: str, stage) -> None:
    """Parse a rendered manifest and check it says what the plan says."""
    import yaml

    doc = yaml.safe_load(text)
    if doc.get("kind") != "LaunchManifest" or doc["device"]["name"] != device:
        raise ValueError(f"manifest for {device} does not name its device")
    if stage is None:
        if doc["stage"] is not None:
            raise ValueError(f"manifest for idle {device} declares a stage")
        return
    if doc["stage"]["layers"] != [stage.layer_start, stage.layer_end]:
        raise ValueError(f"manifest for {device} has layers {doc['stage']['layers']}")


@dataclass(frozen=True)
class ManifestsPass(Pass):
    name = "manifests"
    batch: int
    prompt_tokens: int
    generated_tokens: int

    def requires(self, program: Program) -> None:
        if program.plan is None:
            raise ValueError("manifests need a plan; run 'plan' first")
        if not any(a.kind == "onnx" for a in program.artifacts):
            raise ValueError("manifests need the stage graphs; run 'export' first")

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        import llmc
        from llmc.artifacts import sha256_file

        template = template_environment().get_template("launch.yaml.j2")
        graphs = {a.path: a for a in program.artifacts if a.kind == "onnx"}
        stages = {s.device: s for s in program.plan.stages}
        order = [s.device for s in program.plan.stages]
        workload = dict(batch=self.batch, prompt_tokens=self.prompt_tokens, generated_tokens=self.generated_tokens)
        artifacts = []
        for device in ctx.cluster.devices:
            stage = stages.get(device.name)
            graph = None
            previous = next_ = None
            if stage is not None:
                path = f"stages/stage_{stage.index}.onnx"
                meta = json.loads(ctx.path(graphs[path].ref.replace(".onnx", ".json")).read_text())
                graph = dict(path=path, sha256=sha256_file(ctx.path(graphs[path].ref)), **meta)
                k = order.index(device.name)
                previous = order[k - 1] if k > 0 else None
                next_ = order[k + 1] if k + 1 < len(order) else None
            text = template.render(
                llmc_version=llmc.__version__,
                cluster=ctx.cluster.name,
                device=dict(name=device.name, node=device.node, sku=device.sku.name,
                            compute_capability=device.sku.compute_capability),
                stage=stage,
                stage_count=len(order),
                idle_reason="the model fits on fewer devices without a slower stage",
                graph=graph,
                previous=previous,
                next=next_,
                workload=workload,
            )
            check_manifest(text, device.name, stage)
            filename = manifest_filename(device.name)
            target = ctx.workdir / filename
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
            artifacts.append(Artifact(path=filename, ref=ctx.ref(filename), kind="manifest"))
        kept = tuple(a for a in program.artifacts if a.kind != "manifest")
        return PassResult(
            replace(program, artifacts=kept + tuple(artifacts)),
            f"{len(artifacts)} manifests ({len(order)} stages, {len(artifacts) - len(order)} idle devices)",
        )
