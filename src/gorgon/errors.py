"""Typed errors, each with its HTTP status and LoRAX `error_type`."""

from __future__ import annotations


class GorgonError(Exception):
    status_code = 500
    error_type = "incomplete_generation"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ValidationError(GorgonError):
    """Bad request parameters (422). The message is prefixed as LoRAX does."""

    status_code = 422
    error_type = "validation"

    def __init__(self, message: str) -> None:
        super().__init__(f"Input validation error: {message}")


class OverloadedError(GorgonError):
    status_code = 429
    error_type = "overloaded"

    def __init__(self, message: str = "Model is overloaded") -> None:
        super().__init__(message)


class GenerationError(GorgonError):
    """A request failed during generation, e.g. an adapter that cannot be loaded (424)."""

    status_code = 424
    error_type = "generation"

    def __init__(self, message: str) -> None:
        super().__init__(f"Request failed during generation: {message}")


class IncompleteGenerationError(GorgonError):
    status_code = 500
    error_type = "incomplete_generation"


class ModelLoadError(GorgonError):
    """The model cannot be found or is not supported: raised at start, one clear sentence."""
