"""The continuous-batching engine in isolation, on a tiny random Llama (fast, exact):
preemption keeps state, prefill budget, cancellation, limits, sampling, held-back text."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from llmos.contract.protocol import ErrorCode, KernelError
from llmos.drivers.generation import GenerationEngine, _held_back
from llmos.kernel.sources import _minilm_path

TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}")


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=30522, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, initializer_range=0.5)
    model = LlamaForCausalLM(config).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(_minilm_path()))
    tokenizer.chat_template = TEMPLATE
    return model, tokenizer


def engine(parts, **options) -> GenerationEngine:
    return GenerationEngine(*parts, **options)


def run(eng: GenerationEngine, until_idle: bool = True, steps: int = 10_000) -> list[dict]:
    events = []
    for _ in range(steps):
        if not eng.busy:
            break
        events += eng.step()
    return events


def submit(eng: GenerationEngine, seq_id: int, prompt: str, **request) -> None:
    eng.submit(eng.prepare(seq_id, {"prompt": prompt, "temperature": 0.0, "ignore_eos": True,
                                    "max_tokens": 12, **request}))


def finishes(events: list[dict]) -> dict[int, dict]:
    return {e["id"]: e for e in events if "finish" in e}


def test_preempted_sequence_resumes_with_identical_tokens(parts):
    alone = engine(parts, max_seqs=1)
    submit(alone, 1, "the parcel is late")
    expected = finishes(run(alone))[1]

    eng = engine(parts, max_seqs=1)
    submit(eng, 1, "the parcel is late", priority=5)
    events = run(eng, steps=5)
    assert sum(1 for e in events if e.get("id") == 1 and "tokens" in e) == 5  # prefill + 4
    submit(eng, 2, "urgent question", priority=-5, max_tokens=3)
    events += run(eng)
    done = finishes(events)
    assert {"id": 1, "preempted": True} in events
    order = [e["id"] for e in events if "finish" in e]
    assert order == [2, 1]  # the urgent one finished first
    assert done[1]["text"] == expected["text"]
    assert done[1]["completion_tokens"] == expected["completion_tokens"] == 12
    assert done[1]["preemptions"] == 1


def test_equal_priority_does_not_preempt(parts):
    eng = engine(parts, max_seqs=1)
    submit(eng, 1, "first")
    run(eng, steps=2)
    submit(eng, 2, "second")
    events = run(eng)
    assert not any(e.get("preempted") for e in events)
    assert [e["id"] for e in events if "finish" in e] == [1, 2]


def test_a_prefill_step_sends_first_tokens_before_the_running_rows_decode(parts):
    """An arrival's first token leaves after its prefill pass alone, not after a decode
    pass of the running rows too; then decode and prefill passes alternate."""
    eng = engine(parts)
    submit(eng, 1, "the parcel is late", max_tokens=30)
    run(eng, steps=3)
    submit(eng, 2, "urgent question", max_tokens=30)
    submit(eng, 3, "another one", max_tokens=30)
    first = eng.step()
    assert {e["id"] for e in first} == {2, 3}  # row 1 did not advance in this pass
    assert {e["id"] for e in eng.step()} == {1, 2, 3}  # a decode pass for every row
    submit(eng, 4, "late arrival", max_tokens=30)
    assert {e["id"] for e in eng.step()} == {4}


def test_prefill_budget_admits_long_prompts_over_several_steps(parts):
    eng = engine(parts, max_seqs=8, max_prefill_tokens=12)
    for i in range(3):
        submit(eng, i, "word " * 8, max_tokens=3)  # 10 tokens each with [CLS]/[SEP]
    eng.step()
    assert len(eng.batch.seqs) == 1 and len(eng.waiting) == 2
    done = finishes(run(eng))
    assert sorted(done) == [0, 1, 2]


def test_rows_leave_and_padding_is_trimmed(parts):
    eng = engine(parts, max_seqs=4)
    submit(eng, 1, "a much longer prompt than the other one here", max_tokens=3)
    submit(eng, 2, "short", max_tokens=6)
    eng.step()  # both prefilled together: one token each
    assert eng.batch.mask.shape[0] == 2 and (eng.batch.mask[1] == 0).any()
    eng.step()
    eng.step()  # the long prompt's sequence has its 3 tokens
    assert [s.id for s in eng.batch.seqs] == [2]
    assert bool(eng.batch.mask.all())  # no padding column is left
    assert eng.batch.cache.windows()[0][0].shape[2] == eng.batch.mask.shape[1]


def test_cancel_running_and_waiting(parts):
    eng = engine(parts, max_seqs=1)
    submit(eng, 1, "running one", max_tokens=50)
    submit(eng, 2, "waiting one", max_tokens=50)
    eng.step()
    events = eng.cancel({1, 2})
    assert {e["id"]: e["finish"] for e in events} == {1: "cancelled", 2: "cancelled"}
    assert not eng.busy and eng.batch.mask.numel() == 0


def test_seeded_sampling_repeats_and_seeds_differ(parts):
    texts = []
    for seed in (1, 1, 2):
        eng = engine(parts)
        eng.submit(eng.prepare(1, {"prompt": "hello", "temperature": 1.0, "top_p": 0.9,
                                   "seed": seed, "max_tokens": 10, "ignore_eos": True}))
        texts.append(finishes(run(eng))[1]["text"])
    assert texts[0] == texts[1] != texts[2]


def test_chat_messages_use_the_template(parts):
    eng = engine(parts)
    ids = eng.encode(None, [{"role": "user", "content": "hi"}])
    assert parts[1].decode(ids) == "[ user ] hi [ assistant ]"


@pytest.mark.parametrize("request_, words", [
    ({"prompt": "word " * 120, "max_tokens": 20}, "context"),
    ({"prompt": ""}, "prompt or messages"),
])
def test_requests_the_engine_refuses(parts, request_, words):
    with pytest.raises(KernelError) as info:
        engine(parts).prepare(1, request_)
    assert info.value.code is ErrorCode.BAD_REQUEST and words in info.value.message


def test_text_that_may_start_a_stop_string_is_held_back():
    assert _held_back("the end is near", ("nearly",)) == 4
    assert _held_back("the end is ne", ("near", "nex")) == 2
    assert _held_back("nothing here", ("STOP",)) == 0
    assert _held_back("abc", ()) == 0


def test_a_long_prompt_is_prefilled_in_chunks_while_others_decode(parts):
    long_prompt = " ".join(f"w{i}" for i in range(14))  # 30 tokens with [CLS]/[SEP]
    whole = engine(parts, max_prefill_tokens=64)
    submit(whole, 2, long_prompt, max_tokens=5)
    expected = finishes(run(whole))[2]

    eng = engine(parts, max_prefill_tokens=8)
    submit(eng, 1, "short one", max_tokens=40)
    eng.step()
    submit(eng, 2, long_prompt, max_tokens=5)
    running_tokens = []
    while eng.busy and 2 not in finishes(events := eng.step()):
        running_tokens.append(sum(1 for e in events if e.get("id") == 1 and "tokens" in e))
        if any(e.get("id") == 2 and "tokens" in e for e in events):
            break
    assert len(eng.waiting) == 0
    assert running_tokens[:4] == [1, 0, 1, 0]  # decode and chunk passes alternate
    assert len(running_tokens) >= 4
    rest = run(eng)
    assert finishes(rest)[2]["text"] == expected["text"]


def test_rows_joining_and_leaving_across_cache_growth_match_generate_alone(parts):
    """The preallocated cache grows several times and rows leave and join between steps;
    every sequence still gets exactly transformers' greedy ``generate`` output run alone."""
    model, tokenizer = parts
    requests = {1: ("the parcel is late", 40), 2: ("a refund please for the broken item", 6),
                3: ("hello", 25), 4: ("where can I find my order number today", 30)}
    eng = engine(parts, max_seqs=3)
    submit(eng, 1, requests[1][0], max_tokens=requests[1][1])
    events = run(eng, steps=3)
    for seq_id in (2, 3):
        submit(eng, seq_id, requests[seq_id][0], max_tokens=requests[seq_id][1])
    events += run(eng, steps=10)  # 2 has left, 1 and 3 decode on
    submit(eng, 4, requests[4][0], max_tokens=requests[4][1])  # joins the leftover rows
    events += run(eng)
    done = finishes(events)
    for seq_id, (prompt, tokens) in requests.items():
        inputs = tokenizer(prompt, return_tensors="pt", return_token_type_ids=False)
        out = model.generate(**inputs, max_new_tokens=tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
        want = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        assert done[seq_id]["completion_tokens"] == tokens
        assert done[seq_id]["text"] == want


def generate_alone(parts, prompt: str, tokens: int) -> str:
    model, tokenizer = parts
    inputs = tokenizer(prompt, return_tensors="pt", return_token_type_ids=False)
    out = model.generate(**inputs, max_new_tokens=tokens, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


SYSTEM = ("you are a helpful assistant for the customers of a small shop that sells shoes "
          "and bags online and answers in one short sentence")  # 24 words: two blocks and more


def test_shared_prefixes_are_prefilled_once_and_change_no_token(parts):
    """The second and later prompts reuse the cached blocks of the shared beginning, also
    when prefilled together with prompts that have no cached prefix (mixed padding), and
    every output equals transformers' greedy generate run alone."""
    prompts = {1: f"{SYSTEM} where is my parcel", 2: f"{SYSTEM} can I return a bag",
               3: "an unrelated short prompt", 4: f"{SYSTEM} do you sell hats"}
    eng = engine(parts, max_seqs=4)
    submit(eng, 1, prompts[1], max_tokens=8)
    events = run(eng)
    for seq_id in (2, 3, 4):  # prefilled together in one step
        submit(eng, seq_id, prompts[seq_id], max_tokens=8)
    events += run(eng)
    done = finishes(events)
    assert done[1]["cached_tokens"] == 0 and done[3]["cached_tokens"] == 0
    assert done[2]["cached_tokens"] == done[4]["cached_tokens"] == 16
    assert eng.prefixes.hit_tokens == 32
    for seq_id, prompt in prompts.items():
        assert done[seq_id]["text"] == generate_alone(parts, prompt, 8), seq_id


def test_a_repeated_prompt_reuses_all_but_its_last_token(parts):
    eng = engine(parts)
    prompt = "word " * 30  # 32 tokens with [CLS] and [SEP]: exactly two blocks
    submit(eng, 1, prompt, max_tokens=4)
    first = finishes(run(eng))[1]
    submit(eng, 2, prompt, max_tokens=4)
    second = finishes(run(eng))[2]
    assert second["cached_tokens"] == 16  # the last block holds the token that must run
    assert second["text"] == first["text"]


def test_the_prefix_cache_evicts_least_recent_blocks_and_can_be_off(parts):
    eng = engine(parts, prefix_cache_bytes=1)  # smaller than one block
    submit(eng, 1, f"{SYSTEM} one", max_tokens=2)
    run(eng)
    assert len(eng.prefixes) == 0 and eng.prefixes.nbytes == 0
    off = engine(parts, prefix_cache_bytes=0)
    for seq_id in (1, 2):
        submit(off, seq_id, f"{SYSTEM} two", max_tokens=2)
        assert finishes(run(off))[seq_id]["cached_tokens"] == 0
    assert off.prefixes.looked_up_tokens == 0


# --- faults stay with their sequence (issue 17) -------------------------------------------


def test_cancel_mid_batch_outside_inference_mode_leaves_the_others_running(parts):
    """The host calls cancel between steps, outside inference mode: cutting the batch's
    cache (inference tensors) must work there, and the other rows finish unchanged."""
    alone = engine(parts)
    submit(alone, 2, "the parcel is late")
    expected = finishes(run(alone))[2]["text"]

    eng = engine(parts)
    for seq_id, prompt in enumerate(["my order", "the parcel is late", "refund please"], 1):
        submit(eng, seq_id, prompt)
    events = run(eng, steps=4)
    assert not torch.is_inference_mode_enabled()
    events += eng.cancel({1, 3})
    events += run(eng)
    done = finishes(events)
    assert done[1]["finish"] == done[3]["finish"] == "cancelled"
    assert done[2]["finish"] == "length" and done[2]["text"] == expected


def test_a_failing_sequence_ends_alone(parts, monkeypatch):
    """A fault while detokenizing one sequence ends that sequence with an error event;
    the other sequence in the same batch finishes normally."""
    eng = engine(parts)
    submit(eng, 1, "first request")
    submit(eng, 2, "second request")
    decode = eng.tokenizer.decode
    calls = {"n": 0}

    def flaky(ids, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:  # in the middle of the run, whichever row it is
            raise ValueError("detokenizer broke")
        return decode(ids, **kwargs)

    monkeypatch.setattr(eng.tokenizer, "decode", flaky)
    done = finishes(run(eng))
    reasons = sorted(e["finish"] for e in done.values())
    assert reasons == ["error", "length"]
    failed = next(e for e in done.values() if e["finish"] == "error")
    assert failed["code"] == "INTERNAL" and "detokenizer broke" in failed["message"]


def test_a_failing_forward_pass_ends_its_sequences_and_the_engine_serves_on(parts, monkeypatch):
    eng = engine(parts)
    submit(eng, 1, "first request")
    run(eng, steps=3)
    forward = eng.model.forward

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(eng.model, "forward", broken)
    events = eng.step()
    assert finishes(events)[1]["finish"] == "error"
    assert not eng.busy
    monkeypatch.setattr(eng.model, "forward", forward)
    submit(eng, 2, "a new request")
    assert finishes(run(eng))[2]["finish"] == "length"


def test_resume_continues_after_the_streamed_tokens(parts):
    """A request resumed with the tokens (and characters) an earlier host streamed
    continues exactly where it stopped: the remaining text, and a whole text equal to an
    uninterrupted greedy run's."""
    alone = engine(parts)
    submit(alone, 1, "the parcel is late", max_tokens=12)
    events = run(alone)
    whole = finishes(events)[1]
    tokens = [e["token"] for e in events if e.get("id") == 1 and "token" in e]
    sent = "".join(e["text"] for e in events[:5] if e.get("id") == 1 and "text" in e
                   and "finish" not in e)

    eng = engine(parts)
    submit(eng, 1, "the parcel is late", max_tokens=12,
           resume={"tokens": tokens[:5], "sent": len(sent)})
    resumed = run(eng)
    done = finishes(resumed)[1]
    rest = "".join(e.get("text", "") for e in resumed if "finish" not in e) + done["delta"]
    assert done["text"] == whole["text"]
    assert done["completion_tokens"] == whole["completion_tokens"] == 12
    assert sent + rest == whole["text"]
