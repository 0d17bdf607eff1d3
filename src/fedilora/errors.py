"""The one error type users see for bad configuration or input."""


class ConfigError(ValueError):
    """A wrong option value or input file. The message names the option or file and what is allowed.

    ``fedilora`` prints it as a single line and exits with status 2 instead of showing a traceback.
    """


class RunFailed(RuntimeError):
    """A run that finished without training as configured, e.g. every round skipped for lack of healthy
    client updates. ``results`` holds what was measured (also written to ``results.json``).

    ``fedilora`` prints it as a single line and exits with status 1.
    """

    def __init__(self, message: str, results: dict | None = None) -> None:
        super().__init__(message)
        self.results = results
