"""The HTTP transport: a published directory's files through the proxies (vml.remotes.fetch).

It loads a file whole or a byte range of it, as the local transport does
(vml.repo.transport), with the proxies' failover and deadlines, and checks
what arrives before anyone uses it (``check``, or the file's ``Whole``), so
that a proxy sending damaged bytes is set aside and the next one tried. A
server that ignores ``Range`` answers a ranged request with the whole file:
it is checked against its name, handed to ``keep`` (the cache in front of
this transport) and the range cut out of it; from then on the fetcher knows
the server has no ranges, and ranged loads of packs fetch them whole.
"""

import blake3

from ..errors import CorruptObject
from ..repo import paths
from ..repo.transport import Whole
from .fetch import Fetcher

INDEX_LOADS = 16


class HttpTransport:
    parallel = INDEX_LOADS  # small files loaded at once: round trips count, not bytes

    def __init__(self, fetcher: Fetcher, where: str):
        self.fetcher, self.where = fetcher, where
        self.keep = None  # keep(name, body): a whole file that came for a range (set by a cache)

    def shown(self, name: str) -> str:
        return f"{self.where}: {name}"

    def load(self, name, limit, span=None, whole: Whole | None = None, check=None, alias=None) -> bytes:
        if span is None:
            return self.fetcher.get(name, limit, self._checked(name, whole, check))
        if whole is not None and self.fetcher.ranges is False:  # known to answer with the whole file
            return self._cut(name, self.whole_file(name, whole), span, check)

        def frame_or_file(body: bytes):
            if len(body) == span[1] and span != (0, whole.size if whole else -1):
                return check(body) if check else body
            return self._cut(name, self._checked(name, whole, None)(body), span, check)

        return self.fetcher.get(name, span[1], frame_or_file, span=span, whole=whole.size if whole else None)

    def whole_file(self, name: str, whole: Whole) -> bytes:
        return self.fetcher.get(name, whole.size, self._checked(name, whole, None))

    def _cut(self, name: str, body: bytes, span, check) -> bytes:
        if self.keep is not None:
            self.keep(name, body)
        frame = body[span[0] : span[0] + span[1]]
        return check(frame) if check else frame

    def _checked(self, name: str, whole: Whole | None, check):
        """The check of a whole file: its BLAKE3, its own ``check``, or the caller's."""

        def checked(body):
            if whole is not None and whole.digest is not None:
                if len(body) > whole.size or blake3.blake3(body).digest() != whole.digest:
                    what = "its name" if paths.kind(name) == "pack" else "the catalog"
                    raise CorruptObject(f"{self.shown(name)} does not match {what}")
            elif whole is not None and whole.check is not None:
                whole.check(body)
            return check(body) if check else body

        return checked

    def into(self, name: str, whole: Whole, sink):
        """Fetch a whole file into a sink (``sink()`` makes one per attempt; ``sink.finish(whole)`` checks it)."""
        return self.fetcher.get(name, whole.size, lambda s: s.finish(whole), into=sink)

    def forget(self, name: str) -> None:
        pass  # nothing is kept here

    def prefetch(self, wanted) -> None:
        pass  # without a cache there is nowhere to keep what comes ahead

    def fetch(self, wanted, progress) -> None:
        for name, whole in wanted:
            self.whole_file(name, whole)
            progress.advance(1)
