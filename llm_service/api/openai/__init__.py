"""OpenAI's API under /v1: `routes.py` (the routes) and `wire.py` (its wire format)."""
from .routes import router

__all__ = ["router"]
