"""VML, the Virtual Machine Logbook: keep, share and boot virtual machine states."""

__version__ = "0.1.0"
