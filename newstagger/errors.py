"""The error every command turns into exit code 2 and a one-line reason (see newstagger.cli), beside
documents.DataError: here so the library it is raised in need not import the command line."""


class UsageError(Exception):
    """The user asked for something that cannot be done as asked (exit code 2)."""
