"""The PyTorch path: loaders, BN discovery, folding and recalibration for torch models."""
