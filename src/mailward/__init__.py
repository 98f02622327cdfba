"""mailward: a mail transfer agent that delivers securely or not at all."""

__version__ = "0.1.0"
