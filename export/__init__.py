"""nn.Module -> deployable artifacts (ONNX, TorchScript), ONNX-level passes, and parity checks."""
