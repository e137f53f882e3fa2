"""Text generation: KV cache, batched prompts of different lengths, streaming, stop strings,
and the usual sampling controls (temperature, top-k, top-p, min-p, repetition penalty, seed).

With the cache (the default) the prompt is run once (prefill) and then one token per step;
``use_cache=False`` recomputes the whole context every step and gives the same tokens, which
is what the tests check. Prompts of different lengths are left-padded: each row gets its own
positions (its first real token is position 0) and padding is masked out of attention and
skipped by recurrent mixers, so a row comes out as if it had been generated alone.

Cached steps run ``LM.step``: the same modules as ``LM.forward``, each through its one-token
``step()`` (for a mixer, ``TokenMixer.step``); while a trace records (forward hooks are
registered) they run through ``LM.forward`` instead, so the hooks see every call.

The context is the model's ``block_size`` (models whose mixers all keep a recurrent state,
without learned positions, have no limit). A prompt longer than that is refused; when
generation reaches the limit, the context slides: decoding continues from the last three
quarters of the sequence, with positions counted from its start (one prefill, then the cache
again).

Dimension letters: B batch, T time, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minlm.kvcache import KVCache

# --- sampling ----------------------------------------------------------------------------

def check_sampling(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                   min_p: float = 0.0, repetition_penalty: float = 1.0) -> None:
    """Refuse sampling settings that cannot work, naming the setting and what is allowed."""
    if not temperature >= 0:
        raise ValueError(f"temperature={temperature} is invalid: must be >= 0 (0 means greedy)")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k={top_k!r} is invalid: must be an integer >= 0 (0 keeps all)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} is invalid: must be in (0, 1] (1 keeps all)")
    if not 0 <= min_p <= 1:
        raise ValueError(f"min_p={min_p} is invalid: must be in [0, 1] (0 keeps all)")
    if not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty={repetition_penalty} is invalid: must be > 0 "
                         "(1 means none; 1.1-1.3 discourages repeats)")


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0,
                  min_p: float = 0.0) -> torch.Tensor:
    """Set to -inf every logit outside the allowed set; logits (B, V) are already tempered.

    top-k keeps the k largest; min-p keeps tokens with probability >= min_p times the largest;
    top-p keeps the smallest set of most likely tokens whose probability reaches top_p.
    """
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        threshold = min_p * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p  # keep the first token past p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor,
                             penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019): for tokens already in the sequence (``seen`` (B, V)
    True), positive logits are divided by ``penalty`` and negative ones multiplied by it."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                top_p: float = 1.0, min_p: float = 0.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V); greedy when temperature is 0."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p, min_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# --- decoding ----------------------------------------------------------------------------

def context_limit(config) -> int | None:
    """Most tokens the model sees at once: ``block_size``, or None when every mixer in use
    keeps a recurrent state and positions are not learned (the state carries any length)."""
    from minlm.modules.block import layout_mixers
    from minlm.modules.registry import mixer_spec

    recurrent = all(mixer_spec(n).state == "recurrent" for n in layout_mixers(config))
    if recurrent and config.position != "learned":
        return None
    return config.block_size


def _row_positions(valid: torch.Tensor) -> torch.Tensor:
    """Positions (B, T) of left-padded rows: 0 at each row's first real token, 0 on padding."""
    return (valid.long().cumsum(dim=-1) - 1).clamp(min=0)


def _as_rows(prompts) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2:
            raise ValueError(f"prompt ids must be a (B, T) tensor, got shape "
                             f"{tuple(prompts.shape)}")
        return prompts.tolist()
    rows = [list(map(int, p)) for p in prompts]
    if not rows:
        raise ValueError("no prompts given: pass at least one list of token ids")
    return rows


class TokenStream:
    """Iterate to get, step by step, the next token of every row (a list of B ids).

    ``prompts`` is a (B, T) tensor or a list of id lists of any lengths (left-padded with
    ``pad_id``). A row is finished once it samples an id in ``eos_id`` (an id or several) or
    when ``stop(row)`` is called; after that it repeats its fill id (the first eos id, else
    ``pad_id``), and iteration ends when every row is finished or after ``max_new_tokens``.
    ``keep_logits=True`` keeps each step's raw model logits (B, V) in ``self.logits``.
    ``n_ids`` (the tokenizer's vocabulary size) masks the ids of a larger model vocabulary,
    which training allows but no tokenizer could decode.
    ``use_cache=False`` recomputes the context every step (the reference the tests compare
    with); ``fast=False`` runs cached steps through ``LM.forward`` instead of ``LM.step``.
    The model is put in eval mode for the duration (and restored afterwards).
    """

    def __init__(self, model, prompts: torch.Tensor | Sequence[Sequence[int]], max_new_tokens: int,
                 *, eos_id: int | Iterable[int] | None = None, pad_id: int = 0,
                 use_cache: bool = True, fast: bool = True, keep_logits: bool = False,
                 temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 repetition_penalty: float = 1.0, seed: int | None = None,
                 n_ids: int | None = None):
        check_sampling(temperature, top_k, top_p, min_p, repetition_penalty)
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens} is invalid: must be >= 0")
        rows = _as_rows(prompts)
        empty = [i for i, r in enumerate(rows) if not r]
        if empty:
            raise ValueError(f"prompt {empty[0]} is empty; start every prompt with at least the "
                             "BOS token")
        self.model, cfg = model, model.config
        device = next(model.parameters()).device
        B, P = len(rows), max(len(r) for r in rows)
        self.limit = context_limit(cfg)
        if self.limit is not None and P > self.limit:
            which = "the prompt" if B == 1 else f"prompt {[len(r) for r in rows].index(P)}"
            raise ValueError(f"{which} is {P} tokens, longer than the context of {self.limit} "
                             "tokens (block_size)")
        self.keep = max(1, self.limit - self.limit // 4) if self.limit else 0
        self.prompt_len, self.max_new_tokens = P, max_new_tokens
        self.temperature, self.top_k, self.top_p, self.min_p = temperature, top_k, top_p, min_p
        self.repetition_penalty = repetition_penalty
        self.tokens = torch.full((B, P + max_new_tokens), pad_id, dtype=torch.long, device=device)
        padded = any(len(r) != P for r in rows)
        self.valid = torch.ones_like(self.tokens, dtype=torch.bool) if padded else None  # (B, L)
        for i, r in enumerate(rows):
            self.tokens[i, P - len(r):P] = torch.tensor(r, dtype=torch.long)
            if padded:
                self.valid[i, :P - len(r)] = False
        self.length, self.ctx_start = P, 0  # slots filled; first slot of the current context
        self.next_pos: torch.Tensor | None = None  # (B,) next position of padded rows
        eos = [] if eos_id is None else [eos_id] if isinstance(eos_id, int) else list(eos_id)
        self.eos = torch.tensor(eos, dtype=torch.long, device=device) if eos else None
        self.fill = eos[0] if eos else pad_id
        self.done = torch.zeros(B, dtype=torch.bool, device=device)
        self._may_finish = self.eos is not None  # False: no row can be done, skip the checks
        self.generator = (torch.Generator(device=device).manual_seed(seed)
                          if seed is not None else None)
        self.seen = None  # (B, V) tokens in each row so far, for the repetition penalty
        if repetition_penalty != 1.0:
            self.seen = torch.zeros(B, cfg.vocab_size, dtype=torch.bool, device=device)
            real = self.valid[:, :P] if padded else torch.ones(B, P, dtype=torch.bool,
                                                               device=device)
            self.seen.scatter_(1, self.tokens[:, :P], real)  # padding writes False at pad_id
            self.seen[:, pad_id] = torch.tensor([pad_id in r for r in rows], device=device)
        max_len = self.limit or P + max_new_tokens
        self.cache = KVCache.for_model(model, B, max_len) if use_cache else None
        hooked = any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
        self.fast = use_cache and fast and not hooked
        self.keep_logits, self.logits = keep_logits, []
        self.n_ids = n_ids if n_ids is not None and n_ids < cfg.vocab_size else None
        self._iter = None

    @property
    def new_tokens(self) -> torch.Tensor:
        """Generated ids so far (B, n); finished rows hold the fill id after their end."""
        return self.tokens[:, self.prompt_len:self.length]

    def stop(self, row: int) -> None:
        """Finish ``row`` now (e.g. it produced a stop string); the others go on."""
        self.done[row] = True
        self._may_finish = True

    def __iter__(self) -> Iterator[list[int]]:
        if self._iter is None:
            self._iter = self._run()
        return self._iter

    def __next__(self) -> list[int]:
        return next(iter(self))

    @torch.inference_mode()
    def _run(self) -> Iterator[list[int]]:
        was_training = self.model.training
        self.model.eval()
        try:
            logits = self._next_logits(first=True) if self.max_new_tokens else None
            for step in range(self.max_new_tokens):
                if self.keep_logits:
                    self.logits.append(logits.float().clone())
                nxt = self._sample(logits)  # (B,)
                if self._may_finish:
                    nxt = torch.where(self.done, self.fill, nxt)
                self.tokens.select(1, self.length).copy_(nxt)
                self.length += 1
                if self.seen is not None:
                    self.seen.scatter_(1, nxt[:, None], True)
                if self.eos is not None:
                    self.done |= torch.isin(nxt, self.eos)
                yield nxt.tolist()
                if step == self.max_new_tokens - 1 or (self._may_finish
                                                       and bool(self.done.all())):
                    return
                logits = self._next_logits()
        finally:
            self.model.train(was_training)

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        if self.n_ids is not None:  # ids past the tokenizer's vocabulary are never sampled
            logits = logits.clone()
            logits[:, self.n_ids:] = float("-inf")
        if self.seen is not None:
            logits = apply_repetition_penalty(logits, self.seen, self.repetition_penalty)
        return sample_next(logits, self.temperature, self.top_k, self.top_p, self.min_p,
                           self.generator)

    def _next_logits(self, first: bool = False) -> torch.Tensor:
        """Logits (B, V) after the newest token: one cached step, or a forward over the context."""
        moved = False
        if self.limit is not None and self.length - self.ctx_start > self.limit:
            self.ctx_start, moved = self.length - self.keep, True  # slide the context
        if self.cache is None:
            return self._context_forward(None)
        if first or moved:
            self.cache.reset()
            return self._context_forward(self.cache)
        idx = self.tokens.narrow(1, self.length - 1, 1)  # (B, 1)
        positions = None
        if self.valid is not None:
            positions = self.next_pos[:, None]  # (B, 1)
            self.next_pos = self.next_pos + 1
        if self.fast:
            return self.model.step(idx, self.cache, positions)
        logits, _ = self.model(idx, positions=positions, cache=self.cache)
        return logits[:, -1]

    def _context_forward(self, cache: KVCache | None) -> torch.Tensor:
        idx = self.tokens[:, self.ctx_start:self.length]  # (B, T)
        valid = positions = None
        if self.valid is not None:
            valid = self.valid[:, self.ctx_start:self.length]  # (B, T)
            positions = _row_positions(valid)  # (B, T)
            self.next_pos = positions[:, -1] + 1  # the newest slot is always a real token
        logits, _ = self.model(idx, positions=positions, cache=cache, key_valid=valid)
        return logits[:, -1]


def generate_ids(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 eos_id: int | None = None, seed: int | None = None,
                 repetition_penalty: float = 1.0, use_cache: bool = True) -> torch.Tensor:
    """Continue ``idx`` (B, T) by up to ``max_new_tokens``: (B, T + n); rows stop at ``eos_id``
    and are filled with it until every row has stopped."""
    s = TokenStream(model, idx, max_new_tokens, eos_id=eos_id, use_cache=use_cache,
                    temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                    repetition_penalty=repetition_penalty, seed=seed)
    for _ in s:
        pass
    return s.tokens[:, :s.length].clone()


def generate_batch_ids(model, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                       eos_id: int | Iterable[int] | None = None, pad_id: int = 0,
                       use_cache: bool = True, **sampling) -> list[list[int]]:
    """New ids for each prompt (lists of any lengths, run as one left-padded batch), without
    the end token."""
    s = TokenStream(model, prompts, max_new_tokens, eos_id=eos_id, pad_id=pad_id,
                    use_cache=use_cache, **sampling)
    out: list[list[int]] = [[] for _ in range(len(s.done))]
    finished = [False] * len(out)
    ends = set() if s.eos is None else set(s.eos.tolist())
    for ids in s:
        for r, t in enumerate(ids):
            if finished[r] or t in ends:
                finished[r] = True
                continue
            out[r].append(t)
    return out


# --- text --------------------------------------------------------------------------------

def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """BOS + the prompt's ids, as documents start in training."""
    return [tokenizer.bos_id] + tokenizer.encode(prompt)


class _Detokenizer:
    """Turns one row's new ids into text as they come: holds back an unfinished UTF-8
    character and any tail that could be the start of a stop string; cuts at a stop string."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.text, self.emitted, self.stopped = "", 0, False

    def add(self, token_id: int) -> bool:
        """Append a token; True when the text now holds a stop string (text is cut before it)."""
        self.ids.append(token_id)
        previous = len(self.text)
        self.text = self.tokenizer.decode(self.ids)
        for s in self.stop:
            at = self.text.find(s, max(0, previous - len(s)))
            if at >= 0:
                self.text, self.stopped = self.text[:at], True
        return self.stopped

    def ready(self) -> str:
        """Text that is safe to show now and was not shown before."""
        end = len(self.text) if self.stopped else self._safe_end()
        piece, self.emitted = self.text[self.emitted:end], max(self.emitted, end)
        return piece

    def flush(self) -> str:
        piece, self.emitted = self.text[self.emitted:], len(self.text)
        return piece

    def _safe_end(self) -> int:
        end = len(self.text.rstrip("\ufffd"))
        for s in self.stop:  # a suffix that a stop string starts with may still become one
            for n in range(min(len(s) - 1, end), 0, -1):
                if self.text[end - n:end] == s[:n]:
                    end -= n
                    break
        return max(end, self.emitted)


def _end_ids(tokenizer, extra: Iterable[int] = ()) -> list[int]:
    return [tokenizer.eos_id, *extra]


def stream(model, tokenizer, prompt: str, max_new_tokens: int = 100,
           stop: str | Sequence[str] | None = None, use_cache: bool = True,
           **sampling) -> Iterator[str]:
    """Yield the continuation of ``prompt`` piece by piece as it is generated; ends at EOS, at
    a stop string (not included) or after ``max_new_tokens``. Joined, the pieces equal
    ``generate(...)`` with the same settings."""
    stops = [stop] if isinstance(stop, str) else list(stop or ())
    s = TokenStream(model, [encode_prompt(tokenizer, prompt)], max_new_tokens,
                    eos_id=_end_ids(tokenizer), pad_id=tokenizer.pad_id, use_cache=use_cache,
                    n_ids=tokenizer.vocab_size,
                    **sampling)
    return _stream_text(s, _Detokenizer(tokenizer, stops))


def _stream_text(s: TokenStream, detok: _Detokenizer) -> Iterator[str]:
    ends = set(s.eos.tolist()) if s.eos is not None else set()
    for (t,) in s:
        if t in ends:
            break
        if detok.add(t):
            s.stop(0)
            break
        piece = detok.ready()
        if piece:
            yield piece
    rest = detok.flush()
    if rest:
        yield rest


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 100,
             stop: str | Sequence[str] | None = None, use_cache: bool = True,
             **sampling) -> str:
    """The prompt's continuation as text (the prompt itself is not repeated).

    ``sampling``: temperature (0 = greedy), top_k, top_p, min_p, repetition_penalty, seed.
    """
    return "".join(stream(model, tokenizer, prompt, max_new_tokens, stop, use_cache, **sampling))


@dataclass
class Completion:
    """One prompt's result: the text, the ids behind it and why it ended."""

    prompt: str
    prompt_ids: list[int]
    ids: list[int]  # generated ids, without the end token
    text: str  # their text, cut before a stop string
    finish: str  # "eos", "stop" (a stop string) or "length" (max_new_tokens)


def complete(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 100,
             stop: str | Sequence[str] | None = None, use_cache: bool = True,
             **sampling) -> list[Completion]:
    """Continue several prompts together, as one left-padded batch; each row ends on its own
    (EOS, a stop string or ``max_new_tokens``) and comes out as if generated alone."""
    if isinstance(prompts, str):
        raise TypeError("pass a list of prompts (a single string would be one prompt per "
                        "character); use generate() for one prompt")
    stops = [stop] if isinstance(stop, str) else list(stop or ())
    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    s = TokenStream(model, prompt_ids, max_new_tokens, eos_id=_end_ids(tokenizer),
                    pad_id=tokenizer.pad_id, use_cache=use_cache, n_ids=tokenizer.vocab_size,
                    **sampling)
    detoks = [_Detokenizer(tokenizer, stops) for _ in prompts]
    ends = set(s.eos.tolist())
    finish = ["length"] * len(prompts)
    for ids in s:
        for r, t in enumerate(ids):
            if finish[r] != "length":
                continue
            if t in ends:
                finish[r] = "eos"
            elif detoks[r].add(t):
                finish[r] = "stop"
            else:
                continue
            s.stop(r)
    return [Completion(p, pid, d.ids, d.text, f)
            for p, pid, d, f in zip(prompts, prompt_ids, detoks, finish)]


def generate_batch(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 100,
                   stop: str | Sequence[str] | None = None, use_cache: bool = True,
                   **sampling) -> list[str]:
    """Continuations of several prompts (texts only), generated as one batch; see complete()."""
    return [c.text for c in complete(model, tokenizer, prompts, max_new_tokens, stop,
                                     use_cache, **sampling)]


# --- chat --------------------------------------------------------------------------------

class Chat:
    """A conversation with a chat-tuned model; the history stays within the context.

    With a tokenizer that has chat tokens, a conversation is rendered as
    ``<bos><|system|>..<|end|><|user|>..<|end|><|assistant|>..<|end|>...<|assistant|>`` and a
    reply ends at ``<|end|>`` (or EOS). Otherwise turns are plain text (``User: ..`` /
    ``Assistant: ..`` lines) and a reply ends at a new ``User:`` line. When the rendered
    history plus ``max_new_tokens`` would not fit in the context, the oldest turns are
    dropped (the system message is kept).
    """

    def __init__(self, model, tokenizer, system: str = "", max_new_tokens: int = 200,
                 **sampling):
        check_sampling(**{k: v for k, v in sampling.items() if k != "seed"})
        self.model, self.tokenizer, self.system = model, tokenizer, system
        self.max_new_tokens, self.sampling = max_new_tokens, sampling
        self.history: list[tuple[str, str]] = []  # (role, text), role "user" or "assistant"
        try:
            self.special = tokenizer.chat_tokens
        except ValueError:
            self.special = None
        limit = context_limit(model.config)
        self.budget = None if limit is None else limit - max_new_tokens
        if self.budget is not None and self.budget < 8:
            raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for the "
                             f"conversation in the context of {limit} tokens; use fewer")

    def _turn(self, role: str, text: str) -> list[int]:
        if self.special:  # the template that fine-tuning trains on (minlm.chatdata)
            from minlm.chatdata import turn_ids

            return turn_ids(self.tokenizer, role, text, strict=False)
        return self.tokenizer.encode(f"{role.capitalize()}: {text}\n")

    def _reply_start(self) -> list[int]:
        return [self.special["assistant"]] if self.special else self.tokenizer.encode("Assistant:")

    def prompt_ids(self, turns: list[tuple[str, str]] | None = None) -> list[int]:
        """Ids of the conversation so far plus the start of the assistant's reply, trimmed to
        fit the context; raises ValueError if even the last user turn alone does not fit."""
        turns = self.history if turns is None else turns
        head = [self.tokenizer.bos_id] + (self._turn("system", self.system) if self.system else [])
        parts = [self._turn(role, text) for role, text in turns]
        tail = self._reply_start()
        while True:
            ids = head + [i for p in parts for i in p] + tail
            if self.budget is None or len(ids) <= self.budget:
                return ids
            if len(parts) <= 1:
                raise ValueError(f"the message is {len(ids)} tokens with the system prompt, more "
                                 f"than the {self.budget} the context leaves after "
                                 f"max_new_tokens={self.max_new_tokens}; write a shorter one")
            parts = parts[2:] if len(parts) > 2 else parts[1:]  # drop the oldest exchange

    def stream_reply(self, message: str) -> Iterator[str]:
        """Send ``message``; yield the reply in pieces; the exchange joins the history."""
        ids = self.prompt_ids(self.history + [("user", message)])
        tok = self.tokenizer
        ends = _end_ids(tok, [self.special["end"]] if self.special else [])
        stops = [] if self.special else ["\nUser:", "User:"]
        s = TokenStream(self.model, [ids], self.max_new_tokens, eos_id=ends, pad_id=tok.pad_id,
                        n_ids=tok.vocab_size,
                        **self.sampling)
        pieces = []
        for piece in _stream_text(s, _Detokenizer(tok, stops)):
            pieces.append(piece)
            yield piece
        self.history += [("user", message), ("assistant", "".join(pieces).strip())]

    def reply(self, message: str) -> str:
        return "".join(self.stream_reply(message))
