"""The one base of every error this package raises on purpose.

A RagError's message is one line that says what went wrong and what to do; the command line prints it as is
and the chat shows it. Anything else that escapes is a bug (the CLI says so and offers --debug).
"""


class RagError(Exception):
    """An error meant for the user: one line, what to do."""
