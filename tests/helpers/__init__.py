"""Shared test helpers: tiny random reference models (transformers / diffusers) and the upstream TheWorld
reference. Imported as `tests.helpers.<module>` by the tests, tests/scripts and bench/."""
