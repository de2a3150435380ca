"""The ONNX path. Nothing in this package imports torch."""
