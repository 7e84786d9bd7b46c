"""Minimal example configs showing how to register a model (see toy.py)."""
