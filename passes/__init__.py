"""Compiler passes, one module per pass (installed as ``llmc.passes``)."""
