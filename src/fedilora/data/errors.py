"""The error of malformed data: a sample, file or label set that a run cannot use."""

from __future__ import annotations

from fedilora.errors import ConfigError

# torch re-raises an exception from a DataLoader worker as ``type(err)(text)`` where ``text`` is
# "Caught DataError in DataLoader worker process N.\nOriginal Traceback (most recent call last): ..."
# and its last line "fedilora.data.errors.DataError: <message>".
_WORKER_PREFIX = "Caught DataError in DataLoader worker process"


class DataError(ConfigError):
    """Bad input data: the message names the file, the line (or item) and what is wrong.

    Raised while loading a dataset, and also while training or evaluating when an image file fails
    to decode only then (``check_images`` below ``decode``). It subclasses ``ConfigError``, so the
    CLI prints it as one line and exits with status 2; the federated trainer must let it through
    rather than leave the client out, because every client holding that sample would fail the same
    way and the run would end "successfully" without training.
    """

    def __init__(self, message: str) -> None:
        if message.startswith(_WORKER_PREFIX):  # keep the one line, drop the worker's traceback
            message = message.rstrip().splitlines()[-1].partition("DataError: ")[2] or message
        super().__init__(message)
