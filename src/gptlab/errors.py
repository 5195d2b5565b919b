"""The one exception type for mistakes a user can fix: a one-line message saying what is
wrong and what to do, which the CLI prints on stderr, exiting with status 2. Anything else
is a bug and keeps its traceback.
"""


class GptlabError(Exception):
    """A problem with the user's input: bad config, missing data, unusable checkpoint."""
