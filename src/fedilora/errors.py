"""The one error type users see for bad configuration or input."""


class ConfigError(ValueError):
    """A wrong option value or input file. The message names the option or file and what is allowed.

    ``fedilora`` prints it as a single line and exits with status 2 instead of showing a traceback.
    """
