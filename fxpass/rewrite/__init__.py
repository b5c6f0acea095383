"""Stage 2: rewrite rules (match -> check -> apply) and ``apply``, which runs them atomically."""

from fxpass.rewrite.pipeline import apply, vllm_linear_names

__all__ = ["apply", "vllm_linear_names"]
