"""The errors a run reports to its caller as one line (the CLI exits with status 2, no traceback)."""


class ConfigError(ValueError):
    """A RunConfig that cannot run; the message lists every problem found."""


class RunDirBusy(RuntimeError):
    """Another live process holds the run dir's lock."""
