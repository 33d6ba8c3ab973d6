"""The root of every error a user can cause (a bad config, checkpoint, rule table, mesh, request).

Each room defines its own subclasses next to the code that raises them; the jobs catch
`QwenLogicalError` to print one clear message and exit 2 instead of a traceback. Anything
else that escapes is a bug and keeps its traceback.
"""


class QwenLogicalError(ValueError):
  """A mistake in what was asked for; the message names the thing and the fix."""
