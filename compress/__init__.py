"""Transforms nn.Module -> nn.Module: pruning, quantization, distillation."""
