"""The package's own exceptions.

Every error a user can cause (a bad flag, a malformed file, a missing dataset) is raised as a
``DeepnetError`` subclass whose message is one line saying what is wrong. The CLI prints that line and
exits non-zero; anything else is a bug and keeps its traceback.
"""


class DeepnetError(Exception):
    """A user-facing error: the message is one line that names the problem."""


class DataError(DeepnetError):
    """A dataset file is missing, malformed, or fails its checksum."""


class ModelFileError(DeepnetError):
    """A model file is not deepnet's, is of another version, or disagrees with what was asked."""


class ConfigError(DeepnetError):
    """A flag or argument value is out of range or inconsistent."""


class ActivationError(DeepnetError):
    """An activation is unknown or its definition is invalid."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so cleanup runs as for Ctrl-C"""
