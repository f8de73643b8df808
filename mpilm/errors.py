"""The one exception type for mistakes a user can fix (bad option, missing file, corpus too small).

A ``UsageError`` becomes one line ``error: <message>`` on stderr and exit status 2 (see
``mpilm.comm.world.run_main``), with no traceback by design. Raise it on every rank at the same
point (checks on replicated values, or a verdict broadcast from rank 0), otherwise the ranks that
did not raise would wait in the next collective. Pass ``collective=False`` when only this rank
knows; the job is then aborted with status 2 instead.
"""


class UsageError(Exception):
    """A problem with the user's input, reported as ``error: ...`` and exit status 2."""

    def __init__(self, message: str, *, collective: bool = True):
        # one line whatever it quotes (a value or path holding a line break): line breaks shown escaped
        super().__init__(message.replace("\r", "\\r").replace("\n", "\\n"))
        self.collective = collective
