"""The OpenAI-compatible server: ``build_app(engine, ...)`` (FastAPI), run by ``launch/serve.py``."""
from engine.server.app import build_app

__all__ = ["build_app"]
