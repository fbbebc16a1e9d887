"""The offline world: a procedural image-caption generator and its downstream datasets."""
