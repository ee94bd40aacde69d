"""The one exception type the workbench raises for bad input."""


class WorkbenchError(ValueError):
    """Bad input or state, with a message naming the bad value and what was expected."""
