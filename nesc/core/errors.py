"""The exceptions nesc raises. Every message answers: what, where, expected versus got, how to fix."""

from __future__ import annotations


class NescError(Exception):
    """Base class of every error nesc raises on purpose."""


class CaptureError(NescError):
    """Neither torch.fx.symbolic_trace nor torch.export could capture the model."""


class ConfigError(NescError, ValueError):
    """A configuration value or a per-module override is invalid."""


class PlanError(NescError, ValueError):
    """The pool plan cannot meet the request (budget, pool size, forced layer)."""


class PassOrderError(NescError, RuntimeError):
    """A rewrite pass ran before the analysis it needs."""


class InputError(NescError, ValueError):
    """Example inputs do not fit the model."""


class ArtifactError(NescError, ValueError):
    """A saved artifact is truncated, corrupted, tampered with or from an incompatible version."""


class OutputError(NescError, ValueError):
    """An output path cannot be written safely: it exists, is a link or a device, or the disk is full."""


class CheckpointError(NescError, ValueError):
    """A training checkpoint is missing, damaged or from other settings, and nothing usable was found."""


class RegeneratedWeightError(NescError, TypeError):
    """A tool read the weight of a layer that a frozen nesc graph regenerates from a pool (a shell)."""


class NescWarning(UserWarning):
    """Legal but suspicious input, or nesc did something other than asked and says why: NaN weights, an
    old artifact format, a damaged checkpoint skipped for the one before it."""
