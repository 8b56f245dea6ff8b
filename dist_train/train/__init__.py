"""Training loops and checkpointing."""
