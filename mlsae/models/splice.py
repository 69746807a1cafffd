"""Splicing a replacement residual into a model at one block, rerunning only the blocks after it.

A clean forward of a batch records, for every transformer block, the call it received (hidden
states, attention mask, position embeddings, whatever the architecture passes) and its output,
which is `blocks.{i}.hook_resid_post`. Splicing a new residual at block i then calls blocks
i+1 … L−1 with their recorded arguments and the new hidden states, then the final norm and the
unembedding (and the final logit soft-capping where the model has one). The prefix 0 … i is never
recomputed: on average a splice costs about half a forward plus the head, instead of a whole
forward through a hook.

Why recorded calls instead of rebuilding the inputs: every architecture passes its blocks
something different (Llama one rotary table and causal mask, Gemma 3 a sliding-window or global
mask and rotary table per block type, GPT-NeoX its own), and the recorded arguments are by
construction what the model itself used. The result equals a full forward with the block's output
replaced (tests compare both paths on tiny models).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from mlsae.models.registry import LoadedModel, decoder_layers


@dataclass
class CleanForward:
    """One clean forward of a batch of token ids (B, T)."""

    logits: Tensor
    """(B, T, vocab) float32 logits."""
    resid: list[Tensor]
    """Output of every block (B, T, d), in the model's dtype: `blocks.{i}.hook_resid_post`."""
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]]
    """The positional and keyword arguments each block was called with."""


class Splicer:
    """Clean forwards that remember each block's call, and reruns from a spliced block."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.layers = decoder_layers(model.hf_model)
        self.softcap = getattr(model.hf_model.config, "final_logit_softcapping", None)

    @torch.inference_mode()
    def clean(self, ids: Tensor) -> CleanForward:
        """Run the whole model on `ids`, recording every block's call and output."""
        n = len(self.layers)
        calls: list[Any] = [None] * n
        resid: list[Any] = [None] * n

        def before(i: int) -> Callable:
            def fn(module: nn.Module, args: tuple, kwargs: dict) -> None:
                calls[i] = (args, dict(kwargs))

            return fn

        def after(i: int) -> Callable:
            def fn(module: nn.Module, args: tuple, output: Any) -> None:
                resid[i] = output[0] if isinstance(output, tuple) else output

            return fn

        handles = []
        for i, layer in enumerate(self.layers):
            handles.append(layer.register_forward_pre_hook(before(i), with_kwargs=True))
            handles.append(layer.register_forward_hook(after(i)))
        try:
            logits = self.model.hf_model(input_ids=ids.to(self.model.device), use_cache=False).logits
        finally:
            for h in handles:
                h.remove()
        return CleanForward(logits.float(), resid, calls)

    @torch.inference_mode()
    def logits_from(self, run: CleanForward, block: int, resid: Tensor) -> Tensor:
        """Logits (B, T, vocab) float32 when block `block`'s output is replaced by `resid`."""
        return self.head(self.hidden_from(run, block, resid))

    @torch.inference_mode()
    def hidden_from(self, run: CleanForward, block: int, resid: Tensor) -> Tensor:
        """The last block's output (B, T, d) when block `block`'s output is replaced by `resid`."""
        h = resid.to(run.resid[block].dtype)
        for j in range(block + 1, len(self.layers)):
            args, kwargs = run.calls[j]
            if args:
                out = self.layers[j](h, *args[1:], **kwargs)
            else:
                out = self.layers[j](**{**kwargs, "hidden_states": h})
            h = out[0] if isinstance(out, tuple) else out
        return h

    @torch.inference_mode()
    def head(self, h: Tensor, out: Tensor | None = None) -> Tensor:
        """Float32 logits (..., vocab) of last-block outputs `h` (..., d): final norm, unembedding,
        soft-capping. `out`, a float32 buffer of the result's shape, is written in place when the
        unembedding is a bias-free float32 linear map: reusing one buffer spares every splice a fresh
        vocab-wide allocation (hundreds of MB, page-faulted anew each time)."""
        h = self.model.final_norm(h)
        unembed = self.model.unembed
        plain = isinstance(unembed, nn.Linear) and unembed.bias is None and unembed.weight.dtype == torch.float32
        if out is not None and plain and h.dtype == torch.float32:
            logits = torch.matmul(h, cast(nn.Linear, unembed).weight.T, out=out)  # `plain`: a Linear
        else:
            logits = unembed(h).float()
        if self.softcap:
            logits = logits.div_(self.softcap).tanh_().mul_(self.softcap)
        return logits
