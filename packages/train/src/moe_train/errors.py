"""The one exception type the CLI turns into a single `error: ...` line and a non-zero exit."""


class CLIError(Exception):
    """A problem with what the user asked for (a bad option, file, checkpoint or device)."""
