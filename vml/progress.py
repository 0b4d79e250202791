"""Progress reporting: the library reports how far it is, the caller shows it.

Long operations call ``start(total)`` once they know how much work there is
(bytes, or objects for verify), then ``advance(n)`` as they go. The base
class is silent; the command line shows a bar on a terminal.
"""


class Progress:
    def start(self, total: int | None) -> None:
        """Begin; ``total`` units of work are ahead (None when unknown)."""

    def advance(self, n: int) -> None:
        """``n`` more units are done."""


SILENT = Progress()
