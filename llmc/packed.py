"""The quantized weight of one linear layer, as quantizers produce it and export consumes it.

Integer codes are held unpacked (one int8 per weight) in memory; packing to 4 bits happens
where a file format needs it (ONNX INT4/UINT4 initializers, the safetensors cache).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackedLinear:
    """Group-wise integer weights of a ``y = x @ W.T`` linear, ``W`` of shape [out, in].

    Dequantized weight: ``W[o, i] = scale[o, i // group_size] * (q[o, i] - zero[o, i // group_size])``
    with ``zero`` absent (0) when ``symmetric``.

    - ``q``: int8 tensor [out, in]. Symmetric codes lie in [-2^(b-1), 2^(b-1) - 1];
      asymmetric codes in [0, 2^b - 1].
    - ``scale``: float32 tensor [out, in // group_size].
    - ``zero``: int8 tensor [out, in // group_size] (asymmetric only), codes in [0, 2^b - 1].
    - ``group_size``: input columns per group; equal to ``in`` for per-channel.
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    group_size: int
    symmetric: bool

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [out, in] these codes stand for."""
        scale = self.scale.repeat_interleave(self.group_size, dim=1)
        codes = self.q.to(torch.float32)
        if self.zero is not None:
            codes = codes - self.zero.to(torch.float32).repeat_interleave(self.group_size, dim=1)
        return codes * scale

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Flat tensors for a safetensors file; inverse of :meth:`from_tensors`."""
        tensors = {
            f"{prefix}.q": self.q.contiguous(),
            f"{prefix}.scale": self.scale.contiguous(),
            f"{prefix}.meta": torch.tensor(
                [self.bits, self.group_size, int(self.symmetric)], dtype=torch.int32
            ),
        }
        if self.zero is not None:
            tensors[f"{prefix}.zero"] = self.zero.contiguous()
        return tensors

    @staticmethod
    def from_tensors(tensors: dict[str, torch.Tensor], prefix: str) -> PackedLinear:
        bits, group_size, symmetric = (int(v) for v in tensors[f"{prefix}.meta"].tolist())
        return PackedLinear(
            q=tensors[f"{prefix}.q"],
            scale=tensors[f"{prefix}.scale"],
            zero=tensors.get(f"{prefix}.zero"),
            bits=bits,
            group_size=group_size,
            symmetric=bool(symmetric),
        )


def other_rows(rows: int, chosen: torch.Tensor) -> torch.Tensor:
    """The indices in ``range(rows)`` not in ``chosen``, ascending (int64)."""
    keep = torch.ones(rows, dtype=torch.bool)
    keep[chosen.long()] = False
    return torch.nonzero(keep).flatten()


@dataclass(frozen=True)
class MixedRowLinear:
    """MixLLM's output-feature mix: the salient output rows at high bits, the rest at low bits,
    each part a :class:`PackedLinear` holding its rows in ascending order.

    ``W[high_rows] = high.dequantize()``, ``W[other rows] = low.dequantize()``: the layer computes
    both partial products and scatters their columns back into output order.

    - ``high_rows``: int32 [n_high], ascending, the output features stored in ``high``.
    """

    low: PackedLinear
    high: PackedLinear
    high_rows: torch.Tensor

    @property
    def out_features(self) -> int:
        return self.low.q.shape[0] + self.high.q.shape[0]

    def low_rows(self) -> torch.Tensor:
        """The complement of ``high_rows``, ascending (int64)."""
        return other_rows(self.out_features, self.high_rows)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [out, in]: each part's rows scattered back to their positions."""
        low, high = self.low.dequantize(), self.high.dequantize()
        weight = torch.empty(self.out_features, low.shape[1], dtype=torch.float32)
        weight[self.low_rows()] = low
        weight[self.high_rows.long()] = high
        return weight

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        tensors = {**self.low.to_tensors(f"{prefix}.low"), **self.high.to_tensors(f"{prefix}.high")}
        tensors[f"{prefix}.high_rows"] = self.high_rows.to(torch.int32).contiguous()
        return tensors

    @staticmethod
    def from_tensors(tensors: dict[str, torch.Tensor], prefix: str) -> MixedRowLinear:
        return MixedRowLinear(
            low=PackedLinear.from_tensors(tensors, f"{prefix}.low"),
            high=PackedLinear.from_tensors(tensors, f"{prefix}.high"),
            high_rows=tensors[f"{prefix}.high_rows"],
        )
