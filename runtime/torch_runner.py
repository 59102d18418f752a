"""Running a torch module in a measuring process: a Runner for forward passes (CUDA events on the
GPU) and a generator for causal LMs (transformers' generate, timed step by step)."""
from __future__ import annotations

from core.backends import Runner


class TorchRunner(Runner):
    def __init__(self, module, device: str, threads: int, exported: bool = False):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        # A module unlifted from a torch.export program refuses .eval() (it was traced in eval mode)
        # and is already on its device (moved as a program, see load_runner).
        self.module = module if exported else module.to(self.device).eval()
        self.info = {"torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
                     "device_name": torch.cuda.get_device_name(0) if device == "cuda" else "cpu"}

    def prepare(self, inputs):
        return {k: self.torch.from_numpy(v).to(self.device) for k, v in inputs.items()}

    def call(self, prepared):
        with self.torch.inference_mode():
            return self.module(**prepared)

    def timed_call(self, prepared) -> float:
        if self.device.type != "cuda":
            return super().timed_call(prepared)
        # Host time of an asynchronous launch says nothing: CUDA events bracket the GPU work.
        start, end = self.torch.cuda.Event(enable_timing=True), self.torch.cuda.Event(enable_timing=True)
        start.record()
        self.call(prepared)
        end.record()
        end.synchronize()
        return start.elapsed_time(end)


class TorchGenerator:
    """A causal LM (core.lm.CausalLM) generating through transformers' `generate`."""

    def __init__(self, module, device: str):
        import torch

        self.torch, self.device = torch, torch.device(device)
        self.module = module.to(self.device).eval()
        self.info = {"torch_threads": torch.get_num_threads(), "generation": "transformers generate, greedy",
                     "device_name": torch.cuda.get_device_name(0) if device == "cuda" else "cpu"}

    def generate(self, ids, mask, new_tokens: int, on_token=None):
        from runtime.decode import torch_generate

        return torch_generate(self.module.model, ids, mask, new_tokens, device=self.device.type, on_token=on_token)

    def logits(self, ids, mask):
        with self.torch.inference_mode():
            out = self.module(input_ids=self.torch.from_numpy(ids).to(self.device),
                              attention_mask=self.torch.from_numpy(mask).to(self.device))
        return out.float().cpu()
