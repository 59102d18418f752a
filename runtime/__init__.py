"""What runs a model, shared by export (parity) and bench (cells): ONNX Runtime sessions, runners,
the decode loop of causal LMs, timed generate, and the inference helpers. Imports only core."""
