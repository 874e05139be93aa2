"""Errors a user can fix. The CLI prints them on one line and exits with status 2."""


class BenchError(Exception):
    """A problem with the user's input (flags, config, data). Message: what is wrong and how to fix it."""


class DataError(BenchError):
    """A dataset is missing, malformed or inconsistent."""


class ConfigError(BenchError):
    """A flag, hyperparameter or configuration value is invalid."""
