"""Errors raised for bad checkpoints and configs: the message names the file and the fix."""


class CheckpointError(ValueError):
    """A checkpoint or config that cannot be used as given."""
