"""Forward passes that stop early: a hook that has captured what it came for raises StopForward,
and the layers after it never run (pruning statistics and layer-by-layer distillation need what
reaches one layer, not the model's output)."""
from __future__ import annotations


class StopForward(Exception):
    """Raised by a forward hook once it has what it needs."""


def forward_until(module, batch: dict) -> None:
    """Run the module on a batch of numpy arrays, without gradients, until a hook stops it."""
    import torch

    try:
        with torch.no_grad():
            module(**{k: torch.from_numpy(v) for k, v in batch.items()})
    except StopForward:
        pass


def real_tokens(batch: dict):
    """(batch, tokens) bool tensor: True where a token is real, not padding (all True without a mask)."""
    import torch

    ids = next(iter(batch.values()))
    mask = batch.get("attention_mask")
    return torch.from_numpy(mask if mask is not None else ids * 0 + 1).bool()


def block_inputs(args: tuple, kwargs: dict, names: tuple[str, str] = ("hidden_states", "input_tensor")):
    """The two inputs of an output block (dense(x) + residual), passed by position or by name."""
    values = list(args[:2]) + [kwargs[n] for n in names[len(args[:2]):]]
    return values[0], values[1]
