"""Lowering backends."""
