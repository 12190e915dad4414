"""The transformers backend: batched multi-turn sampling that does not re-read what it has seen.

A naive loop re-renders every live conversation each turn and runs `generate` on it: almost all
of its time is prefill. This backend instead
- prefills each distinct prompt once and shares it across its n samples (turn 1);
- keeps every live conversation's key/value cache between turns (least recently used ones are
  dropped beyond a memory bound) and prefills only the tokens the new render adds: the previous
  end-of-turn token plus the feedback message. The cached tokens are compared with the new
  render; only their longest common prefix is reused, so a template that rewrites history costs
  a longer prefill, never a wrong answer;
- decodes with continuous batching: a finished row's slot is given to a waiting row at the next
  step (or the batch is repacked), so the batch stays full until the work runs out;
- streams (`stream`): requests join the running decode session, and each conversation's message
  comes back as soon as it ends, so the engine can judge it and send the next turn into the same
  batch instead of waiting for the slowest conversation of the turn. `generate` is one such
  session, given every request at once and drained.
Sampling runs on the logits' device with noise hashed from (seed of the (prompt, sample, turn),
token index, vocabulary index), so a conversation's text does not depend on which others share
its batch (up to float rounding), and nothing of vocabulary size crosses between devices
(`drift.rollout.sampling`). The caches and their layout are in `drift.rollout.kvcache`.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache

from drift import DriftError
from drift.chat import end_of_turn_ids, render_ids
from drift.hardware import resolve as resolve_device_dtype
from drift.ledger import parameter_count
from drift.models import load_model_and_tokenizer
from drift.rollout.kvcache import KV, columns, pack
from drift.rollout.packed import can_pack, pack_linears
from drift.rollout.protocol import (BackendStats, ConvId, GenOutput, GenRequest, PromptTooLong, SamplingParams,
                                   sample_seed)
from drift.rollout.sampling import sample_tokens


@dataclass
class _Row:
    """One conversation being generated."""

    conv: ConvId
    prefix: KV  # what the row's cache held when it was admitted
    seed: int  # of its (prompt, sample, turn): the sampling noise is hashed from it
    tokens: list[int] = field(default_factory=list)  # sampled so far; all but the last are in the cache


class HFBackend:
    """Generation with a transformers causal LM on CPU or one GPU (see the module docstring).

    `device` None: the accelerator if there is one; `dtype` "auto": bf16 where that device computes
    it fast (`drift.hardware`). The resolved pair is `hardware`, recorded in the run's manifest.
    """

    name = "hf"

    def __init__(self, model_path: str, batch_size: int = 16, dtype: str = "auto", device: str | None = None,
                 max_cache_conversations: int | None = None, max_cache_gb: float = 4.0, max_prefill_tokens: int = 4096):
        device, dtype = resolve_device_dtype(dtype, device)
        model, tokenizer = load_model_and_tokenizer(model_path, dtype=dtype, device=device)
        if not tokenizer.chat_template:
            raise DriftError(f"model {model_path!r}: its tokenizer has no chat template")
        self._setup(model, tokenizer, batch_size, max_cache_conversations, max_cache_gb, max_prefill_tokens)
        if can_pack(model):  # its own model never changes: lay the weights out once (same numbers, faster)
            pack_linears(model)

    @classmethod
    def from_model(cls, model: torch.nn.Module, tokenizer: object, batch_size: int = 16,
                   max_cache_conversations: int | None = None, max_cache_gb: float = 4.0,
                   max_prefill_tokens: int = 4096, pack: bool = False) -> HFBackend:
        """A backend over a model already in memory (the online arm's copy of its policy): nothing is
        loaded. `pack`: the model is the backend's alone and never changes, so its bf16 weights may
        be laid out for generation (`drift.rollout.packed`)."""
        backend = cls.__new__(cls)
        backend._setup(model, tokenizer, batch_size, max_cache_conversations, max_cache_gb, max_prefill_tokens)
        if pack and can_pack(model):
            pack_linears(model)
        return backend

    def _setup(self, model: torch.nn.Module, tokenizer: object, batch_size: int, max_cache_conversations: int | None,
               max_cache_gb: float, max_prefill_tokens: int) -> None:
        if batch_size < 1:
            raise DriftError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.tokenizer = model, tokenizer
        self.hardware = {"device": str(model.device), "dtype": str(model.dtype).removeprefix("torch.")}
        self.batch_size = batch_size
        self.max_cache_conversations = max_cache_conversations
        self.max_cache_bytes = int(max_cache_gb * 2**30)
        self.max_prefill_tokens = max_prefill_tokens
        self.device = self.model.device
        self.stop_ids = end_of_turn_ids(self.tokenizer, self.model.generation_config.eos_token_id)
        self.pad_id = self.tokenizer.pad_token_id
        self.stats = BackendStats(parameters=parameter_count(self.model))
        self.reused_tokens = 0  # prompt tokens served from a kept cache instead of prefilled
        self.cache_mismatches = 0  # kept caches that were not a prefix of the new render
        self.cache_evictions = 0
        self.decode_steps = 0  # decode forwards, and the live rows they carried (how full the batch ran)
        self.decode_rows = 0
        self._convs: OrderedDict[ConvId, KV] = OrderedDict()
        self._conv_bytes = 0
        text_config = self.model.config.get_text_config()
        self.n_layers = text_config.num_hidden_layers
        self.context = getattr(text_config, "max_position_embeddings", None) or 1 << 30

    # ---- the conversation cache -------------------------------------------------------------

    def _keep(self, conv: ConvId, kv: KV) -> None:
        self._drop(conv)
        self._convs[conv] = kv
        self._conv_bytes += kv.nbytes
        while self._convs and (len(self._convs) > (self.max_cache_conversations or len(self._convs))
                               or self._conv_bytes > self.max_cache_bytes):
            self._drop(next(iter(self._convs)))
            self.cache_evictions += 1

    def _drop(self, conv: ConvId) -> KV | None:
        kv = self._convs.pop(conv, None)
        if kv is not None:
            self._conv_bytes -= kv.nbytes
        return kv

    def release(self, conv_ids: list[ConvId]) -> None:
        for conv in conv_ids:
            self._drop(conv)

    def close(self) -> None:
        self._convs.clear()
        self._conv_bytes = 0

    # ---- generation ---------------------------------------------------------------------------

    def render(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of the conversation followed by the assistant generation prompt."""
        return render_ids(self.tokenizer, messages)

    def generate(self, requests: list[GenRequest], params: SamplingParams) -> list[list[GenOutput]]:
        """One list of outputs per request: a decode session given every request at once, drained."""
        stream = _Stream(self, params, open_ended=False)
        stream.submit(requests)
        done: dict[ConvId, GenOutput] = {}
        while finished := stream.poll():
            done.update(finished)
        return [[done[conv] for conv in req.conv_ids] for req in requests]

    def stream(self, params: SamplingParams) -> _Stream:
        """A decode session that takes requests while it runs (`drift.rollout.protocol.GenStream`)."""
        return _Stream(self, params, open_ended=True)

    def _reusable(self, conv_ids: list[ConvId], ids: list[int]) -> KV:
        """The longest kept prefix of `ids` among these conversations' caches (dropping the caches)."""
        best = KV([], [], [])
        for conv in conv_ids:
            kv = self._drop(conv)
            if kv is None:
                continue
            n = 0
            limit = min(len(kv.ids), len(ids) - 1)  # at least one token must be fed for logits
            while n < limit and kv.ids[n] == ids[n]:
                n += 1
            if n < len(kv.ids):
                self.cache_mismatches += 1
            if n > len(best.ids):
                best = KV(kv.ids[:n], [k[:, :n] for k in kv.keys], [v[:, :n] for v in kv.values])
        self.reused_tokens += len(best.ids)
        return best

    def _prefill_chunk(self, work: list[_Work]) -> tuple[list[_Work], list[_Work]]:
        """Take requests off the work list (fewest new tokens first) while they fit one prefill forward."""
        n = 0
        budget = max(self.max_prefill_tokens, work[0].new)
        while n < len(work) and n < self.batch_size and (n + 1) * work[n].new <= budget:
            n += 1
        return work[:n], work[n:]

    def _rows(self, chunk: list[_Work], params: SamplingParams) -> tuple[list[_Row], list[tuple[_Row, GenOutput]]]:
        """Prefill a chunk of requests (one forward): one row per conversation, and the rows that
        ended on their first token (with their outputs)."""
        prefixes = self._prefill([(w.ids, w.past) for w in chunk])
        rows, done = [], []
        for w, (kv, logits) in zip(chunk, prefixes):
            seeds = [sample_seed(params.seed, conv, w.request.turn) for conv in w.request.conv_ids]
            firsts = sample_tokens(logits.expand(len(seeds), -1), params, torch.tensor(seeds, device=self.device),
                             torch.zeros(len(seeds), dtype=torch.long, device=self.device)).tolist()
            for conv, seed, first in zip(w.request.conv_ids, seeds, firsts):
                row = _Row(conv, kv, seed, [first])
                out = self._finish(row, params)
                if out is not None:  # finished on its first token: its cache is the prefix
                    self._keep(conv, kv)
                    done.append((row, out))
                else:
                    rows.append(row)
        return rows, done

    def _finish(self, row: _Row, params: SamplingParams) -> GenOutput | None:
        """The row's output if its last token ends it (end-of-turn token, length limit, or context end)."""
        stop = row.tokens[-1] in self.stop_ids
        full = len(row.tokens) >= params.max_new_tokens or len(row.prefix.ids) + len(row.tokens) >= self.context
        if not (stop or full):
            return None
        self.stats.generated_tokens += len(row.tokens)
        text = self.tokenizer.decode(row.tokens[:-1] if stop else row.tokens, skip_special_tokens=True)
        return GenOutput(text=text, tokens=len(row.tokens), finish_reason="stop" if stop else "length")

    def _prefill(self, items: list[tuple[list[int], KV]]) -> list[tuple[KV, torch.Tensor]]:
        """Run the new tokens of each item after its reused past; return (kv, next-token logits)."""
        suffixes = [ids[len(past.ids):] for ids, past in items]
        S = max(len(s) for s in suffixes)
        cache, start, T = pack([(p.keys, p.values, len(p.ids)) for _, p in items], S, self.n_layers)
        input_ids = torch.full((len(items), S), self.pad_id, dtype=torch.long)
        in_mask = torch.zeros(len(items), S, dtype=torch.long)
        for r, s in enumerate(suffixes):
            input_ids[r, S - len(s):] = torch.tensor(s)
            in_mask[r, S - len(s):] = 1
        past_mask = (torch.arange(T)[None] >= start[:, None]).long()
        position_ids = ((T - start)[:, None] + in_mask.cumsum(1) - 1).clamp(min=0)
        mask = torch.cat([past_mask, in_mask], 1)
        out = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                         position_ids=position_ids.to(self.device), past_key_values=cache, use_cache=True,
                         logits_to_keep=1)
        self.stats.prefill_tokens += sum(len(s) for s in suffixes)
        logits = out.logits[:, -1].float()
        result = []
        for r, ((ids, _), s) in enumerate(zip(items, suffixes)):
            # the row's columns: its past (start[r]..T-1), then its new tokens (the last len(s) of S)
            spans = [(int(start[r]), T), (T + S - len(s), T + S)]
            kv = KV(list(ids), [columns(layer.keys[r], spans) for layer in cache.layers],
                     [columns(layer.values[r], spans) for layer in cache.layers])
            result.append((kv, logits[r]))
        return result


def fitting(requests: list[GenRequest], tokenizer: object, context: int) -> list[tuple[GenRequest, list[int]]]:
    """(request, rendered ids) of the requests that carry conversations; PromptTooLong, naming every
    conversation whose history fills the context, if there are any."""
    rendered = [(req, render_ids(tokenizer, req.messages)) for req in requests if req.conv_ids]
    too_long = [(req, len(ids)) for req, ids in rendered if len(ids) >= context]
    if too_long:
        raise PromptTooLong([c for req, _ in too_long for c in req.conv_ids],
                            f"longest history {max(n for _, n in too_long)} tokens, context {context}")
    return rendered


@dataclass
class _Work:
    """A request waiting for its prefill: its render and the kept cache it continues."""

    new: int  # tokens to prefill: len(ids) - len(past.ids)
    request: GenRequest
    ids: list[int]
    past: KV


class _Stream:
    """A decode session: requests join while it runs; every conversation's output comes back when
    it ends (`poll`).

    Requests wait on the work list (fewest new tokens first) until the batch has room, are
    prefilled in chunks into rows, and rows take free slots. An `open_ended` session (requests
    keep arriving, a few at a time) differs in two ways from one `generate` call's (all requests
    at once): while the batch decodes, it prefills only once a quarter of the slots are free
    beyond the rows already prefilled, since a prefill forward of a few rows costs about a decode
    step; and its batch trims the cache columns no live row uses (`_Decoding.trim`), since its T
    would otherwise grow for the whole rollout. A `generate` call keeps the schedule it always
    had, so its samples are the same to the last bit.
    """

    def __init__(self, backend: HFBackend, params: SamplingParams, open_ended: bool):
        self.b, self.params = backend, params
        self.gather = max(1, backend.batch_size // 4) if open_ended else 1
        self.work: list[_Work] = []
        self.pending: list[_Row] = []  # prefilled, waiting for a slot
        self.batch = _Decoding(backend, params, trim=open_ended)
        self.done: list[tuple[_Row, GenOutput]] = []

    @torch.inference_mode()
    def submit(self, requests: list[GenRequest]) -> None:
        """Queue the requests; raise PromptTooLong, queuing none of them, if some histories fill the context."""
        for req, ids in fitting(requests, self.b.tokenizer, self.b.context):
            past = self.b._reusable(req.conv_ids, ids)
            bisect.insort(self.work, _Work(len(ids) - len(past.ids), req, ids, past), key=lambda w: w.new)

    @torch.inference_mode()
    def poll(self) -> list[tuple[ConvId, GenOutput]]:
        """Decode until some conversations' messages are done; return them (empty: nothing queued)."""
        b, batch = self.b, self.batch
        while not self.done and (self.work or self.pending or batch.live):
            while self.work and len(self.pending) < batch.free and (
                    not batch.live or batch.free - len(self.pending) >= self.gather):
                chunk, self.work = b._prefill_chunk(self.work)
                rows, done = b._rows(chunk, self.params)
                self.pending += rows
                self.done += done
            self.pending = batch.fill_slots(self.pending)
            if self.pending and batch.free >= max(1, min(b.batch_size // 4, len(self.pending))):
                admitted, self.pending = self.pending[: batch.free], self.pending[batch.free :]
                batch.rebuild(admitted)
            elif not self.pending and batch.dead and batch.dead >= len(batch.live):
                batch.rebuild([])
            self.done += batch.step()
        done, self.done = self.done, []
        return [(row.conv, out) for row, out in done]


class _Decoding:
    """The running decode batch: up to `batch_size` rows sharing one left-padded cache.

    What every step reads — each slot's last token, seed, token count and first cache column — is
    kept on the model's device, so a step moves nothing to the device and one list of sampled
    tokens back.
    """

    def __init__(self, backend: HFBackend, params: SamplingParams, trim: bool = False):
        self.b, self.params, self.trims = backend, params, trim
        self.rows: list[_Row | None] = []
        self.cache: Cache | None = None
        self.start = torch.zeros(0, dtype=torch.long)  # [B] on the CPU, for cache bookkeeping
        self.T = 0
        self._slots(torch.zeros(0, dtype=torch.long), [])

    def _slots(self, start: torch.Tensor, rows: list[_Row]) -> None:
        """Device copies of the slots' state: start [B], last token [B], seed [B], tokens sampled [B]."""
        dev = self.b.device
        self.start_dev = start.to(dev)
        self.last = torch.tensor([row.tokens[-1] for row in rows], dtype=torch.long, device=dev)
        self.seeds = torch.tensor([row.seed for row in rows], dtype=torch.long, device=dev)
        self.counts = torch.tensor([len(row.tokens) for row in rows], dtype=torch.long, device=dev)

    @property
    def live(self) -> list[_Row]:
        return [r for r in self.rows if r is not None]

    @property
    def dead(self) -> int:
        return len(self.rows) - len(self.live)

    @property
    def free(self) -> int:
        return self.b.batch_size - len(self.live)

    def _row_kv(self, r: int) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
        s = int(self.start[r])
        return ([layer.keys[r, :, s:] for layer in self.cache.layers],
                [layer.values[r, :, s:] for layer in self.cache.layers], self.T - s)

    def fill_slots(self, waiting: list[_Row]) -> list[_Row]:
        """Move waiting rows into finished rows' slots where their cache fits; return the others.

        Cheap (copies only the newcomer's cache), so a slot is reused the step after it frees.
        """
        slots = [r for r, row in enumerate(self.rows) if row is None]
        rest = []
        for row in waiting:
            n = len(row.prefix.ids)
            if not slots or n > self.T:
                rest.append(row)
                continue
            r = slots.pop()
            for layer, k, v in zip(self.cache.layers, row.prefix.keys, row.prefix.values):
                layer.kbuf[r, :, self.T - n : self.T] = k
                layer.vbuf[r, :, self.T - n : self.T] = v
            self.start[r] = self.T - n
            self.rows[r] = row
            self.start_dev[r], self.last[r], self.seeds[r], self.counts[r] = self.T - n, row.tokens[-1], row.seed, 1
        return rest

    def rebuild(self, admitted: list[_Row]) -> None:
        """Drop finished rows and pack the survivors and `admitted` into a fresh cache."""
        keep = [r for r, row in enumerate(self.rows) if row is not None]
        parts = [self._row_kv(r) for r in keep] + [(row.prefix.keys, row.prefix.values, len(row.prefix.ids))
                                                    for row in admitted]
        self.rows = [self.rows[r] for r in keep] + admitted
        if not self.rows:
            self.cache, self.start, self.T = None, torch.zeros(0, dtype=torch.long), 0
        else:
            spare = self.params.max_new_tokens - min(len(row.tokens) for row in self.rows) + 1
            self.cache, self.start, self.T = pack(parts, spare, self.b.n_layers)
        self._slots(self.start, self.rows)

    def trim(self) -> None:
        """Drop the cache columns left of every live row (views, no copy).

        A row that takes a free slot starts at T - its length, and T grows with every step, so a
        long session would otherwise attend ever more padding. (It changes the columns attention
        sums over, so in bf16 it can change a near-tied sample.)
        """
        m = min(int(self.start[r]) for r, row in enumerate(self.rows) if row is not None)
        if m == 0:
            return
        for layer in self.cache.layers:
            layer.kbuf, layer.vbuf, layer.length = layer.kbuf[:, :, m:], layer.vbuf[:, :, m:], layer.length - m
            layer.set_views()
        self.T -= m
        self.start = (self.start - m).clamp(min=0)  # finished rows' slots may start further left
        self.start_dev = (self.start_dev - m).clamp(min=0)

    def step(self) -> list[tuple[_Row, GenOutput]]:
        """Feed every slot's last token, sample the next; return the rows that finished.

        Finished rows' slots are fed and sampled too (their results are ignored): selecting the
        live rows would cost more than the few rows it saves, which rebuild() bounds.
        """
        live = len(self.live)
        if not live:
            return []
        self.b.decode_steps += 1
        self.b.decode_rows += live
        if self.trims:
            self.trim()
        dev = self.b.device
        mask = torch.arange(self.T + 1, device=dev)[None] >= self.start_dev[:, None]
        out = self.b.model(input_ids=self.last[:, None], attention_mask=mask.long(),
                           position_ids=(self.T - self.start_dev)[:, None], past_key_values=self.cache,
                           use_cache=True)
        self.T += 1
        self.last = sample_tokens(out.logits[:, -1], self.params, self.seeds, self.counts)
        self.counts += 1
        finished = []
        for r, tok in enumerate(self.last.tolist()):
            row = self.rows[r]
            if row is None:
                continue
            row.tokens.append(tok)
            done = self.b._finish(row, self.params)
            if done is not None:
                keys, values, _ = self._row_kv(r)
                ids = row.prefix.ids + row.tokens[:-1]
                self.b._keep(row.conv, KV(ids, [k.clone() for k in keys], [v.clone() for v in values]))
                self.rows[r] = None
                finished.append((row, done))
        return finished
