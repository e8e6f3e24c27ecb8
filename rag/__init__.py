"""Grounded question answering over a university's news reports: the public API."""
from .config import Config

__all__ = ["Config"]
