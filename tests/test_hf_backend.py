"""The hf backend on tiny random models: cached multi-turn decoding must equal plain full prefill."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model, make_tokenizer

from drift.rollout.hf import HFBackend
from drift.rollout.protocol import GenRequest, PromptTooLong, SamplingParams

GREEDY = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=10, seed=0)
SAMPLED = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=10, seed=7)
FEEDBACK = {"role": "user", "content": "Incorrect. Please think again."}


def opening(i: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"What is {i} + {i * 7}?" * (1 + i % 3)}]


def save_model(path, family: str = "chatml", arch: str = "llama", context: int = 2048) -> str:
    """A random model that only ever emits lower-case letters, spaces and end-of-turn tokens.

    Its text re-tokenizes to the same ids, so kept caches are exact prefixes of the next render.
    The weights are scaled up so that greedy decoding does not collapse to one repeated token.
    """
    tok = make_tokenizer(family)
    model = make_model(tok, arch=arch)
    model.config.tie_word_embeddings = False
    model.config.max_position_embeddings = context
    allowed = tok.convert_tokens_to_ids(list("abcdefghijklmnopqrstuvwxyz") + ["Ġ", tok.eos_token])
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


@pytest.mark.parametrize("arch,family", [("llama", "chatml"), ("qwen2", "llama3")])
def test_cached_greedy_equals_full_prefill_over_three_turns(tmp_path, arch, family):
    backend = HFBackend(save_model(tmp_path, family, arch), batch_size=2)  # 4 rows in 2 slots: rows join mid-decode

    def check(messages, out):
        assert out.text == reference_greedy(backend, messages, GREEDY.max_new_tokens)

    texts = run_turns(backend, {f"p{i}": opening(i) for i in range(4)}, 3, GREEDY, check)
    assert len({t for ts in texts.values() for t in ts}) > 3  # the model does say different things
    assert backend.reused_tokens > 0


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


def test_sampler_follows_temperature_and_top_p():
    from drift.rollout.hf import _sample

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = [_sample(logits, SamplingParams(1.0, 1.0, 1, 0), [torch.Generator().manual_seed(s)])[0] for s in range(4000)]
    freq = torch.bincount(torch.tensor(draws), minlength=4).float() / len(draws)
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)
    nucleus = {_sample(logits, SamplingParams(1.0, 0.7, 1, 0), [torch.Generator().manual_seed(s)])[0] for s in range(300)}
    assert nucleus == {0, 1}  # 0.5 + 0.3 covers 0.7; the rest is cut
    assert _sample(logits, SamplingParams(0.0, 1.0, 1, 0), [torch.Generator()]) == [0]
