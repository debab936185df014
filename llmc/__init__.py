"""llmc: an offline compiler for LLM deployments on heterogeneous GPU fleets."""

__version__ = "0.1.0"
