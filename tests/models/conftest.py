"""Fixtures for the model tests: ``offline_hub`` (tests/offline_hub.py), a local server behind timm's real
pretrained-weights download path."""

from offline_hub import offline_hub  # noqa: F401  (re-exported as a fixture)
