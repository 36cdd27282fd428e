"""Training and evaluation of AToken checkpoints with what ships offline."""
