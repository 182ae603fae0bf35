"""The `.d3` byte format: in-memory types, reader, writer, budgets and errors."""
from d3codec.format.types import (
    Budget,
    D3File,
    DecoderEntry,
    Labels,
    Metadata,
    Priors,
    Stored,
)

__all__ = ["Budget", "D3File", "DecoderEntry", "Labels", "Metadata", "Priors", "Stored"]
