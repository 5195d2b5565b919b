"""The one exception type for mistakes a user can fix.

Library code raises `GptlabError` with a one-line message that says what is wrong and
what to do; the CLI prints it on stderr and exits with status 2. Anything else is a bug
and keeps its traceback.
"""


class GptlabError(Exception):
    """A problem with the user's input: bad config, missing data, unusable checkpoint."""
