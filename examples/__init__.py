"""Runnable examples: models of one's own and the configs that train them (see tiny_decoder.yaml)."""
