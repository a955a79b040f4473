"""The core every other layer builds on: errors, registries, configuration, names, example inputs,
the sampling math and the modules/op built on it, and the one home of torch's private APIs.

It imports nothing else of nesc (checked by the import-linter contracts in ``pyproject.toml``).
"""
