"""The base of featurelens's own errors. It lives in the engine, the bottom layer, so every layer can derive from it.

An error featurelens raises on purpose (bad input, a missing or corrupt file, an unknown model or hook) derives from
`FeaturelensError`; the command line prints those as one line. Anything else is a bug and keeps its traceback.

>>> from featurelens.errors import FeaturelensError, InputError
>>> issubclass(InputError, ValueError) and issubclass(InputError, FeaturelensError)
True
"""

from __future__ import annotations


class FeaturelensError(Exception):
    """Raised on purpose by featurelens: the message says what is wrong and how to fix it."""


class InputError(FeaturelensError, ValueError):
    """Bad input (an argument, a spec, a combination of options) with no more specific class."""


class MissingFileError(FeaturelensError, FileNotFoundError):
    """A file or directory the user named (a model, a dictionary, an analysis, a cache) is not there."""
