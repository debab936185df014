"""The planner's optional input files, referenced from model.yaml's ``planner`` section.

- A **profile** (``kind: Profile``): measured decoder-layer latencies per GPU SKU, phase, bits,
  batch and sequence length. Where it covers a (SKU, phase, bits), the planner uses it instead of
  the roofline (passes/costs.py, rule 7).
- A **sensitivity table** (``kind: Sensitivity``): omega(layer, bits), the quality cost of
  storing each decoder layer at each bit-width, for the quality budget. The ``sensitivity`` pass
  will produce the same table in the program (:class:`llmc.ir.Sensitivity`); a file given in
  model.yaml wins over it.

Both are YAML or JSON, ``apiVersion: llmc/v1``, validated here once; errors name the file and
the field. See docs/planner.md for examples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from llmc.config import FieldPathError, _read_yaml, _Strict, _validate
from llmc.errors import ConfigError

PlannerBits = Literal[2, 3, 4, 8, 16]


class LayerTiming(_Strict):
    phase: Literal["prefill", "decode"] = Field(
        description="prefill: one micro-batch of whole prompts; decode: one generated token per sequence."
    )
    bits: PlannerBits = Field(description="Weight bit-width of the measured layer (16: float).")
    batch: int = Field(ge=1, le=65536, description="Sequences in the measured micro-batch.")
    seq_len: int = Field(
        ge=1, le=1 << 20,
        description="prefill: prompt tokens per sequence; decode: tokens already in the KV cache.",
    )
    seconds: float = Field(gt=0, description="Wall time of one decoder layer for that micro-batch, seconds.")


class DeviceProfile(_Strict):
    sku: str = Field(description="Catalog SKU name or alias, or a custom SKU declared in cluster.yaml.")
    layers: list[LayerTiming] = Field(min_length=1, description="Measured decoder-layer latencies.")

    @model_validator(mode="after")
    def _unique(self):
        seen: dict[tuple, int] = {}
        for i, t in enumerate(self.layers):
            key = (t.phase, t.bits, t.batch, t.seq_len)
            if key in seen:
                raise FieldPathError(f"layers[{i}]", f"same phase, bits, batch and seq_len as layers[{seen[key]}]")
            seen[key] = i
        return self


class ProfileFile(_Strict):
    apiVersion: Literal["llmc/v1"] = Field(description="Schema version; 'llmc/v1'.")
    kind: Literal["Profile"] = Field(description="Always 'Profile'.")
    model: str = Field(description="The model the layers were measured on (for people; not checked).")
    devices: list[DeviceProfile] = Field(min_length=1, description="Per GPU SKU, its measured layers.")


class SensitivityRow(_Strict):
    layer: int = Field(ge=0, description="Decoder layer index.")
    omega: dict[int, float] = Field(
        min_length=1,
        description="Quality cost of storing the layer at each bit-width (larger: more quality lost); "
        "every bit-width in planner.bits needs a value.",
    )

    @field_validator("omega")
    @classmethod
    def _non_negative(cls, value: dict) -> dict:
        for bits, omega in value.items():
            if bits not in (2, 3, 4, 8, 16):
                raise ValueError(f"bit-width {bits} is not one of 2, 3, 4, 8, 16")
            if not omega >= 0:
                raise ValueError(f"omega at {bits} bits must be >= 0 (got {omega})")
        return value


class SensitivityFile(_Strict):
    apiVersion: Literal["llmc/v1"] = Field(description="Schema version; 'llmc/v1'.")
    kind: Literal["Sensitivity"] = Field(description="Always 'Sensitivity'.")
    indicator: str = Field(
        min_length=1, description="How omega was computed, e.g. 'llm-pq-variance' or 'hessian-trace'."
    )
    layers: list[SensitivityRow] = Field(min_length=1, description="One row per decoder layer, in order.")

    @model_validator(mode="after")
    def _in_order(self):
        for i, row in enumerate(self.layers):
            if row.layer != i:
                raise FieldPathError(f"layers[{i}].layer", f"expected {i}: rows list the layers in order, once each")
        return self


def read_profile(path: Path) -> ProfileFile:
    """Parse and validate a profile file (ConfigError naming the file and field)."""
    return _validate(ProfileFile, _read_yaml(path), str(path), "Profile")


def read_sensitivity(path: Path) -> SensitivityFile:
    """Parse and validate a sensitivity table (ConfigError naming the file and field)."""
    return _validate(SensitivityFile, _read_yaml(path), str(path), "Sensitivity")


def check_sensitivity(table: SensitivityFile, path: Path, layers: int, bits: tuple[int, ...]) -> None:
    """The table must cover every layer of the model at every bit-width the planner costs."""
    if len(table.layers) != layers:
        raise ConfigError(str(path), "layers", f"has {len(table.layers)} rows but the model has {layers} decoder layers")
    for i, row in enumerate(table.layers):
        missing = [b for b in bits if b not in row.omega]
        if missing:
            raise ConfigError(
                str(path), f"layers[{i}].omega",
                f"no value at {', '.join(map(str, missing))} bits (planner.bits and quantization.bits need one)",
            )
