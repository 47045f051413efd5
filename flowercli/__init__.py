"""flowercli: sentence in, flower out."""

__version__ = "0.1.0"
