"""Models by name: ``build_model(name, spec)``."""

from medbloom.models.registry import MODELS, build_model, default_model, resolve_model

__all__ = ["MODELS", "build_model", "default_model", "resolve_model"]
