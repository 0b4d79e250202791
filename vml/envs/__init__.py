"""Environment backups: a user's home, histories and login environment, saved as an entry and restored."""

from .describe import diff_environments, show_environment
from .restore import env_records

__all__ = ["diff_environments", "env_records", "show_environment"]
