"""What a user keeps in a remote's cache: preloading an entry, pinning it, unpinning it."""

from ..errors import NotFound, UsageError
from ..progress import SILENT, Progress
from ..repo.repository import Repository
from ..repo.store import METADATA_LIMIT
from .remote import RemoteRepository, RemoteStore


def remote_part(repo: Repository, entry) -> tuple[RemoteStore, bytes, str]:
    """(remote store, manifest digest, entry name) of what ``entry`` builds on over the network.

    For an entry of a remote, that is the entry itself; for a local entry on
    a remote parent, the remote entry at the end of its local chain.
    """
    if repo.read_only:
        return repo.store, entry.digest, entry.name
    local = repo.local_chain(entry.digest)
    link = local[-1][1].reference if local else None
    if link is None:
        raise UsageError(f"entry {entry.name!r} of {repo.name} is all local: there is nothing to fetch for it")
    for store in repo.fallbacks:
        if store.lists(link.manifest):
            return store, link.manifest, link.name
    raise NotFound(f"entry {entry.name!r} builds on {link.name!r}, which no configured remote lists")


def preload(store: RemoteStore, digest: bytes, name: str, pin: bool, progress: Progress = SILENT) -> tuple[int, int]:
    """Fetch every object an entry needs into the cache, and pin it if asked; (objects, bytes fetched)."""
    objs = RemoteRepository(store).entry_objects(digest)
    fetched = store.fetch_all(objs, METADATA_LIMIT, progress)
    if pin:  # only once all is there; eviction during the preload is the quota's business
        store.cache.set_pins(store.pins() | {name: digest})
    return len(objs), fetched


def unpin(store: RemoteStore, name: str) -> None:
    pins = store.pins()
    if name not in pins:
        raise NotFound(f"{store.name}:{name} is not pinned")
    del pins[name]
    store.cache.set_pins(pins)
