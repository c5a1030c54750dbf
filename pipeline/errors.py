"""The base of every error a user fixes by changing their input (config, data, model path, reward code).

The CLI prints such an error as one line and exits 2; any other exception is a bug and keeps its traceback.
"""


class UserInputError(ValueError):
    """Bad input; the message names the thing and the fix."""
