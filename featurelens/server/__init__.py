"""The featurelens web app: a local Neuronpedia with a circuit explorer (`featurelens serve`).

>>> from featurelens.server import create_app
>>> app = create_app("~/.cache/featurelens")     # a FastAPI app; the pages are at /, the API under /api
"""

from .app import create_app

__all__ = ["create_app"]
