"""Model tests use the session fixtures tiny_dirs / hf_models from tests/conftest.py."""
