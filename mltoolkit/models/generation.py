"""KV cache and autoregressive decoding for the decoder models (GPT2LMHeadModel, LlamaForCausalLM).

`model.generate(input_ids, max_new_tokens=20, do_sample=False, temperature=1.0, top_k=None, top_p=None,
eos_token_id=None, pad_token_id=None, attention_mask=None, generator=None, seed=None, use_cache=True)` follows
transformers' generate: greedy argmax, or sampling from softmax(logits / temperature) after top-k then top-p
(nucleus) filtering, in that order, as transformers' logits warpers apply them; finished rows (eos emitted) are
padded with pad_token_id and decoding stops when every row has finished. Left-padded batches pass attention_mask
(1 = token, 0 = padding) and get transformers' position ids (cumulative sum of the mask - 1).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import Tensor


class KVCache:
    """Keys and values of every layer, (B, Hkv, capacity, D) buffers filled up to `length` positions.

    Layers call update(layer, k, v) with the new positions' keys and values and get back views of all positions so
    far; the model calls advance(n) once all layers have written n positions. Buffers are allocated on first use
    with `max_length` positions (generate passes prompt + new tokens, so nothing is reallocated while decoding)
    and doubled when full."""

    def __init__(self, max_length: Optional[int] = None):
        self.max_length = max_length
        self.length = 0
        self.keys: list[Optional[Tensor]] = []
        self.values: list[Optional[Tensor]] = []

    def __len__(self) -> int:
        return self.length

    def get_seq_length(self) -> int:
        return self.length

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        while len(self.keys) <= layer:
            self.keys.append(None)
            self.values.append(None)
        start, n = self.length, k.shape[2]
        end = start + n
        buf_k, buf_v = self.keys[layer], self.values[layer]
        if buf_k is None or buf_k.shape[2] < end:
            cap = max(end, self.max_length or 0, 2 * buf_k.shape[2] if buf_k is not None else 0)
            new_k = k.new_empty(k.shape[0], k.shape[1], cap, k.shape[3])
            new_v = v.new_empty(v.shape[0], v.shape[1], cap, v.shape[3])
            if buf_k is not None:
                new_k[:, :, :start] = buf_k[:, :, :start]
                new_v[:, :, :start] = buf_v[:, :, :start]
            self.keys[layer], self.values[layer] = buf_k, buf_v = new_k, new_v
        buf_k[:, :, start:end] = k
        buf_v[:, :, start:end] = v
        return buf_k[:, :, :end], buf_v[:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows `index` (e.g. after dropping finished sequences)."""
        self.keys = [None if t is None else t.index_select(0, index) for t in self.keys]
        self.values = [None if t is None else t.index_select(0, index) for t in self.values]


# ---- logits processing ----------------------------------------------------------------------------------------

def top_k_filter(logits: Tensor, top_k: int) -> Tensor:
    """Scores below the k-th largest of each row set to -inf (ties at the k-th value are kept)."""
    top_k = min(top_k, logits.shape[-1])
    kth = torch.topk(logits, top_k)[0][..., -1, None]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """Nucleus filtering as transformers' TopPLogitsWarper: keep the smallest set of most likely tokens whose
    probabilities sum to at least top_p (the most likely token always stays)."""
    sorted_logits, sorted_idx = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)
    remove[..., -1:] = False
    remove = remove.scatter(1, sorted_idx, remove)
    return logits.masked_fill(remove, float("-inf"))


def process_logits(logits: Tensor, do_sample: bool, temperature: float, top_k: Optional[int],
                   top_p: Optional[float]) -> Tensor:
    if not do_sample:
        return logits
    if temperature != 1.0:
        logits = logits / temperature
    if top_k is not None and top_k > 0:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    return logits


def _check_args(input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k, top_p) -> None:
    fn = "generate"
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(f"{fn}: input_ids must be an integer tensor (batch, seq), got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    if input_ids.shape[1] == 0:
        raise ValueError(f"{fn}: input_ids must hold at least one token per row")
    if attention_mask is not None and (not isinstance(attention_mask, Tensor)
                                       or tuple(attention_mask.shape) != tuple(input_ids.shape)):
        raise ValueError(f"{fn}: attention_mask must have input_ids' shape {list(input_ids.shape)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"{fn}: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if do_sample:
        if not isinstance(temperature, (int, float)) or temperature <= 0:
            raise ValueError(f"{fn}: temperature must be > 0, got {temperature!r}")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 0):
            raise ValueError(f"{fn}: top_k must be an int >= 0 (0 or None: off), got {top_k!r}")
        if top_p is not None and (not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0):
            raise ValueError(f"{fn}: top_p must be in (0, 1], got {top_p!r}")


def _as_list(ids) -> list[int]:
    if ids is None:
        return []
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]


class GenerationMixin:
    """generate() for a causal LM whose forward takes (input_ids, attention_mask, position_ids, past_key_values,
    use_cache, logits_to_keep) and returns an output with .logits."""

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int = 20, do_sample: bool = False,
                 temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 eos_token_id: Union[int, Sequence[int], None] = None, pad_token_id: Optional[int] = None,
                 attention_mask: Optional[Tensor] = None, generator: Optional[torch.Generator] = None,
                 seed: Optional[int] = None, use_cache: bool = True) -> Tensor:
        """Extend input_ids (B, L) by up to max_new_tokens tokens; returns (B, L + n) with n <= max_new_tokens.

        do_sample=False: greedy. do_sample=True: sample from softmax(logits / temperature) restricted by top_k
        and top_p; generator (a torch.Generator on the model's device) or seed make it reproducible (otherwise
        torch's global RNG is used). eos_token_id (default config.eos_token_id; an int or a list): a row that
        emits it is finished and further padded with pad_token_id (default config.pad_token_id, else the first
        eos id, else 0). attention_mask (B, L): 1 = token, 0 = padding, for left-padded batches.
        use_cache=False recomputes the whole sequence at every step (same tokens, slower)."""
        _check_args(input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k, top_p)
        config = self.config
        eos = _as_list(eos_token_id if eos_token_id is not None else getattr(config, "eos_token_id", None))
        if pad_token_id is None:
            pad_token_id = getattr(config, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = eos[0] if eos else 0
        device = input_ids.device
        if do_sample and generator is None and seed is not None:
            generator = torch.Generator(device=device).manual_seed(int(seed))
        b, prompt = input_ids.shape
        ids = input_ids
        mask = attention_mask.long() if attention_mask is not None else torch.ones_like(input_ids)
        padded = attention_mask is not None and not bool(mask.bool().all())
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0) if padded else None
        cache = KVCache(prompt + max_new_tokens) if use_cache else None
        unfinished = torch.ones(b, dtype=torch.bool, device=device)
        eos_t = torch.tensor(eos, dtype=ids.dtype, device=device) if eos else None

        step_ids, step_pos = ids, positions
        for _ in range(max_new_tokens):
            if use_cache:
                out = self(step_ids, attention_mask=mask if padded else None, position_ids=step_pos,
                           past_key_values=cache, use_cache=True, logits_to_keep=1)
            else:
                out = self(ids, attention_mask=mask if padded else None, position_ids=positions, logits_to_keep=1)
            logits = process_logits(out.logits[:, -1, :].float(), do_sample, temperature, top_k, top_p)
            if do_sample:
                nxt = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)
            else:
                nxt = logits.argmax(dim=-1)
            nxt = torch.where(unfinished, nxt, torch.full_like(nxt, pad_token_id))
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
            if positions is not None:
                step_pos = positions[:, -1:] + 1
                positions = torch.cat([positions, step_pos], dim=1)
            step_ids = nxt[:, None]
            if eos_t is not None:
                unfinished &= ~torch.isin(nxt, eos_t)
                if not bool(unfinished.any()):
                    break
        return ids
