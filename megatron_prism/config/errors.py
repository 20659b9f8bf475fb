"""The one error type of the configuration layer."""


class ConfigError(ValueError):
    """A config file or override that cannot be used as given.

    The message is meant to be shown to the user as is (the CLI prints it without a traceback), so
    it always names the dotted key, where the key came from, and what would have been accepted.
    """
