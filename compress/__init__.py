"""Transforms nn.Module -> nn.Module: pruning, quantization (and, later, distillation)."""
