"""Errors of the model layer."""


class NotSupportedError(ValueError):
    """The family cannot do what was asked (the message names what it supports instead)."""
