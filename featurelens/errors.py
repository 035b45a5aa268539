"""featurelens's own error classes: catch `FeaturelensError` to catch everything featurelens raises on purpose.

The base classes are defined in the engine (the bottom layer, which imports nothing above it); the specific
classes live next to the code that raises them and derive from `FeaturelensError`.
"""

from __future__ import annotations

from .engine.errors import FeaturelensError, InputError, MissingFileError

__all__ = ["FeaturelensError", "InputError", "MissingFileError"]
