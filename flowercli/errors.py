"""User-facing errors. The CLI prints `Error: <message>` on stderr and exits with `exit_code`.

Library code raises these for anything a user can fix (bad input, missing or corrupt files);
a plain exception escaping to the CLI is a bug.
"""


class FlowerError(Exception):
    """An error whose message is meant for the user: one line saying what is wrong and what to do."""

    exit_code = 1


class DataError(FlowerError):
    """Missing, incomplete or malformed dataset files."""


class ChecksumError(DataError):
    """A file's checksum does not match the expected one."""


class DownloadError(FlowerError):
    """A network fetch failed after retries."""


class EncoderError(FlowerError):
    """A text encoder could not be loaded or does not fit the data."""


class CheckpointError(FlowerError):
    """A checkpoint is missing, corrupt, or incompatible."""


class InputError(FlowerError):
    """A bad argument value that Typer's own validation cannot catch."""


class Interrupted(FlowerError):
    """Stopped by a signal after saving what had to be saved (exit 128 + signal number)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum
