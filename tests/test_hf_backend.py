"""The hf backend on tiny random models: cached multi-turn decoding must equal plain full prefill."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model, make_tokenizer

from drift.records import read_trajectories
from drift.rollout import RolloutConfig, run_rollout
from drift.rollout.hf import HFBackend
from drift.rollout.protocol import GenRequest, PromptTooLong, SamplingParams
from drift.tasks import Problem

GREEDY = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=10, seed=0)
SAMPLED = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=10, seed=7)
FEEDBACK = {"role": "user", "content": "Incorrect. Please think again."}


def opening(i: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"What is {i} + {i * 7}?" * (1 + i % 3)}]


def save_model(path, family: str = "chatml", arch: str = "llama", context: int = 2048,
               alphabet: str = "abcdefghijklmnopqrstuvwxyz") -> str:
    """A random model that only ever emits the letters of `alphabet`, spaces and end-of-turn tokens.

    Its text re-tokenizes to the same ids, so kept caches are exact prefixes of the next render.
    The weights are scaled up so that greedy decoding does not collapse to one repeated token.
    """
    tok = make_tokenizer(family)
    model = make_model(tok, arch=arch)
    model.config.tie_word_embeddings = False
    model.config.max_position_embeddings = context
    allowed = tok.convert_tokens_to_ids(list(alphabet) + ["Ġ", tok.eos_token])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        head = torch.zeros_like(model.lm_head.weight)
        head[allowed] = torch.randn(len(allowed), head.shape[1], generator=g) * 3
        model.lm_head.weight = torch.nn.Parameter(head)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("ascii-llama"))


def reference_greedy(backend: HFBackend, messages, max_new: int) -> str:
    """Greedy decoding the plain way: the whole conversation through the model at every token."""
    ids = backend.render(messages)
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(max_new):
            token = int(backend.model(torch.tensor([ids + out])).logits[0, -1].argmax())
            out.append(token)
            if token in backend.stop_ids:
                return backend.tokenizer.decode(out[:-1], skip_special_tokens=True)
    return backend.tokenizer.decode(out, skip_special_tokens=True)


def run_turns(backend: HFBackend, convs: dict[str, list], turns: int, params: SamplingParams, check=None):
    """Generate `turns` turns for every conversation (one sample each), appending the feedback message."""
    texts = {k: [] for k in convs}
    for turn in range(1, turns + 1):
        reqs = [GenRequest([(k, 0)], list(m), turn) for k, m in convs.items()]
        for (k, m), outs in zip(convs.items(), backend.generate(reqs, params)):
            if check:
                check(m, outs[0])
            texts[k].append(outs[0].text)
            m += [{"role": "assistant", "content": outs[0].text}, FEEDBACK]
    return texts


def stream_turns(backend: HFBackend, convs: dict[str, list], turns: int, params: SamplingParams, check=None):
    """`run_turns` through one stream: each conversation's next turn is submitted as soon as its
    answer comes back, while the others are still decoding. Returns (texts, answers per poll)."""
    texts = {k: [] for k in convs}
    stream = backend.stream(params)
    stream.submit([GenRequest([(k, 0)], list(m), 1) for k, m in convs.items()])
    per_poll = []
    while answers := stream.poll():
        per_poll.append(len(answers))
        for (k, _), out in answers:
            if check:
                check(convs[k], out)
            texts[k].append(out.text)
            convs[k] += [{"role": "assistant", "content": out.text}, FEEDBACK]
            if len(texts[k]) < turns:
                stream.submit([GenRequest([(k, 0)], list(convs[k]), len(texts[k]) + 1)])
    return texts, per_poll


@pytest.mark.parametrize("arch,family", [("llama", "chatml"), ("qwen2", "llama3")])
def test_cached_greedy_equals_full_prefill_over_three_turns(tmp_path, arch, family):
    backend = HFBackend(save_model(tmp_path, family, arch), batch_size=2)  # 4 rows in 2 slots: rows join mid-decode

    def check(messages, out):
        assert out.text == reference_greedy(backend, messages, GREEDY.max_new_tokens)

    texts = run_turns(backend, {f"p{i}": opening(i) for i in range(4)}, 3, GREEDY, check)
    assert len({t for ts in texts.values() for t in ts}) > 3  # the model does say different things
    assert backend.reused_tokens > 0


def test_streamed_turns_equal_turn_by_turn_generation(model_dir):
    """A turn submitted into the running stream samples what a generate call per turn samples,
    reuses the same kept caches, and prefills no more."""
    convs = lambda: {f"p{i}": opening(i) for i in range(5)}  # noqa: E731
    by_turn, streamed = HFBackend(model_dir, batch_size=2), HFBackend(model_dir, batch_size=2)
    expected = run_turns(by_turn, convs(), 3, SAMPLED)
    texts, per_poll = stream_turns(streamed, convs(), 3, SAMPLED)
    assert texts == expected and len({t for ts in texts.values() for t in ts}) > 5
    assert sum(per_poll) == 15 and len(per_poll) > 3  # answers come back as they finish, not per turn
    assert streamed.reused_tokens == by_turn.reused_tokens > 0 and streamed.cache_mismatches == 0
    assert streamed.stats == by_turn.stats


def test_streamed_greedy_equals_full_prefill(model_dir):
    backend = HFBackend(model_dir, batch_size=3)  # rows of turns 1-3 share the batch, joining mid-decode

    def check(messages, out):
        assert out.text == reference_greedy(backend, messages, GREEDY.max_new_tokens)

    stream_turns(backend, {f"p{i}": opening(i) for i in range(5)}, 3, GREEDY, check)
    assert backend.reused_tokens > 0


def test_stream_refuses_a_long_history_without_touching_state(tmp_path):
    backend = HFBackend(save_model(tmp_path, context=128))
    msgs = [{"role": "user", "content": "hi"}]
    out = backend.generate([GenRequest([("short", 0)], msgs, 1)], GREEDY)[0][0]
    stream = backend.stream(GREEDY)
    msgs = msgs + [{"role": "assistant", "content": out.text}, FEEDBACK]
    with pytest.raises(PromptTooLong) as e:
        stream.submit([GenRequest([("short", 0)], msgs, 2),
                       GenRequest([("long", 0)], [{"role": "user", "content": "x" * 150}], 1)])
    assert e.value.conv_ids == [("long", 0)] and ("short", 0) in backend._convs  # its kept cache is still there
    stream.submit([GenRequest([("short", 0)], msgs, 2)])
    assert [conv for conv, _ in stream.poll()] == [("short", 0)] and stream.poll() == []
    assert backend.reused_tokens > 0


def test_streamed_rollout_equals_the_turn_by_turn_rollout(tmp_path):
    """float32, per-(prompt, sample, turn) seeds: streaming turns changes which rows share a
    decode step, never what is sampled, reused or counted; the batch is fuller."""
    model_dir = save_model(tmp_path / "model", alphabet="ABCDabcd")  # a lone capital is read as a choice
    probs = [Problem(id=f"q{j}", question=f"What is {j} + {j * 7}?" * (1 + j % 3), answer="ABCD"[j % 4],
                     checker="choice", extract="letter") for j in range(6)]

    def rollout(name: str, stream_turns: bool):
        backend = HFBackend(model_dir, batch_size=4, dtype="float32")
        cfg = RolloutConfig(model=model_dir, output=str(tmp_path / name), n=3, max_turns=4, max_new_tokens=10,
                            temperature=1.0, top_p=0.9, seed=5, batch_size=4, max_live=9, stream_turns=stream_turns,
                            system_prompt="Be brief.")
        manifest = run_rollout(cfg, probs, backend)
        assert not backend._convs  # every finished conversation's cache was released
        trajs = sorted(read_trajectories(tmp_path / name / "trajectories"), key=lambda t: t.key)
        return trajs, manifest, backend

    trajs, manifest, backend = rollout("streamed", True)
    ref_trajs, ref_manifest, ref = rollout("by-turn", False)
    assert [t.to_json() for t in trajs] == [t.to_json() for t in ref_trajs]
    assert {t.success_turn for t in trajs} >= {None, 1} and max(len(t.turns) for t in trajs) == 4
    assert manifest["summary"] == ref_manifest["summary"] and manifest["counts"] == ref_manifest["counts"]
    for key in ("generated_tokens", "prefill_tokens"):
        assert manifest["cost"][key] == ref_manifest["cost"][key] == getattr(backend.stats, key)
    assert backend.reused_tokens == ref.reused_tokens > 0
    assert backend.decode_rows == ref.decode_rows and backend.decode_steps < ref.decode_steps  # fewer, fuller steps


def test_turn_two_prefills_only_the_new_tokens(model_dir):
    backend = HFBackend(model_dir)
    msgs = opening(1)
    first = backend.render(msgs)
    out = backend.generate([GenRequest([("a", 0)], msgs, 1)], GREEDY)[0][0]
    assert backend.stats.prefill_tokens == len(first)
    assert backend.stats.generated_tokens == out.tokens
    msgs = msgs + [{"role": "assistant", "content": out.text}, FEEDBACK]
    second = backend.render(msgs)
    backend.generate([GenRequest([("a", 0)], msgs, 2)], GREEDY)
    # the cache holds the prompt and every generated token but the last, which was never fed
    cached = len(first) + out.tokens - 1
    assert backend.stats.prefill_tokens == len(first) + len(second) - cached
    assert backend.reused_tokens == cached and backend.cache_mismatches == 0


def test_samples_of_a_prompt_share_one_prefill(model_dir):
    backend = HFBackend(model_dir)
    msgs = opening(2)
    outs = backend.generate([GenRequest([("a", j) for j in range(6)], msgs, 1)], SAMPLED)[0]
    assert backend.stats.prefill_tokens == len(backend.render(msgs))
    assert len(outs) == 6 and len({o.text for o in outs}) > 1


def test_sampling_does_not_depend_on_the_batch(model_dir):
    alone = HFBackend(model_dir, batch_size=1)
    crowd = HFBackend(model_dir, batch_size=5)
    ref = alone.generate([GenRequest([("a", 3)], opening(1), 1)], SAMPLED)[0][0]
    reqs = [GenRequest([("x", j) for j in range(3)], opening(5), 1), GenRequest([("a", 3)], opening(1), 1),
            GenRequest([("y", 0)], opening(2), 1)]
    got = crowd.generate(reqs, SAMPLED)[1][0]
    assert got == ref
    other_turn = alone.generate([GenRequest([("a", 3)], opening(1), 2)], SAMPLED)[0][0]
    other_seed = alone.generate([GenRequest([("a", 3)], opening(1), 1)], SamplingParams(1.0, 0.9, 10, 8))[0][0]
    assert ref.text != other_turn.text or ref.text != other_seed.text


def test_multi_turn_sampling_is_reproducible(model_dir):
    convs = lambda: {f"p{i}": opening(i) for i in range(3)}  # noqa: E731
    a = run_turns(HFBackend(model_dir, batch_size=2), convs(), 3, SAMPLED)
    b = run_turns(HFBackend(model_dir, batch_size=3, max_cache_conversations=1), convs(), 3, SAMPLED)
    assert a == b


def test_length_and_stop(model_dir):
    backend = HFBackend(model_dir)
    short = SamplingParams(0.0, 1.0, 3, 0)
    out = backend.generate([GenRequest([("a", 0)], opening(1), 1)], short)[0][0]
    assert (out.tokens, out.finish_reason) == (3, "length") and len(out.text) == 3
    third = backend.tokenizer.encode(out.text, add_special_tokens=False)[2]
    backend.stop_ids = {third}  # pretend the third token ends the turn
    out = backend.generate([GenRequest([("b", 0)], opening(1), 1)], GREEDY)[0][0]
    assert (out.tokens, out.finish_reason, len(out.text)) == (3, "stop", 2)


def test_release_and_eviction_drop_caches(model_dir):
    backend = HFBackend(model_dir, max_cache_conversations=2)
    backend.generate([GenRequest([(f"p{i}", 0)], opening(i), 1) for i in range(3)], GREEDY)
    assert len(backend._convs) == 2 and backend.cache_evictions == 1
    backend.release(list(backend._convs))
    assert not backend._convs
    msgs = opening(0) + [{"role": "assistant", "content": "abc"}, FEEDBACK]
    before = backend.stats.prefill_tokens
    backend.generate([GenRequest([("p0", 0)], msgs, 2)], GREEDY)
    assert backend.stats.prefill_tokens - before == len(backend.render(msgs))  # nothing left to reuse


def test_rewritten_history_reuses_only_the_common_prefix(model_dir):
    backend = HFBackend(model_dir)
    msgs = opening(3)
    out = backend.generate([GenRequest([("a", 0)], msgs, 1)], GREEDY)[0][0]
    msgs = msgs + [{"role": "assistant", "content": "zz" + out.text}, FEEDBACK]  # not what was generated
    again = backend.generate([GenRequest([("a", 0)], msgs, 2)], GREEDY)[0][0]
    assert backend.cache_mismatches == 1
    assert again.text == reference_greedy(backend, msgs, GREEDY.max_new_tokens)


def test_history_longer_than_the_context_is_refused(tmp_path):
    backend = HFBackend(save_model(tmp_path, context=64))
    reqs = [GenRequest([("short", 0)], [{"role": "user", "content": "hi"}], 1),
            GenRequest([("long", 0), ("long", 1)], [{"role": "user", "content": "x" * 80}], 1)]
    with pytest.raises(PromptTooLong) as e:
        backend.generate(reqs, GREEDY)
    assert e.value.conv_ids == [("long", 0), ("long", 1)]
    backend.stop_ids = set()  # never stop by itself
    out = backend.generate(reqs[:1], SamplingParams(0.0, 1.0, 200, 0))[0][0]
    assert out.finish_reason == "length" and len(backend.render(reqs[0].messages)) + out.tokens == 64


def sample_many(logits: torch.Tensor, params: SamplingParams, seeds, counts=None) -> torch.Tensor:
    """One draw per seed from the same logits [V] (a batch of len(seeds) rows)."""
    from drift.rollout.sampling import sample_tokens

    seeds = torch.as_tensor(seeds)
    counts = torch.zeros_like(seeds) if counts is None else torch.as_tensor(counts)
    return sample_tokens(logits.expand(len(seeds), -1), params, seeds, counts)


def chi_square(draws: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * len(draws)
    observed = torch.bincount(draws, minlength=len(probs)).double()
    return float(((observed - expected) ** 2 / expected).sum())


def test_sampler_draws_the_softmax_across_blocks():
    # 700 entries = 3 blocks of 256 (the last padded); mass spread over entries of every block
    probs = torch.full((700,), 0.2 / 694, dtype=torch.float64)
    probs[[0, 1, 255, 256, 300, 699]] = torch.tensor([0.3, 0.1, 0.15, 0.05, 0.12, 0.08], dtype=torch.float64)
    draws = sample_many((probs.log() * 2).float(), SamplingParams(2.0, 1.0, 1, 0), torch.arange(40_000))
    lumped = torch.where(torch.isin(draws, torch.tensor([0, 1, 255, 256, 300, 699])), draws, 2)  # the rest -> 2
    cats = torch.tensor([0, 1, 2, 255, 256, 300, 699])
    p = torch.tensor([0.3, 0.1, 0.2, 0.15, 0.05, 0.12, 0.08], dtype=torch.float64)
    # 6 degrees of freedom: chi-square above 27.9 has probability 1e-4 under the softmax
    assert chi_square(torch.bucketize(lumped, cats), p) < 27.9


def test_sampler_draws_are_independent_across_tokens_and_seeds():
    seeds = torch.arange(20_000) * 7919 + (1 << 40)  # seeds using both 32-bit halves
    first = sample_many(torch.zeros(4), SamplingParams(1.0, 1.0, 1, 0), seeds, torch.zeros_like(seeds))
    second = sample_many(torch.zeros(4), SamplingParams(1.0, 1.0, 1, 0), seeds, torch.ones_like(seeds))
    # pairs (token 1, token 2) of a row uniform over 16 cells; 15 degrees of freedom, p = 1e-4 at 42.6
    assert chi_square(first * 4 + second, torch.full((16,), 1 / 16, dtype=torch.float64)) < 42.6
    neighbours = sample_many(torch.zeros(4), SamplingParams(1.0, 1.0, 1, 0), seeds + 1)
    assert chi_square(first * 4 + neighbours, torch.full((16,), 1 / 16, dtype=torch.float64)) < 42.6


def test_sampler_row_does_not_depend_on_the_batch():
    from drift.rollout.sampling import gumbel

    seeds, counts = torch.tensor([5, 2**62 + 3, 17]), torch.tensor([0, 9, 4])
    batch = gumbel(seeds, counts, 300)
    for b in range(3):
        assert torch.equal(gumbel(seeds[b : b + 1], counts[b : b + 1], 300)[0], batch[b])
    assert not torch.equal(batch[0], gumbel(torch.tensor([6]), torch.tensor([0]), 300)[0])
    logits = torch.randn(3, 1000, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(1.0, 1.0, 1, 0)
    from drift.rollout.sampling import sample_tokens

    together = sample_tokens(logits, params, seeds, counts)
    alone = [int(sample_tokens(logits[b : b + 1], params, seeds[b : b + 1], counts[b : b + 1])) for b in range(3)]
    assert together.tolist() == alone


def test_hash_is_32_bit_arithmetic_without_overflow():
    from drift.rollout.sampling import mix32, mul32

    def lowbias32(x: int) -> int:  # the reference, in Python's unbounded integers
        x ^= x >> 16
        x = x * 0x7FEB352D % 2**32
        x ^= x >> 15
        x = x * 0x846CA68B % 2**32
        return x ^ (x >> 16)

    xs = [0, 1, 12345, 2**31 - 1, 2**31, 2**32 - 1]
    assert mul32(torch.tensor(xs), 0x846CA68B).tolist() == [x * 0x846CA68B % 2**32 for x in xs]
    assert mix32(torch.tensor(xs)).tolist() == [lowbias32(x) for x in xs]


def test_sampler_follows_top_p_and_greedy():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    nucleus = set(sample_many(logits, SamplingParams(1.0, 0.7, 1, 0), torch.arange(300)).tolist())
    assert nucleus == {0, 1}  # 0.5 + 0.3 covers 0.7; the rest is cut
    assert sample_many(logits, SamplingParams(0.0, 1.0, 1, 0), torch.arange(3)).tolist() == [0, 0, 0]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_backend_runs_in_either_dtype(model_dir, dtype):
    backend = HFBackend(model_dir, dtype=dtype)
    assert backend.hardware == {"device": "cpu", "dtype": dtype}
    assert next(backend.model.parameters()).dtype == getattr(torch, dtype)
    outs = backend.generate([GenRequest([("a", j) for j in range(3)], opening(1), 1)], SAMPLED)[0]
    assert all(o.tokens >= 1 for o in outs) and backend.stats.generated_tokens == sum(o.tokens for o in outs)


def test_packed_weights_generate_what_plain_ones_do(model_dir, monkeypatch):
    from drift import hardware
    from drift.models import load_model_and_tokenizer
    from drift.rollout.packed import PackedLinear

    cpuinfo = hardware.CPUINFO.read_text() if hardware.CPUINFO.is_file() else ""
    if not hardware.cpu_flags(cpuinfo) & set(hardware.CPU_BF16_FLAGS):
        pytest.skip("this CPU has no bf16 units: a bf16 backend keeps plain weights there")
    monkeypatch.setattr(hardware, "_read_cpuinfo", lambda: cpuinfo)  # the real CPU, not the suite's fp32 one
    model, tok = load_model_and_tokenizer(model_dir, dtype="bfloat16", device="cpu")
    plain = HFBackend.from_model(model, tok, batch_size=3)  # a model handed in is never packed (it may train)
    packed = HFBackend(model_dir, dtype="bfloat16", batch_size=3)
    assert not any(isinstance(m, PackedLinear) for m in plain.model.modules())
    assert sum(isinstance(m, PackedLinear) for m in packed.model.modules()) == 2 * 7 + 1  # 2 layers, lm_head
    copy, _ = load_model_and_tokenizer(model_dir, dtype="bfloat16", device="cpu")
    handed = HFBackend.from_model(copy, tok, batch_size=3, pack=True)  # the online arm's own sampling copy
    assert sum(isinstance(m, PackedLinear) for m in handed.model.modules()) == 2 * 7 + 1
    convs = lambda: {f"p{i}": opening(i) for i in range(4)}  # noqa: E731
    assert run_turns(packed, convs(), 3, SAMPLED) == run_turns(plain, convs(), 3, SAMPLED)
    assert run_turns(handed, convs(), 3, SAMPLED) == run_turns(plain, convs(), 3, SAMPLED)
