"""Gorgon: fast, exact LLM serving with Medusa speculative decoding."""

__version__ = "0.1.0"
