"""The key/value cache that lets generation run each position through the model once.
Shape legend as in gptlab.model.gpt."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of the positions already seen, so generation computes each once:
    `GPTModel.forward(new_ids, cache)` reserves the next positions (`advance`); each attention
    layer stores their keys and values and attends over all filled positions (`update`), in
    (B, H, max_len, Hd) buffers allocated at the first write in the keys' dtype and device.

    static=True keeps every shape fixed, for torch.compile with CUDA graphs: the position is
    the device tensor `pos_t` (`pos` stays 0), keys are written with `index_copy_`, and
    attention runs over all max_len slots, the empty ones masked (eagerly: slower, same results).
    """

    def __init__(self, max_len: int, static: bool = False):
        self.max_len = max_len
        self.static = static
        self.keys: list[torch.Tensor] = []  # per layer (B, H, max_len, Hd)
        self.values: list[torch.Tensor] = []  # per layer (B, H, max_len, Hd)
        self.pos = 0  # positions filled (dynamic mode)
        self.pos_t: torch.Tensor | None = None  # (1,) positions filled (static mode)
        self._slots: torch.Tensor | None = None  # (T,) where the current forward writes
        self._mask: torch.Tensor | None = None  # (T, Tk) which keys each new position sees

    def reset(self) -> None:
        """Forget every position (the buffers are kept and overwritten)."""
        self.pos = 0
        if self.pos_t is not None:
            self.pos_t.zero_()

    def advance(self, T: int, device: torch.device) -> torch.Tensor:
        """Reserve the next T positions; returns them (T,). Called once per forward."""
        if self.static:
            if self.pos_t is None:
                self.pos_t = torch.zeros(1, dtype=torch.long, device=device)
                _mark_static(self.pos_t)
            slots = self.pos_t + torch.arange(T, device=device)  # (T,)
            self.pos_t += T
            keys = torch.arange(self.max_len, device=device)  # (max_len,)
            self._mask = keys[None, :] <= slots[:, None]  # (T, max_len)
        else:
            past = self.pos
            if past + T > self.max_len:
                raise ValueError(
                    f"KV cache full: {past} + {T} positions exceed its max_len {self.max_len}"
                )
            slots = torch.arange(past, past + T, device=device)  # (T,)
            self.pos += T
            # one new token sees every cached key; a block sees the past and its own causal part
            keys = torch.arange(past + T, device=device)  # (Tk,)
            self._mask = None if T == 1 else keys[None, :] <= slots[:, None]  # (T, Tk)
        self._slots = slots
        return slots

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Store layer `layer`'s new keys and values (B, H, T, Hd) at the reserved slots; returns
        all keys and values (B, H, Tk, Hd) and the bool mask (T, Tk) of keys each new position
        sees (None: all)."""
        if layer == len(self.keys):
            B, H, _, Hd = k.shape
            for store in (self.keys, self.values):
                buf = torch.zeros(B, H, self.max_len, Hd, dtype=k.dtype, device=k.device)
                _mark_static(buf)
                store.append(buf)
        kb, vb = self.keys[layer], self.values[layer]
        if kb.shape[0] != k.shape[0]:
            raise ValueError(f"KV cache holds batch size {kb.shape[0]}, got {k.shape[0]}")
        if self.static:
            kb.index_copy_(2, self._slots, k.to(kb.dtype))
            vb.index_copy_(2, self._slots, v.to(vb.dtype))
            return kb, vb, self._mask
        start, end = self.pos - k.shape[2], self.pos
        kb[:, :, start:end] = k
        vb[:, :, start:end] = v
        return kb[:, :, :end], vb[:, :, :end], self._mask  # (B, H, Tk, Hd) x 2


def _mark_static(t: torch.Tensor) -> None:
    # CUDA graphs may then keep the buffer's address and let the graph update it in place.
    if t.is_cuda:
        torch._dynamo.mark_static_address(t)
