"""User-facing errors.

Everything a user can get wrong (a path, a model id, a sparsity, a YAML key, a storage URL) raises
:class:`AutopruneError`. The CLI prints such an error as one line and exits non-zero; anything else
is a bug and keeps its traceback.
"""


class AutopruneError(Exception):
    """A problem with the user's input or environment, described in one line."""
