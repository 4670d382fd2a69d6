"""Autoregressive decoding: greedy, sampling (temperature, top-k, top-p) and
beam search, generic over the model through a step function.

The decoders never see the model. The caller (a text decoder with a KV
cache) prefills the prompt and passes
  - `first_logits` [B, V]: the logits of the first token to generate,
  - `cache`: a pytree (the KV cache) whose leaves with ndim >= 1 have the
    batch as their leading axis [B, ...]; leaves with ndim 0 (a write index
    shared by the batch) are batch-independent and left alone when beams are
    tiled or reordered,
  - `step_fn(cache, tokens [B] int32) -> (logits [B, V], new_cache)`, which
    feeds one token per example and returns the logits of the next one.

`step_fn` is called at most `max_new_tokens - 1` times (the last token is
never fed back). Every decoder is a `jax.lax.while_loop` over static shapes,
stops as soon as nothing can change the result, and runs under `jax.jit` with
its options static (`functools.partial`) and with a batch sharded over
devices (no host round trips). Tokens are int32 [B, max_new_tokens]: after an
example's `eos_id` (kept in the output) every position is `pad_id`.
"""

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

Cache = Any
StepFn = Callable[[Cache, jnp.ndarray], tuple[jnp.ndarray, Cache]]

# The log-probability of an impossible hypothesis: finite, as in flax's and
# T5X's beam search, so that sums and length normalisation never give NaN.
NEG_INF = -1.0e7

# ------------------------------------------------------------ the loop ---


def _decode(select: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray],
            step_fn: StepFn, first_logits: jnp.ndarray, cache: Cache, *,
            max_new_tokens: int, eos_id: int, pad_id: int) -> jnp.ndarray:
  """One token per step chosen by `select(logits [B, V], step) -> [B]`:
  the loop greedy and sampling share; -> tokens int32 [B, max_new_tokens].

  The loop ends when every example has emitted `eos_id` (the rest of the
  output is `pad_id`); finished examples feed `pad_id` to `step_fn`.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  batch = first_logits.shape[0]

  def choose(tokens, done, logits, i):
    token = jnp.where(done, pad_id, select(logits, i).astype(jnp.int32))
    return token, tokens.at[:, i].set(token), done | (token == eos_id)

  tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
  token, tokens, done = choose(tokens, jnp.zeros((batch,), bool),
                               first_logits, 0)

  def cond(carry):
    i, _, _, done, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, token, tokens, done, cache = carry
    logits, cache = step_fn(cache, token)
    token, tokens, done = choose(tokens, done, logits, i)
    return i + 1, token, tokens, done, cache

  carry = (jnp.asarray(1, jnp.int32), token, tokens, done, cache)
  return jax.lax.while_loop(cond, body, carry)[2]


# -------------------------------------------------------------- greedy ---


def greedy(step_fn: StepFn, first_logits: jnp.ndarray, cache: Cache, *,
           max_new_tokens: int, eos_id: int, pad_id: int = 0) -> jnp.ndarray:
  """The most probable token at each step: first_logits [B, V] -> tokens
  int32 [B, max_new_tokens], `pad_id` after each example's `eos_id`."""
  return _decode(lambda logits, _: jnp.argmax(logits, axis=-1), step_fn,
                 first_logits, cache, max_new_tokens=max_new_tokens,
                 eos_id=eos_id, pad_id=pad_id)


# ------------------------------------------------------------ sampling ---


def filter_logits(logits: jnp.ndarray, *, top_k: int = 0,
                  top_p: float = 1.0) -> jnp.ndarray:
  """logits [..., V] with the tokens outside the kept set at -inf.

  Top-k (`top_k` > 0) keeps the k largest logits (exactly k, ties broken by
  the sort); then top-p, nucleus filtering (Holtzman et al., "The Curious
  Case of Neural Text Degeneration", ICLR 2020), keeps of those the smallest
  set of most probable tokens whose probability (renormalised over the top-k
  set) sums to at least `top_p`; the most probable token is always kept.
  `top_k` = 0 or >= V and `top_p` = 1 keep everything.
  """
  if top_k < 0 or not 0.0 < top_p <= 1.0:
    raise ValueError(f"need top_k >= 0 and 0 < top_p <= 1, got top_k={top_k},"
                     f" top_p={top_p}")
  vocab = logits.shape[-1]
  if (top_k == 0 or top_k >= vocab) and top_p >= 1.0:
    return logits
  order = jnp.argsort(logits, axis=-1, descending=True)
  ranked = jnp.take_along_axis(logits, order, axis=-1)  # descending
  keep = jnp.ones(ranked.shape, bool)
  if 0 < top_k < vocab:
    keep = jnp.broadcast_to(jnp.arange(vocab) < top_k, ranked.shape)
  if top_p < 1.0:
    probs = jax.nn.softmax(jnp.where(keep, ranked, -jnp.inf), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the better ones
    keep = keep & (before < top_p)
  keep = jnp.take_along_axis(keep, jnp.argsort(order, axis=-1), axis=-1)
  return jnp.where(keep, logits, -jnp.inf)


def sample(step_fn: StepFn, first_logits: jnp.ndarray, cache: Cache,
           rng: jax.Array, *, max_new_tokens: int, eos_id: int,
           pad_id: int = 0, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0) -> jnp.ndarray:
  """Tokens drawn from the filtered distribution: first_logits [B, V] ->
  tokens int32 [B, max_new_tokens], `pad_id` after each example's `eos_id`.

  Each step divides the logits by `temperature`, filters them
  (`filter_logits`: top-k, then top-p) and draws with
  `jax.random.categorical` under `jax.random.fold_in(rng, step)`, each row
  independently. `temperature` = 0 is `greedy`. The options are static.
  """
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if temperature == 0:
    return greedy(step_fn, first_logits, cache, max_new_tokens=max_new_tokens,
                  eos_id=eos_id, pad_id=pad_id)

  def select(logits, i):
    logits = logits.astype(jnp.float32) / temperature
    logits = filter_logits(logits, top_k=top_k, top_p=top_p)
    return jax.random.categorical(jax.random.fold_in(rng, i), logits)

  return _decode(select, step_fn, first_logits, cache,
                 max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id)


# --------------------------------------------------------- beam search ---


def _is_batched(leaf) -> bool:
  return jnp.ndim(leaf) >= 1


def tile_beams(cache: Cache, beam_size: int) -> Cache:
  """Each example's rows repeated `beam_size` times, consecutively: leaves
  [B, ...] -> [B * beam_size, ...], example b's beams at rows b * beam_size
  ... b * beam_size + beam_size - 1; ndim-0 leaves unchanged."""
  return jax.tree.map(
      lambda x: jnp.repeat(x, beam_size, axis=0) if _is_batched(x) else x,
      cache)


def _take_beams(x: jnp.ndarray, indices: jnp.ndarray) -> jnp.ndarray:
  """x [B, K, ...] at each example's `indices` [B, N] -> [B, N, ...]."""
  return jax.vmap(lambda rows, i: rows[i])(x, indices)


def gather_beams(cache: Cache, indices: jnp.ndarray) -> Cache:
  """The beams `indices` int32 [B, N] (each example's parent beams, in
  [0, K)) of a tiled cache: leaves [B * K, ...] -> [B * N, ...]; ndim-0
  leaves unchanged. Each example's rows stay its own (a gather inside the
  example), so a cache sharded over the batch stays where it is."""
  batch, new = indices.shape

  def gather(x):
    if not _is_batched(x):
      return x
    beams = x.reshape((batch, x.shape[0] // batch) + x.shape[1:])
    return _take_beams(beams, indices).reshape((batch * new,) + x.shape[1:])

  return jax.tree.map(gather, cache)


def _length_norm(length, alpha: float) -> jnp.ndarray:
  """GNMT's length penalty ((5 + length) / 6) ** alpha (Wu et al., "Google's
  Neural Machine Translation System", 2016, eq. 14)."""
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


class _Beams(NamedTuple):
  """Beam search state: B examples, K beams, T = max_new_tokens."""
  live_seqs: jnp.ndarray      # int32 [B, K, T]: the alive hypotheses
  live_logprobs: jnp.ndarray  # float32 [B, K]: their summed log-probs, desc
  fin_seqs: jnp.ndarray       # int32 [B, K, T]: the best finished ones
  fin_scores: jnp.ndarray     # float32 [B, K]: length-normalised, desc


def _beam_step(beams: _Beams, logits: jnp.ndarray, i, *, eos_id: int,
               length_penalty: float) -> tuple[_Beams, jnp.ndarray,
                                               jnp.ndarray]:
  """Step i of beam search from the alive beams' logits [B, K, V] -> (the
  new state, the new alive beams' parents [B, K] and tokens [B, K]).

  Every alive beam is extended by every token. Its EOS extension is a
  finished hypothesis of length i + 1; the K best non-EOS extensions over
  all beams stay alive, and at the last step they finish too, at length
  max_new_tokens. The finished pool keeps the K best length-normalised
  scores.
  """
  batch, beam_size, vocab = logits.shape
  last = beams.live_seqs.shape[-1] - 1
  logprobs = (jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1) +
              beams.live_logprobs[..., None])  # [B, K, V]
  norm = _length_norm(i + 1, length_penalty)

  # The EOS extension of every alive beam: K finished candidates.
  eos_seqs = beams.live_seqs.at[:, :, i].set(eos_id)
  eos_scores = logprobs[:, :, eos_id] / norm

  # The K best non-EOS extensions stay alive.
  extended = logprobs.at[:, :, eos_id].set(NEG_INF).reshape(batch, -1)
  live_logprobs, flat = jax.lax.top_k(extended, beam_size)
  parents, tokens = flat // vocab, (flat % vocab).astype(jnp.int32)
  live_seqs = _take_beams(beams.live_seqs, parents).at[:, :, i].set(tokens)
  at_end = jnp.where(i == last, live_logprobs / norm, NEG_INF)

  scores = jnp.concatenate([beams.fin_scores, eos_scores, at_end], axis=1)
  seqs = jnp.concatenate([beams.fin_seqs, eos_seqs, live_seqs], axis=1)
  fin_scores, best = jax.lax.top_k(scores, beam_size)
  beams = _Beams(live_seqs, live_logprobs, _take_beams(seqs, best),
                 fin_scores)
  return beams, parents, tokens


def _beams_done(beams: _Beams, max_new_tokens: int,
                length_penalty: float) -> jnp.ndarray:
  """[B] True where no alive beam can beat the best finished hypothesis,
  so that the result (the best finished one) can no longer change.

  Log-probs only fall as tokens are added, and with a non-negative length
  penalty the normalisation grows with the length, so the best score an
  alive beam can reach is its log-prob over the penalty of max_new_tokens.
  (T5X compares with the worst finished hypothesis, as it returns all of
  them; only the best is returned here.) With a negative penalty there is
  no such bound: never done early.
  """
  if length_penalty < 0:
    return jnp.zeros(beams.fin_scores.shape[:1], bool)
  bound = beams.live_logprobs[:, 0] / _length_norm(max_new_tokens,
                                                    length_penalty)
  return bound <= beams.fin_scores[:, 0]


def beam_search(step_fn: StepFn, first_logits: jnp.ndarray, cache: Cache, *,
                max_new_tokens: int, eos_id: int, beam_size: int,
                length_penalty: float = 0.6,
                pad_id: int = 0) -> tuple[jnp.ndarray, jnp.ndarray]:
  """The best finished hypothesis per example: first_logits [B, V] ->
  (tokens int32 [B, max_new_tokens], scores float32 [B]).

  Beam search as in Wu et al. 2016 (GNMT) and T5X / flax: `beam_size` alive
  beams and the `beam_size` best finished hypotheses per example; a beam
  that emits `eos_id` finishes, as does one that reaches `max_new_tokens`.
  A hypothesis' score is its summed log-probability over
  ((5 + length) / 6) ** length_penalty, the length counting the generated
  tokens including EOS; `scores` are those of the returned tokens. The
  cache is tiled to B * beam_size rows (`tile_beams`) and reordered by the
  parent beams every step (`gather_beams`); `step_fn` then sees a batch of
  B * beam_size. The search stops once no alive beam can beat the best
  finished hypothesis (with length_penalty >= 0; else it runs to the end).
  The options are static.
  """
  if beam_size < 1 or max_new_tokens < 1:
    raise ValueError("beam_size and max_new_tokens must be >= 1, got "
                     f"{beam_size} and {max_new_tokens}")
  batch, vocab = first_logits.shape
  shape = (batch, beam_size, max_new_tokens)
  # All beams start identical: only beam 0 is alive at first, so the first
  # step's candidates come from one copy (no duplicate beams).
  start = jnp.full((batch, beam_size), NEG_INF, jnp.float32).at[:, 0].set(0.)
  beams = _Beams(jnp.full(shape, pad_id, jnp.int32), start,
                 jnp.full(shape, pad_id, jnp.int32),
                 jnp.full((batch, beam_size), NEG_INF, jnp.float32))
  advance = functools.partial(_beam_step, eos_id=eos_id,
                              length_penalty=length_penalty)
  logits = jnp.broadcast_to(first_logits[:, None], (batch, beam_size, vocab))
  beams, parents, tokens = advance(beams, logits, 0)

  def cond(carry):
    i, beams, _, _, _ = carry
    return (i < max_new_tokens) & ~jnp.all(
        _beams_done(beams, max_new_tokens, length_penalty))

  def body(carry):
    i, beams, parents, tokens, cache = carry
    cache = gather_beams(cache, parents)
    logits, cache = step_fn(cache, tokens.reshape(-1))
    beams, parents, tokens = advance(
        beams, logits.reshape(batch, beam_size, -1), i)
    return i + 1, beams, parents, tokens, cache

  carry = (jnp.asarray(1, jnp.int32), beams, parents, tokens,
           tile_beams(cache, beam_size))
  beams = jax.lax.while_loop(cond, body, carry)[1]
  return beams.fin_seqs[:, 0], beams.fin_scores[:, 0]
