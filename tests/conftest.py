"""Shared fixtures. Helpers for building tiny models live in tests/helpers.py (on pytest's pythonpath)."""
