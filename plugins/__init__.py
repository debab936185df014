"""TensorRT plugins for quantized GEMMs (installed as ``llmc.plugins``)."""
