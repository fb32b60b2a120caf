"""The project's one small exception hierarchy.

The CLI turns every Q4KError into one line on stderr and exit code 2; anything else is a bug.
"""
from __future__ import annotations


class Q4KError(Exception):
    """Base of every error the engine raises on purpose."""


class FormatError(Q4KError):
    """A model file is corrupt, truncated, inconsistent or not what it claims to be."""


class InputError(Q4KError):
    """The caller's input (token ids, text, options, data files) is invalid."""


class UnsupportedError(Q4KError):
    """The file is valid but uses a feature this engine does not implement (named in the message)."""


class DeviceError(Q4KError):
    """The GPU is missing, CuPy is absent, or the model does not fit in its memory."""


class Q4KWarning(UserWarning):
    """Base of every warning the engine gives on purpose; the CLI prints each as one line on stderr."""


class FallbackWarning(Q4KWarning):
    """Something runs another way than asked or expected (device "auto" on the CPU, an unfused
    kernel path); the message names what and why."""
