"""Timestamps as VML writes them: UTC, to the second, in ISO 8601 ("2026-12-02T06:17:30Z")."""

from datetime import UTC, datetime

FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def format_iso(t: datetime) -> str:
    return t.astimezone(UTC).strftime(FORMAT)


def now_iso() -> str:
    return format_iso(datetime.now(UTC))


def parse_iso(text: str) -> datetime:
    return datetime.strptime(text, FORMAT).replace(tzinfo=UTC)
