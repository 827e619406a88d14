"""The exceptions for mistakes a user can fix (bad params, missing or malformed data)."""


class UserError(Exception):
    """A problem the user can act on. The message names the file or value at fault and says what to do.

    Stage scripts print it as a single line (``error: ...``) and exit with status 2, without a traceback.
    """


class RawDataError(UserError):
    """Raw data that does not have the layout a converter reads.

    ``problem`` says what is missing and where it was looked for; ``fix`` what to do. They are kept apart so that
    the dataset entry (``registry.Dataset.convert``) can put the layout it expects between them.
    """

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(f"{problem} {fix}")
        self.problem, self.fix = problem, fix
