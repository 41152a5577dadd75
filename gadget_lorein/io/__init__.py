"""I/O layer: the raw header, the acquisition buffer, raw files and map images (the only package, with the node and the CLI, that speaks ISMRMRD)."""
