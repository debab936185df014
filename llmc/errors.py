"""User-facing errors and the documented exit codes.

A user error prints as one line and exits with its code; anything else is a bug and keeps its
traceback (exit 1). The codes are documented in the README and in ``llmc --help``.
"""

from __future__ import annotations

import contextvars

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_INFEASIBLE = 3
EXIT_OUT_OF_MEMORY = 4
EXIT_TOOLCHAIN = 5
EXIT_VERIFICATION = 6


class LlmcError(Exception):
    """An error the user can act on; ``str(error)`` is the whole one-line message."""

    exit_code = EXIT_INTERNAL


# The files that the names "model.yaml" and "cluster.yaml" stand for in this run's errors. Checks that
# see parsed fields only (a pass, the plan's options) name the file by its role; the command line
# records the paths it read (:func:`name_config_files`), so the message names the file the user gave.
_CONFIG_FILES: contextvars.ContextVar[dict] = contextvars.ContextVar("llmc_config_files", default={})


def name_config_files(model_yaml, cluster_yaml) -> None:
    """Let errors that name "model.yaml" or "cluster.yaml" name these paths instead."""
    _CONFIG_FILES.set({"model.yaml": str(model_yaml), "cluster.yaml": str(cluster_yaml)})


class ConfigError(LlmcError):
    """A config file is malformed: the message names the file, the field path and the fix."""

    exit_code = EXIT_USAGE

    def __init__(self, file: str, field: str, message: str):
        file = _CONFIG_FILES.get().get(file, file)
        self.file = file
        self.field = field
        super().__init__(f"{file}: {field}: {message}" if field else f"{file}: {message}")


class UsageError(LlmcError):
    """A command-line option the command cannot use (the option's name starts the message)."""

    exit_code = EXIT_USAGE


class InputError(LlmcError):
    """A referenced input (model directory, text file, build directory) is missing or unusable."""

    exit_code = EXIT_USAGE


class InfeasiblePlanError(LlmcError):
    """No placement of the model's weights fits the declared devices."""

    exit_code = EXIT_INFEASIBLE


class PredictedOutOfMemoryError(LlmcError):
    """The weights fit, but the declared workload's KV cache and activations would not."""

    exit_code = EXIT_OUT_OF_MEMORY


class ToolchainError(LlmcError):
    """An external toolchain (ONNX, ONNX Runtime, TensorRT) is missing or failed."""

    exit_code = EXIT_TOOLCHAIN


class VerificationError(LlmcError):
    """A produced artifact failed its check (e.g. ORT stages disagree with the reference)."""

    exit_code = EXIT_VERIFICATION


class PassError(LlmcError):
    """A pass failed; names the pass and the passes that ran before it.

    Keeps the cause's exit code so an infeasible plan inside a compile still exits 3.
    """

    def __init__(self, pass_name: str, history: list[str], cause: BaseException):
        self.pass_name = pass_name
        self.history = history
        self.cause = cause
        self.exit_code = cause.exit_code if isinstance(cause, LlmcError) else EXIT_INTERNAL
        after = f" after [{', '.join(history)}]" if history else ""
        super().__init__(f"{cause} (in '{pass_name}'{after})")
