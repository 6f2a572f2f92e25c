"""rt-tune: make real-time KVM guests on arm64 robots fast, and keep them that way."""

__version__ = "0.1.0"
