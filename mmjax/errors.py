"""The one exception type for bad input.

A `UsageError` carries a one-line message naming the culprit (config key, file,
shape). Entry points catch it, print `error: <message>` on stderr and exit with
status 2, without a traceback.
"""


class UsageError(Exception):
  """Bad input from the user: a config key, a file, a shape, a name."""
