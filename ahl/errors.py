"""The one exception type for mistakes a user can fix (bad params, missing or malformed data)."""


class UserError(Exception):
    """A problem the user can act on. The message names the file or value at fault and says what to do.

    Stage scripts print it as a single line (``error: ...``) and exit with status 2, without a traceback.
    """
