"""The three ways a run ends early, each with one line on stderr (engine.cli.run_cli prints it)."""


class ConfigError(Exception):
    """Bad input: the message names the problem and the fix, on one line."""


class DivergedError(Exception):
    """The training loss became NaN or infinite; last.pt still holds the last state with a finite loss."""


class Preempted(Exception):
    """SIGTERM or a first Ctrl-C: last.pt was saved at the end of a step. `code` is the exit code: 128 + the
    signal's number, as if the signal had ended the process (143 for SIGTERM, 130 for Ctrl-C)."""

    def __init__(self, message, code=143):
        super().__init__(message)
        self.code = code
