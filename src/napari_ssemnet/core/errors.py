"""Exceptions with messages meant for users."""

from __future__ import annotations


class SsemnetError(Exception):
    """Base class: the message is written for the person running the tool."""


class InputError(SsemnetError, ValueError):
    """The input stack, file or index cannot be used; the message says why and what to do."""


class WeightsError(SsemnetError):
    """An encoder weights file is missing, corrupt or of the wrong architecture."""


class AlignmentCancelled(SsemnetError):
    """The run was stopped by the caller (Cancel button, Ctrl-C)."""


class MemoryLimitError(SsemnetError):
    """The stack needs more memory than the machine (or GPU) has free."""
