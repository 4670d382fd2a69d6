"""Tests for mmjax.decoding (greedy, sampling, beam search) against NumPy
references on a toy Markov language model whose optimum is computable."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mmjax import decoding

PAD, EOS = 0, 1


class Markov:
  """A toy language model with a KV-cache-like state.

  The logits of the next token are table[last] + coupling[total % V], where
  `last` is the last token fed and `total` the prompt's offset plus the sum
  of every token fed so far. The cache holds `last` [B], `offset` [B],
  `history` [B, H] (the fed tokens, written at the shared scalar `index`),
  so a beam search that tiles or reorders any batch-leading leaf wrongly,
  or touches the scalar, gets other logits than the NumPy reference.
  """

  def __init__(self, vocab, seed, eos_bias=0.0, history=8):
    rng = np.random.RandomState(seed)
    self.vocab, self.history = vocab, history
    self.table = (2.0 * rng.randn(vocab, vocab)).astype(np.float32)
    self.table[:, EOS] += eos_bias
    self.coupling = rng.randn(vocab, vocab).astype(np.float32)

  # NumPy: the reference, float64.
  def np_logits(self, last, total):
    return (self.table[last].astype(np.float64) +
            self.coupling[total % self.vocab])

  def np_logprobs(self, last, total):
    z = self.np_logits(last, total)
    z = z - z.max()
    return z - np.log(np.exp(z).sum())

  # JAX: what a decoder gets from a prefill.
  def prefill(self, last, offset):
    last = jnp.asarray(last, jnp.int32)
    offset = jnp.asarray(offset, jnp.int32)
    cache = {"last": last, "offset": offset,
             "history": jnp.zeros((last.shape[0], self.history), jnp.float32),
             "index": jnp.zeros((), jnp.int32)}
    return self._logits(last, offset), cache

  def _logits(self, last, total):
    return (jnp.asarray(self.table)[last] +
            jnp.asarray(self.coupling)[total % self.vocab])

  def step(self, cache, tokens):
    assert tokens.shape == cache["last"].shape and tokens.dtype == jnp.int32
    assert cache["index"].shape == ()
    history = cache["history"].at[:, cache["index"]].set(tokens)
    total = cache["offset"] + jnp.sum(history, axis=1).astype(jnp.int32)
    cache = {"last": tokens, "offset": cache["offset"], "history": history,
             "index": cache["index"] + 1}
    return self._logits(tokens, total), cache


def _prompts(batch, vocab, seed=1):
  rng = np.random.RandomState(seed)
  return rng.randint(0, vocab, batch), rng.randint(0, 50, batch)


def _padded(seq, length):
  return list(seq) + [PAD] * (length - len(seq))


def _norm(length, alpha):
  return ((5.0 + length) / 6.0) ** alpha


# ------------------------------------------------------- NumPy references ---


def np_greedy(model, last, offset, max_new_tokens):
  out = []
  for b in range(len(last)):
    state, seq = (last[b], offset[b]), []
    for _ in range(max_new_tokens):
      token = int(np.argmax(model.np_logits(*state)))
      seq.append(token)
      if token == EOS:
        break
      state = (token, state[1] + token)
    out.append(_padded(seq, max_new_tokens))
  return np.array(out)


def _hypotheses(model, state, max_new_tokens):
  """Every (sequence, summed log-prob) a decoder can return from `state`:
  EOS-terminated ones of each length, and the full-length ones without."""
  def extend(seq, logprob, state):
    logprobs = model.np_logprobs(*state)
    yield seq + (EOS,), logprob + logprobs[EOS]
    for token in range(model.vocab):
      if token == EOS:
        continue
      seq_t, logprob_t = seq + (token,), logprob + logprobs[token]
      if len(seq_t) == max_new_tokens:
        yield seq_t, logprob_t
      else:
        yield from extend(seq_t, logprob_t, (token, state[1] + token))
  return list(extend((), 0.0, state))


def np_exhaustive(model, last, offset, max_new_tokens, alpha):
  """The best hypothesis of every example by scoring all of them."""
  tokens, scores = [], []
  for b in range(len(last)):
    seq, score = max(
        ((s, lp / _norm(len(s), alpha))
         for s, lp in _hypotheses(model, (last[b], offset[b]),
                                  max_new_tokens)),
        key=lambda h: h[1])
    tokens.append(_padded(seq, max_new_tokens))
    scores.append(score)
  return np.array(tokens), np.array(scores)


def np_beam_search(model, last, offset, max_new_tokens, alpha, beam_size):
  """Beam search by its definition: extend every alive beam by every token;
  EOS extensions finish; the `beam_size` best other extensions stay alive
  (and finish at max_new_tokens); return the best finished one."""
  tokens, scores = [], []
  for b in range(len(last)):
    alive = [((), 0.0, (last[b], offset[b]))]
    finished = []
    for i in range(max_new_tokens):
      candidates = []
      for seq, logprob, state in alive:
        logprobs = model.np_logprobs(*state)
        finished.append((seq + (EOS,),
                         (logprob + logprobs[EOS]) / _norm(i + 1, alpha)))
        candidates += [(seq + (t,), logprob + logprobs[t], (t, state[1] + t))
                       for t in range(model.vocab) if t != EOS]
      alive = sorted(candidates, key=lambda c: -c[1])[:beam_size]
    finished += [(seq, logprob / _norm(max_new_tokens, alpha))
                 for seq, logprob, _ in alive]
    seq, score = max(finished, key=lambda h: h[1])
    tokens.append(_padded(seq, max_new_tokens))
    scores.append(score)
  return np.array(tokens), np.array(scores)


def np_score(model, last, offset, tokens, alpha):
  """The length-normalised score of given token rows."""
  scores = []
  for b, row in enumerate(tokens):
    state, logprob, length = (last[b], offset[b]), 0.0, 0
    for token in row:
      logprob += model.np_logprobs(*state)[token]
      length += 1
      if token == EOS:
        break
      state = (token, state[1] + token)
    scores.append(logprob / _norm(length, alpha))
  return np.array(scores)


def np_filtered_probs(logits, temperature, top_k, top_p):
  """The renormalised distribution sampling draws from, by definition."""
  z = np.asarray(logits, np.float64) / temperature
  order = np.argsort(-z)
  keep = np.zeros(len(z), bool)
  kept = order[:top_k] if top_k else order
  p = np.exp(z[kept] - z[kept].max())
  p /= p.sum()
  # The smallest prefix of the ranked tokens with mass >= top_p.
  size = min(int(np.searchsorted(np.cumsum(p), top_p)) + 1, len(kept))
  keep[kept[:size]] = True
  probs = np.where(keep, np.exp(z - z.max()), 0.0)
  return probs / probs.sum()


# ------------------------------------------------------------------ greedy ---


def _decode(fn, model, last, offset, *args, **options):
  first_logits, cache = model.prefill(last, offset)
  run = jax.jit(functools.partial(fn, model.step, **options))
  return jax.tree.map(np.asarray, run(first_logits, cache, *args))


def test_greedy_matches_python_loop_with_eos_then_padding():
  model = Markov(vocab=6, seed=0, eos_bias=1.0)
  last, offset = _prompts(8, 6)
  tokens = _decode(decoding.greedy, model, last, offset, max_new_tokens=7,
                   eos_id=EOS, pad_id=PAD)
  expected = np_greedy(model, last, offset, 7)
  assert tokens.dtype == np.int32 and tokens.shape == (8, 7)
  np.testing.assert_array_equal(tokens, expected)
  # The case is a real one: some rows end early with padding, some don't.
  ended = (expected == EOS).any(axis=1)
  assert ended.any() and not ended.all()
  assert (expected[ended][:, -1] == PAD).any()


def _constant_model(logits_first, logits_next, calls):
  """first_logits and a step function returning fixed logits, counting its
  calls on the host."""
  def step(cache, tokens):
    jax.debug.callback(lambda: calls.append(1))
    return jnp.broadcast_to(logits_next, tokens.shape + logits_next.shape), (
        {"n": cache["n"] + 1})
  return jnp.asarray(logits_first), step, {"n": jnp.zeros((), jnp.int32)}


def test_greedy_stops_when_every_example_has_ended():
  first = np.zeros((3, 5), np.float32)
  first[:, 3] = 1.0
  ends, stays = np.zeros(5, np.float32), np.zeros(5, np.float32)
  ends[EOS], stays[3] = 1.0, 1.0
  for next_logits, expected_calls in ((ends, 1), (stays, 9)):
    calls = []
    logits, step, cache = _constant_model(first, jnp.asarray(next_logits),
                                          calls)
    tokens = jax.jit(functools.partial(
        decoding.greedy, step, max_new_tokens=10, eos_id=EOS, pad_id=PAD))(
            logits, cache)
    jax.effects_barrier()
    assert len(calls) == expected_calls
    expected = [3, EOS] + [PAD] * 8 if expected_calls == 1 else [3] * 10
    np.testing.assert_array_equal(tokens, [expected] * 3)


# ---------------------------------------------------------------- sampling ---


def test_filter_logits_keeps_the_defined_set():
  rng = np.random.RandomState(0)
  logits = (2.0 * rng.randn(64, 8)).astype(np.float32)
  for top_k, top_p in ((0, 1.0), (3, 1.0), (0, 0.5), (4, 0.7), (1, 0.9),
                       (0, 1e-6), (8, 0.999)):
    out = np.asarray(decoding.filter_logits(jnp.asarray(logits), top_k=top_k,
                                            top_p=top_p))
    for row, filtered in zip(logits, out):
      keep = np_filtered_probs(row, 1.0, top_k, top_p) > 0
      np.testing.assert_array_equal(np.isfinite(filtered), keep)
      np.testing.assert_array_equal(filtered[keep], row[keep])


@pytest.mark.parametrize("options", [dict(top_k=1), dict(temperature=0.0),
                                     dict(temperature=0.0, top_k=3)])
def test_sample_degenerate_cases_are_greedy(options):
  model = Markov(vocab=6, seed=0, eos_bias=1.0)
  last, offset = _prompts(8, 6)
  tokens = _decode(decoding.sample, model, last, offset,
                   jax.random.key(3), max_new_tokens=7, eos_id=EOS,
                   pad_id=PAD, **options)
  np.testing.assert_array_equal(tokens, np_greedy(model, last, offset, 7))


ROWS = 20_000
SAMPLE_LOGITS = np.log(np.array([0.06, 0.25, 0.04, 0.4, 0.1, 0.15]))


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 3, 1.0), (1.0, 0, 0.7), (2.0, 5, 0.8), (0.5, 0, 0.8)])
def test_sample_frequencies_match_filtered_distribution(temperature, top_k,
                                                        top_p):
  """One step over 20,000 identical rows: each token's frequency within
  0.02 of its renormalised probability (a standard deviation is at most
  0.0036), and the filtered tokens never drawn."""
  calls = []
  first = np.broadcast_to(SAMPLE_LOGITS.astype(np.float32), (ROWS, 6))
  logits, step, cache = _constant_model(first, jnp.zeros(6), calls)
  tokens = jax.jit(functools.partial(
      decoding.sample, step, max_new_tokens=1, eos_id=EOS, pad_id=PAD,
      temperature=temperature, top_k=top_k, top_p=top_p))(
          logits, cache, jax.random.key(0))
  expected = np_filtered_probs(SAMPLE_LOGITS, temperature, top_k, top_p)
  counts = np.bincount(np.asarray(tokens)[:, 0], minlength=6)
  np.testing.assert_array_equal(counts[expected == 0], 0)
  np.testing.assert_allclose(counts / ROWS, expected, atol=0.02)
  # A wrong filter (none, or no renormalisation) would be caught.
  unfiltered = np.exp(SAMPLE_LOGITS / temperature)
  unfiltered /= unfiltered.sum()
  if (expected == 0).any():
    assert np.abs(expected - unfiltered).max() > 0.05


def test_sample_draws_anew_each_step_and_follows_the_key():
  calls = []
  uniform = np.zeros((4000, 4), np.float32)
  logits, step, cache = _constant_model(uniform, jnp.zeros(4), calls)
  run = jax.jit(functools.partial(decoding.sample, step, max_new_tokens=3,
                                  eos_id=99, pad_id=PAD))
  a = np.asarray(run(logits, cache, jax.random.key(0)))
  np.testing.assert_array_equal(a, run(logits, cache, jax.random.key(0)))
  b = np.asarray(run(logits, cache, jax.random.key(1)))
  # Independent uniform draws agree with probability 1/4.
  assert 0.2 < np.mean(a[:, 0] == a[:, 1]) < 0.3
  assert 0.2 < np.mean(a[:, 1] == a[:, 2]) < 0.3
  assert 0.2 < np.mean(a == b) < 0.3


# ------------------------------------------------------------- beam search ---


def test_tile_and_gather_beams():
  cache = {"x": jnp.arange(6).reshape(2, 3), "index": jnp.asarray(7),
           "y": (jnp.asarray([10., 20.]),)}
  tiled = decoding.tile_beams(cache, 2)
  np.testing.assert_array_equal(tiled["x"], [[0, 1, 2]] * 2 + [[3, 4, 5]] * 2)
  np.testing.assert_array_equal(tiled["y"][0], [10., 10., 20., 20.])
  assert int(tiled["index"]) == 7
  tiled["x"] = tiled["x"] + jnp.asarray([0, 100, 0, 100])[:, None]
  gathered = decoding.gather_beams(tiled, jnp.asarray([[1, 1], [1, 0]]))
  np.testing.assert_array_equal(
      gathered["x"], [[100, 101, 102], [100, 101, 102], [103, 104, 105],
                      [3, 4, 5]])
  assert int(gathered["index"]) == 7


BEAM_VOCAB, BEAM_STEPS = 5, 4


def _beam(model, last, offset, **options):
  return _decode(decoding.beam_search, model, last, offset,
                 max_new_tokens=BEAM_STEPS, eos_id=EOS, pad_id=PAD, **options)


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0])
def test_beam_search_matches_exhaustive_and_reference(alpha):
  """With beam_size (V - 1) ** (T - 1) every prefix stays alive: the result
  is the exhaustive optimum. With beam_size 2 the beams are pruned and the
  result is the definition's, computed in NumPy."""
  model = Markov(vocab=BEAM_VOCAB, seed=33, eos_bias=1.0)
  last, offset = _prompts(8, BEAM_VOCAB, seed=3)
  best, best_scores = np_exhaustive(model, last, offset, BEAM_STEPS, alpha)
  full = (BEAM_VOCAB - 1) ** (BEAM_STEPS - 1)
  np.testing.assert_array_equal(
      np_beam_search(model, last, offset, BEAM_STEPS, alpha, full)[0], best)
  pruned = np_beam_search(model, last, offset, BEAM_STEPS, alpha, 2)
  # The case has teeth: pruning to 2 beams loses the optimum of some
  # example, and the optimum ends with EOS at varied lengths.
  assert (pruned[0] != best).any()
  lengths = {list(row).index(EOS) + 1 if EOS in row else BEAM_STEPS + 1
             for row in best}
  assert len(lengths) >= 3
  for beam_size, (ref, ref_scores) in ((full, (best, best_scores)),
                                       (2, pruned)):
    tokens, scores = _beam(model, last, offset, beam_size=beam_size,
                           length_penalty=alpha)
    assert tokens.dtype == np.int32 and scores.dtype == np.float32
    np.testing.assert_array_equal(tokens, ref, err_msg=f"{beam_size} beams")
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        scores, np_score(model, last, offset, tokens, alpha), rtol=1e-5,
        atol=1e-5)


def test_the_length_penalty_matters_in_the_exhaustive_case():
  """The optima for length_penalty 0 and 1 differ, so the test above would
  catch a penalty ignored or misapplied."""
  model = Markov(vocab=BEAM_VOCAB, seed=33, eos_bias=1.0)
  last, offset = _prompts(8, BEAM_VOCAB, seed=3)
  best = [np_exhaustive(model, last, offset, BEAM_STEPS, alpha)[0]
          for alpha in (0.0, 1.0)]
  assert (best[0] != best[1]).any()


def test_beam_size_one_is_greedy_when_eos_never_wins(alpha=0.6):
  """With beam_size 1 the alive beam follows greedy's tokens; the result is
  greedy's when EOS is never chosen (an EOS early in the greedy path can
  otherwise lose to one of its own EOS extensions found on the way)."""
  model = Markov(vocab=BEAM_VOCAB, seed=2, eos_bias=-30.0)
  last, offset = _prompts(6, BEAM_VOCAB, seed=3)
  tokens, scores = _beam(model, last, offset, beam_size=1,
                         length_penalty=alpha)
  greedy = np_greedy(model, last, offset, BEAM_STEPS)
  np.testing.assert_array_equal(tokens, greedy)
  np.testing.assert_allclose(scores, np_score(model, last, offset, greedy,
                                              alpha), rtol=1e-5, atol=1e-5)


def test_beam_search_stops_early():
  """Once no alive beam can beat an example's best finished hypothesis the
  search stops: here EOS is all but certain after the first token, so after
  one call of the step function."""
  first = np.zeros((2, 5), np.float32)
  first[:, 3] = 2.0
  ends = np.full(5, -20.0, np.float32)
  ends[EOS] = 20.0
  calls = []
  logits, step, cache = _constant_model(first, jnp.asarray(ends), calls)
  tokens, _ = jax.jit(functools.partial(
      decoding.beam_search, step, max_new_tokens=10, eos_id=EOS, beam_size=2,
      pad_id=PAD))(logits, cache)
  jax.effects_barrier()
  np.testing.assert_array_equal(tokens, [[3, EOS] + [PAD] * 8] * 2)
  assert len(calls) == 1


# ---------------------------------------------------------------- sharding ---


def test_sharded_batch_gives_the_same_tokens():
  """greedy, sample and beam_search under jit on a batch sharded over the 8
  devices: the tokens of the unsharded batch (and the sampled rows end with
  EOS then padding)."""
  devices = jax.devices()
  assert len(devices) == 8
  sharding = NamedSharding(Mesh(devices, ("data",)), P("data"))
  model = Markov(vocab=6, seed=0, eos_bias=1.0)
  last, offset = _prompts(8, 6)
  first_logits, cache = model.prefill(last, offset)

  def shard(x):
    return jax.device_put(x, sharding) if x.ndim else x

  sharded = (shard(first_logits), jax.tree.map(shard, cache))
  key = jax.random.key(4)
  runs = {
      "greedy": functools.partial(decoding.greedy, model.step,
                                  max_new_tokens=6, eos_id=EOS),
      "sample": lambda l, c: decoding.sample(
          model.step, l, c, key, max_new_tokens=6, eos_id=EOS, top_k=4,
          top_p=0.9, temperature=1.5),
      "beam": functools.partial(decoding.beam_search, model.step,
                                max_new_tokens=6, eos_id=EOS, beam_size=3),
  }
  for name, fn in runs.items():
    run = jax.jit(fn)
    expected = run(first_logits, cache)
    got = run(*sharded)
    expected, got = jax.tree.leaves(expected), jax.tree.leaves(got)
    np.testing.assert_array_equal(got[0], expected[0], err_msg=name)
    if name == "beam":  # the scores, up to float rounding
      np.testing.assert_allclose(got[1], expected[1], rtol=1e-6)
    ended = 0
    for row in np.asarray(got[0]):
      if EOS in row:
        assert (row[list(row).index(EOS) + 1:] == PAD).all(), name
        ended += 1
    assert 0 < ended < len(last), name
