"""The reliability tests reuse the server tests' fixtures: one engine on the tiny Qwen3 model
for every in-process app of the session (``engine``, ``settings``); ``tiny_model`` comes from
tests/conftest.py."""

from tests.server.conftest import engine, settings  # noqa: F401  (pytest fixtures)
