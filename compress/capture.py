"""Forward passes that stop early: a hook that has captured what it came for raises StopForward,
and the layers after it never run (pruning statistics and layer-by-layer distillation need what
reaches one layer, not the model's output)."""
from __future__ import annotations


class StopForward(Exception):
    """Raised by a forward hook once it has what it needs."""


def forward_until(module, batch: dict, device=None) -> None:
    """Run the module on a batch of numpy arrays, without gradients, until a hook stops it."""
    import torch

    call_until(module, (), {k: torch.from_numpy(v).to(device or "cpu") for k, v in batch.items()})


def call_until(module, args: tuple, kwargs: dict) -> None:
    """Call the module without gradients until a hook stops it."""
    import torch

    try:
        with torch.no_grad():
            module(*args, **kwargs)
    except StopForward:
        pass


def layer_inputs(model, layer, batches, device=None) -> list:
    """What reaches one layer of the model for each batch (its positional and keyword arguments),
    from forward passes that stop there."""
    import torch

    inputs = []

    def capture(module, args, kwargs):
        inputs.append((tuple(a.detach() if torch.is_tensor(a) else a for a in args), dict(kwargs)))
        raise StopForward

    hook = layer.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for b in batches:
            forward_until(model, b, device)
    finally:
        hook.remove()
    return inputs


def next_inputs(layer, inputs: list) -> list:
    """The inputs of the layer after this one: this layer's output in place of its hidden states,
    every other argument (attention mask, ...) unchanged."""
    import torch

    out = []
    with torch.no_grad():
        for args, kwargs in inputs:
            hidden = layer(*args, **kwargs)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
            if args:
                out.append(((hidden,) + tuple(args[1:]), kwargs))
            else:
                out.append(((), {**kwargs, "hidden_states": hidden}))
    return out


def real_tokens(batch: dict, device=None):
    """(batch, tokens) bool tensor: True where a token is real, not padding (all True without a mask)."""
    import torch

    ids = next(iter(batch.values()))
    mask = batch.get("attention_mask")
    return torch.from_numpy(mask if mask is not None else ids * 0 + 1).bool().to(device or "cpu")
