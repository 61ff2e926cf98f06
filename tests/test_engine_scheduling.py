"""Engine invariances and request semantics on a tiny random Llama (fp32, CPU).

Caching, chunking, preemption and batching are optimizations: greedy tokens must not change, and
every block must be free again when all requests finish.
"""
from __future__ import annotations

import random

import pytest

from engine import LLM, SamplingParams
from engine.block_manager import BlockManager
from engine.sequence import Sequence

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(0)
    shared = [rng.randrange(3, 49152) for _ in range(21)]  # a common prefix spanning several blocks
    out = [shared + [rng.randrange(3, 49152) for _ in range(rng.randint(1, 12))] for _ in range(6)]
    out += [[rng.randrange(3, 49152) for _ in range(rng.randint(2, 30))] for _ in range(6)]
    return out


def make(path: str, **options) -> LLM:
    defaults = dict(dtype="fp32", block_size=4, num_blocks=512, enable_prefix_caching=False, enable_chunked_prefill=False)
    return LLM(path, **{**defaults, **options})


def tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def assert_no_leaks(llm: LLM) -> None:
    bm = llm.engine.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)


@pytest.fixture(scope="module")
def reference(tiny_llama_dir, prompts) -> list[list[int]]:
    llm = make(tiny_llama_dir, decode_steps=1)  # one token per engine step: the plain path
    return tokens(llm.generate(prompts, GREEDY))


def test_multi_step_decode_changes_nothing(tiny_llama_dir, prompts, reference):
    """engine.decode_steps runs several greedy steps per engine step; every stop condition still cuts
    at the same token, the K/V it wrote past a stop never reaches the prefix cache, and no block leaks."""
    llm = make(tiny_llama_dir, decode_steps=5, enable_prefix_caching=True, max_model_len=48)
    single = make(tiny_llama_dir, decode_steps=1, enable_prefix_caching=True, max_model_len=48)
    assert tokens(make(tiny_llama_dir, decode_steps=5).generate(prompts, GREEDY)) == reference
    assert tokens(llm.generate(prompts, GREEDY)) == tokens(single.generate(prompts, GREEDY))  # some cut at max_model_len
    steps = []
    llm.engine.runner.decode_steps = (lambda seqs, k, next_steps=0, run=llm.engine.runner.decode_steps:
                                       steps.append(k) or run(seqs, k, next_steps=next_steps))
    free = tokens(single.generate(prompts[:4], SamplingParams(temperature=0.0, max_tokens=13, ignore_eos=True)))
    stops = [t[6] for t in free]  # stop tokens that land inside a multi-step run
    cases = [
        [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (1, 2, 7, 13)],  # lengths across runs
        [SamplingParams(temperature=0.0, max_tokens=13, stop_token_ids=[s]) for s in stops],
        [SamplingParams(temperature=0.0, max_tokens=13, min_tokens=9, stop_token_ids=[s]) for s in stops],
        [SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)] * 4,  # some hit max_model_len=48
        # one sampled request in the batch: ordinary steps until it finishes, multi-step after
        [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)] * 3 + [SamplingParams(temperature=1.0, max_tokens=3, seed=1)],
    ]
    for params in cases:
        for _ in range(2):  # the second pass starts from prefixes the first one cached
            got, want = llm.generate(prompts[:4], params), single.generate(prompts[:4], params)
            assert [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in got] == \
                   [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in want]
    assert max(steps) == 5 and min(steps) < 5  # runs were cut short by max_tokens / max_model_len
    assert llm.stats()["prefix_hits"] > 0
    assert_no_leaks(llm)


def test_prefix_caching_changes_nothing_and_hits(tiny_llama_dir, prompts, reference):
    llm = make(tiny_llama_dir, enable_prefix_caching=True)
    first = tokens(llm.generate(prompts, GREEDY))
    second = tokens(llm.generate(prompts, GREEDY))  # every full prompt block is cached by now
    assert first == reference and second == reference
    stats = llm.stats()
    assert stats["prefix_hits"] > 0.5 * sum(len(p) for p in prompts)
    assert_no_leaks(llm)


def test_chunked_prefill_changes_nothing(tiny_llama_dir, prompts, reference):
    llm = make(tiny_llama_dir, enable_chunked_prefill=True, max_num_batched_tokens=7)
    assert tokens(llm.generate(prompts, GREEDY)) == reference
    assert_no_leaks(llm)


def test_preemption_changes_nothing(tiny_llama_dir, prompts, reference):
    # 30 blocks of 4 tokens cannot hold 12 sequences of up to ~57 tokens: the scheduler must preempt
    llm = make(tiny_llama_dir, num_blocks=30, enable_prefix_caching=True, enable_chunked_prefill=True, max_num_batched_tokens=16)
    assert tokens(llm.generate(prompts, GREEDY)) == reference
    assert llm.stats()["preemptions"] > 0
    assert_no_leaks(llm)


def test_batched_equals_alone(tiny_llama_dir, prompts, reference):
    llm = make(tiny_llama_dir)
    alone = [tokens(llm.generate([p], GREEDY))[0] for p in prompts[:4]]
    assert alone == reference[:4]


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny_llama_dir, prompts):
    llm = make(tiny_llama_dir, enable_prefix_caching=True)
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=16, seed=1234, ignore_eos=True)
    alone = tokens(llm.generate([prompts[0]], params))[0]
    batched = tokens(llm.generate(prompts[:5], params))[0]
    other_seed = tokens(llm.generate([prompts[0]], SamplingParams(temperature=1.0, max_tokens=16, seed=99, ignore_eos=True)))[0]
    assert alone == batched
    assert alone != other_seed
    assert_no_leaks(llm)


def test_n_completions_share_prompt_blocks(tiny_llama_dir, prompts):
    llm = make(tiny_llama_dir)
    out = llm.generate([prompts[0]], SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=5, ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 8 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # different seeds per completion
    single = llm.generate([prompts[0]], SamplingParams(temperature=1.0, max_tokens=8, seed=5, ignore_eos=True))[0]
    assert out.outputs[0].token_ids == single.outputs[0].token_ids
    assert_no_leaks(llm)


def test_fork_shares_blocks_by_reference():
    bm = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=False)
    params = SamplingParams()
    parent = Sequence("r", 0, list(range(10)), params, None, 4)
    child = Sequence("r", 1, list(range(10)), params, None, 4)
    bm.allocate(parent, 10)
    parent.num_computed_tokens = 10
    bm.fork(parent, child)
    assert child.block_table == parent.block_table[:2] and child.num_computed_tokens == 8
    assert [bm.blocks[b].ref_count for b in parent.block_table] == [2, 2, 1]
    bm.free(parent)
    bm.free(child)
    assert bm.num_free_blocks == 16


def test_stop_strings_tokens_and_lengths(tiny_llama_dir, prompts):
    llm = make(tiny_llama_dir)
    free = llm.generate([prompts[1]], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0].outputs[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 12
    stop_token = free.token_ids[5]
    by_token = llm.generate([prompts[1]], SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[stop_token]))[0].outputs[0]
    assert by_token.token_ids == free.token_ids[:free.token_ids.index(stop_token) + 1]
    assert (by_token.finish_reason, by_token.stop_reason) == ("stop", stop_token)
    stop_text = free.text[len(free.text) // 2:][:3]
    by_text = llm.generate([prompts[1]], SamplingParams(temperature=0.0, max_tokens=12, stop=[stop_text]))[0].outputs[0]
    assert by_text.finish_reason == "stop" and by_text.stop_reason == stop_text
    assert by_text.text == free.text[:free.text.find(stop_text)]
    # min_tokens masks the stop token until enough tokens exist
    late = llm.generate([prompts[1]], SamplingParams(temperature=0.0, max_tokens=12, min_tokens=12, stop_token_ids=[stop_token]))[0]
    assert len(late.outputs[0].token_ids) == 12 and stop_token not in late.outputs[0].token_ids
    assert_no_leaks(llm)


def test_logprobs_report_chosen_and_top_tokens(tiny_llama_dir, prompts):
    llm = make(tiny_llama_dir)
    out = llm.generate([prompts[2]], SamplingParams(temperature=0.0, max_tokens=5, logprobs=3, prompt_logprobs=2, ignore_eos=True))[0]
    completion = out.outputs[0]
    assert len(completion.logprobs) == 5
    for token, entry in zip(completion.token_ids, completion.logprobs):
        assert token in entry and len(entry) <= 4
        assert entry[token] == max(entry.values())  # greedy picks the most likely token
    assert completion.cumulative_logprob == pytest.approx(sum(e[t] for t, e in zip(completion.token_ids, completion.logprobs)))
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompts[2])
    for token, entry in zip(prompts[2][1:], out.prompt_logprobs[1:]):
        assert token in entry and all(v <= 0 for v in entry.values())


def test_streaming_yields_growing_outputs(tiny_llama_dir, prompts):
    llm = make(tiny_llama_dir, decode_steps=1)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    seen = [out.outputs[0].token_ids for out in llm.stream([prompts[3]], params)]
    assert [len(s) for s in seen] == [1, 2, 3, 4, 5, 6]
    assert seen[-1] == tokens(llm.generate([prompts[3]], params))[0]
    # multi-step decoding streams each engine step's tokens together: the prefill's token, then the other five
    chunked = [out.outputs[0].token_ids for out in make(tiny_llama_dir, decode_steps=8).stream([prompts[3]], params)]
    assert chunked == [seen[0], seen[-1]]
    stream = llm.stream([prompts[3]], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    next(stream)
    stream.close()  # a client that goes away: its request is aborted and its blocks freed
    assert_no_leaks(llm)
    assert len(tokens(llm.generate([prompts[3]], GREEDY))[0]) == GREEDY.max_tokens


def test_bad_requests_error_without_failing_the_batch(tiny_llama_dir, prompts):
    llm = make(tiny_llama_dir, max_model_len=64)
    outs = llm.generate([prompts[0], [], list(range(3, 100)), [10**9], prompts[1]], GREEDY)
    assert [o.error is None for o in outs] == [True, False, False, False, True]
    assert "empty" in outs[1].error and "max_model_len=64" in outs[2].error and "vocabulary" in outs[3].error
    assert tokens([outs[0], outs[4]]) == tokens(llm.generate([prompts[0], prompts[1]], GREEDY))
    for bad in (dict(temperature=-1), dict(top_p=0.0), dict(max_tokens=0), dict(n=0), dict(min_p=2.0)):
        with pytest.raises(ValueError, match="SamplingParams"):
            SamplingParams(**bad)
    # generation stops at the context limit instead of overrunning it
    long = llm.generate([list(range(3, 60))], SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True))[0].outputs[0]
    assert long.finish_reason == "length" and len(long.token_ids) == 64 - 57
    assert_no_leaks(llm)
