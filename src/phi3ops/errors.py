"""Errors a user can fix. The CLI prints their message, which says what to do, not a traceback.

Kept free of heavy imports so `phi3ops --help` stays fast.
"""

import re


class Phi3opsError(Exception):
    """Base class: bad input or a missing resource, never a bug."""


class ConfigError(Phi3opsError, ValueError):
    """A configuration file is invalid; the message names the file and every bad key."""


class DataError(Phi3opsError, RuntimeError):
    """The dataset cannot be versioned or fetched; the message says what to do."""


class InvalidDataError(DataError):
    """A data file given as input is missing, empty or not chat data; the message names the
    file and the line and rule broken."""


class ModelNotAvailableError(Phi3opsError, RuntimeError):
    """The configured base model cannot be loaded here; the message says how to fix it."""


class RegistryError(Phi3opsError, RuntimeError):
    """A registered model or alias cannot be found or loaded."""


class BusyError(Phi3opsError, RuntimeError):
    """Another run holds the lock this one needs (another retrain of the same model)."""


class TemplateError(ConfigError):
    """The chat template cannot train as configured; the message names the setting to change."""


class TrainingSetupError(Phi3opsError, RuntimeError):
    """Training failed before its first step, on config, template, model or data: the same
    inputs fail the same way, so it is never retried."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind

    def __reduce__(self):  # pickled with its kind, as Prefect may store a failed task's error
        return type(self), (self.kind, str(self))


def safe_uri(uri: str) -> str:
    """A URI fit for a message: user and password, if any, left out."""
    return re.sub(r"//[^/@]*@", "//", uri)
