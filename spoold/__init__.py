"""spoold: a filesystem spool daemon for offline LLM batch inference."""

__version__ = "0.1.0"
