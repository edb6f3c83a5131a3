"""The one exception type the data package raises for bad files, specs and options."""


class DataError(ValueError):
    """A data source or option is unusable; the message names the file or option and the problem.

    It is a ValueError so callers that validate arguments generically still catch it; the CLI
    prints its message on one line.
    """
