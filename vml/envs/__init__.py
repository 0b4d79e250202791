"""Environment backups: a user's home, histories and login environment, saved as an entry and restored."""

from .describe import diff_environments, show_environment

__all__ = ["diff_environments", "show_environment"]
