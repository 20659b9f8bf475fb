"""The one error type of bad input data (records, their images, benchmark rows)."""


class RecordError(ValueError):
    """A record that cannot be used; the message names where it is and what to do."""
