"""Jinja2 templates shipped as package data (installed as ``llmc.templates``)."""
