"""ExecuTorch program: one .pte, target and drafter methods sharing the caches and the
embedding table, metadata methods for ExecuTorch's LLM runners; the ExecuTorch backend of
the shared loops; ExecuTorch's own TextLLMRunner on the same program."""

from __future__ import annotations

import pytest
import torch

from export.checkpoint import load_pair
from export.config import FULL, SLIDING, TargetSpec
from export.executorch_export import write_executorch
from export.modules import CacheLayout, DrafterStep, EmbedStep, TargetStep
from tests.conftest import PROMPTS

MAX_CONTEXT, MAX_DRAFT = 256, 4
# tokens per target call (get_max_seq_len): below the 150-token prompt, so every runner here
# (the Python backend, TextLLMRunner, the native runner) prefills it in chunks
MAX_CHUNK = 64
NEW_TOKENS = 64  # 150-token prompt + 64: past two 64-token windows, inside MAX_CONTEXT
# The program's methods: the runner contract's forward, the target and drafter steps, and the
# drafting rounds of 1 and MAX_DRAFT drafts. Rounds of 2..MAX_DRAFT-1 drafts are left out: both
# runners serve a round of k from the shortest round method of at least k drafts (its first
# k drafts), so k = 2, 3 below run that path; the rounds are one module (`_DraftRound`) at
# every length, and each lowers in ~15 s per draft on this machine (`make export` builds them all).
METHODS = ("forward", "target_step", "draft_step", "draft_k1", f"draft_k{MAX_DRAFT}")


@pytest.fixture(scope="module")
def pair(demo_dirs):
    return load_pair(*demo_dirs)


@pytest.fixture(scope="module")
def prompt(demo_dirs):
    from runtime.generate import load_tokenizer

    ids = load_tokenizer(demo_dirs[0]).encode((PROMPTS / "heldout_config.py").read_text()).ids
    return ids[:150]  # > two 64-token windows, inside MAX_CONTEXT


@pytest.fixture(scope="module")
def artifacts(pair, demo_dirs, tmp_path_factory):
    from export.onnx_export import copy_tokenizer

    out = tmp_path_factory.mktemp("pte")
    info = write_executorch(*pair, out, MAX_CONTEXT, MAX_DRAFT, methods=METHODS, max_chunk=MAX_CHUNK)
    copy_tokenizer(demo_dirs[0], out)
    return out, info


@pytest.fixture(scope="module")
def program(artifacts):
    from executorch.runtime import Runtime

    out, info = artifacts
    return Runtime.get().load_program(str(out / "pair.pte")), info


@pytest.fixture(scope="module")
def reference_greedy(pair, prompt):
    from runtime.reference import ReferencePair

    tokens, _ = ReferencePair(*pair).generate(prompt, NEW_TOKENS, 0, stop_at_eos=False)
    return tokens


def test_methods_metadata_and_delegation(program, pair):
    prog, info = program
    rounds = {"draft_k1", f"draft_k{MAX_DRAFT}"}
    assert {"forward", "target_step", "draft_step", "reset_caches", "shared_kv", *rounds} <= set(prog.method_names)
    assert not {"draft_k2", "draft_k3"} & set(prog.method_names)  # served from draft_k4 (see METHODS)
    meta = {name: prog.load_method(name).execute([])[0] for name in info["metadata"]}
    assert meta["get_max_seq_len"] == MAX_CHUNK and meta["get_max_context_len"] == MAX_CONTEXT and meta["get_vocab_size"] == 2048
    assert meta["get_n_layers"] == 12 and meta["get_num_kv_shared_layers"] == 6
    assert meta["use_kv_cache"] and meta["enable_dynamic_shape"]
    for name in ("forward", "target_step", "draft_step", *sorted(rounds)):
        d = info["delegation"][name]
        # every linear and attention matmul inside XNNPACK, and most operators overall
        assert d["matmuls_outside"] == [], (name, d["matmuls_outside"])
        # measured 85-92% per method (README); a graph form XNNPACK rejects (a symbolic
        # reshape split the target into 178 delegate calls once) drops well below this
        assert d["delegated_share"] >= 0.84, (name, d)
        # masks and ring-cache writes are float arithmetic inside the delegate: as a compare
        # and a `where` on portable kernels they took 2.3 ms of an 8.5 ms 80-token call
        assert not [op for op in d["outside_by_operator"] if "where" in op], (name, d["outside_by_operator"])


def test_target_chunks_and_shared_drafter_state_match_eager(program, pair, prompt):
    """A chunked prefill matches transformers (logits and hidden states of the rows asked for,
    each chunk's last ones: the KV-shared layers compute only those); `forward` returns the
    last position's logits only; the drafter method then reads the caches the target method
    wrote (shared mutable buffers) and matches the eager modules."""
    prog, _ = program
    target, drafter = pair
    step = prog.load_method("target_step")
    ids = torch.tensor([prompt])
    n = len(prompt)
    with torch.no_grad():
        ref = target(ids, output_hidden_states=True)
    rows = MAX_DRAFT + 1  # the most logit rows a call returns
    bounds = [*range(0, n, MAX_CHUNK), n]  # calls of at most MAX_CHUNK tokens
    outs = [
        step.execute([ids[:, a:b], torch.tensor([a]), torch.arange(b - a - rows, b - a)])
        for a, b in zip(bounds, bounds[1:])
    ]
    second = outs[-1]
    logits = torch.cat([o[0][0] for o in outs])
    hidden = torch.cat([o[1][0] for o in outs])
    asked = [i for b in bounds[1:] for i in range(b - rows, b)]
    expected = ref.logits[0][asked]

    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()

    # fp32 XNNPACK with the tanh-GELU spelled out: relative 1e-4 as for onnxruntime (measured
    # 8e-7 on the demo pair; with the native GELU XNNPACK is ~1e-2 off).
    assert logits.shape[0] == (len(bounds) - 1) * rows and rel(logits, expected) < 1e-4
    assert hidden.shape[0] == logits.shape[0]
    assert rel(hidden, ref.hidden_states[-1][0][asked]) < 1e-4

    layout = CacheLayout(TargetSpec.from_hf(target.config).attention, MAX_CONTEXT, MAX_DRAFT)
    embed, tstep, dstep = EmbedStep(target), TargetStep(target, layout), DrafterStep(drafter, layout)
    caches = [torch.zeros(layout.shape(i)) for i in layout.owners for _ in range(2)]
    with torch.no_grad():
        e, ple = embed(ids)
        _, hidden, *caches = tstep(e, ple, torch.arange(len(prompt))[None], torch.tensor([len(prompt) - 1]), *caches)
        token = torch.tensor([[7]])
        p = layout.attention.kv_producers()
        shared = [caches[2 * p[FULL]], caches[2 * p[FULL] + 1], caches[2 * p[SLIDING]], caches[2 * p[SLIDING] + 1]]
        state = hidden[:, -1:]
        ref_logits, ref_state = dstep(torch.cat([embed(token)[0], state], -1), torch.tensor([[len(prompt)]]), *shared)
    logits, new_state = prog.load_method("draft_step").execute([token, second[1][:, -1:], torch.tensor([len(prompt)])])
    # the runner contract's forward: [1, 1, V], the last position (a fresh sequence, prefilled
    # in chunks of get_max_seq_len as ExecuTorch's runners do); a longer call is refused
    prog.load_method("reset_caches").execute([])
    forward = prog.load_method("forward")
    (max_seq_len,) = prog.load_method("get_max_seq_len").execute([])
    assert max_seq_len == MAX_CHUNK
    for a, b in zip(bounds, bounds[1:]):
        (last,) = forward.execute([ids[:, a:b], torch.tensor([a])])
    assert last.shape == (1, 1, ref.logits.shape[-1]) and rel(last[0, 0], ref.logits[0, -1]) < 1e-4
    with pytest.raises(Exception):
        forward.execute([ids[:, : MAX_CHUNK + 1], torch.tensor([0])])
    # candidates only: both fill the rest with the same constant
    cand = ref_logits > -1e29
    assert torch.equal(cand, logits > -1e29)
    assert ((logits[cand] - ref_logits[cand]).abs().max() / ref_logits[cand].abs().max()).item() < 1e-4
    assert ((new_state - ref_state).abs().max() / ref_state.abs().max()).item() < 1e-4


def test_drafting_round_equals_single_steps(artifacts, prompt):
    """draft_k{k} (k drafter steps with the argmax inside, one call) gives the drafts of k
    draft_step calls with an argmax after each, reading the same shared caches (k = 2, 3:
    the first drafts of draft_k4)."""
    from runtime.executorch_backend import ExecuTorchBackend
    from runtime.loop import teacher_forced

    backend = ExecuTorchBackend(artifacts[0])
    _, hidden = teacher_forced(backend, prompt)  # every position's hidden state
    for pos in (70, len(prompt)):
        token = prompt[pos] if pos < len(prompt) else 99
        chain, t, s = [], token, hidden[pos - 1]
        for _ in range(MAX_DRAFT):
            logits, s = backend.draft(t, s, pos)
            t = int(logits.argmax())
            chain.append(t)
        for k in range(1, MAX_DRAFT + 1):
            assert backend.draft_tokens(token, hidden[pos - 1], pos, k) == chain[:k], (pos, k)


def test_backend_greedy_and_speculative_tokens_match_reference(artifacts, prompt, reference_greedy):
    """The ExecuTorch backend in the shared loops: greedy and speculative (k = 1..4) tokens
    equal transformers' greedy tokens; scripted, partly wrong drafts force rollbacks."""
    from runtime.executorch_backend import ExecuTorchBackend
    from runtime.loop import greedy_generate, speculative_generate
    from runtime.parity import rollback_check

    backend = ExecuTorchBackend(artifacts[0])
    assert backend.prefill_chunk == MAX_CHUNK  # the program's bound, below the default 256
    assert greedy_generate(backend, prompt, NEW_TOKENS)[0] == reference_greedy
    for k in (1, 2, 3, 4):
        tokens, stats, timer = speculative_generate(backend, prompt, NEW_TOKENS, k)
        assert tokens == reference_greedy, k
        assert stats.accepted > 0 and f"draft_round{k}" in timer.mean_ms()  # the one-call path
    ok, outcomes = rollback_check(backend, prompt, reference_greedy, 4)
    assert ok, outcomes  # tokens equal, rounds with none, some and all drafts accepted


def test_text_llm_runner_reproduces_reference_greedy(artifacts, demo_dirs, prompt, reference_greedy):
    """ExecuTorch's own runner (the one its Android and iOS apps wrap), given the program and
    tokenizer.json, generates the reference's greedy continuation."""
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    from runtime.generate import load_tokenizer

    tok = load_tokenizer(demo_dirs[0])
    text = tok.decode(prompt)
    # the runner re-tokenises the text and adds the BOS itself (num_bos=1, get_bos_id)
    assert tok.encode(text).ids == prompt and prompt[0] == tok.token_to_id("<bos>")
    out, info = artifacts
    pieces: list[str] = []
    runner = TextLLMRunner(str(out / "pair.pte"), str(out / "tokenizer.json"))
    config = GenerationConfig(echo=False, max_new_tokens=NEW_TOKENS, temperature=0.0, seq_len=MAX_CONTEXT, num_bos=1)
    runner.generate(text, config, token_callback=pieces.append)
    expected = tok.decode(reference_greedy)
    assert "".join(pieces) == expected


def test_native_runner_tokens_equal_transformers_greedy(native_cli, artifacts, prompt, reference_greedy):
    """The C++ runner (native/, `make native`) over the same program, everything read from
    the .pte: greedy and speculative (k = 1..4) tokens equal transformers' greedy tokens."""
    from runtime.native_runner import NativeRunner

    runner = NativeRunner(artifacts[0], cli=native_cli)
    for k in range(0, MAX_DRAFT + 1):
        tokens, stats = runner.generate(prompt, NEW_TOKENS, k, stop_at_eos=False)
        assert tokens == reference_greedy, k
        assert stats.new_tokens == NEW_TOKENS and (k == 0 or stats.accepted > 0), (k, stats)
        assert stats.target_passes == (NEW_TOKENS if k == 0 else stats.target_passes)


def test_native_runner_refuses_speculative_decoding_without_shared_arenas(native_cli, artifacts, prompt):
    """Loaded as ExecuTorch's Android and iOS bindings load a Module (no shared arenas), the
    drafter methods cannot see the target's caches: the runner refuses, with a message,
    instead of drafting from empty caches."""
    from runtime.native_runner import NativeError, NativeRunner

    with pytest.raises(NativeError, match="speculative decoding refused.*share_memory_arenas"):
        NativeRunner(artifacts[0], cli=native_cli, shared_arenas=False).generate(prompt, 8, 3, stop_at_eos=False)


def test_native_runner_refuses_bad_input(native_cli, artifacts, prompt):
    from runtime.native_runner import NativeRunner

    runner = NativeRunner(artifacts[0], cli=native_cli)
    with pytest.raises(ValueError, match="outside the vocabulary 0..2047"):
        runner.generate([2, 5000], 4)
    with pytest.raises(ValueError, match="exceeds the program's longest drafting round"):
        runner.generate(prompt, 4, MAX_DRAFT + 1)


def test_python_backend_refuses_drafting_over_caches_it_cannot_see(artifacts, prompt):
    """What the drafter sees through unshared arenas (caches without the target's entries)
    is refused by the Python backend too; the shared program passes the same check."""
    from runtime.artifacts import ArtifactError
    from runtime.executorch_backend import ExecuTorchBackend

    backend = ExecuTorchBackend(artifacts[0])
    backend.reset()
    with pytest.raises(ArtifactError, match="speculative decoding refused"):
        backend.draft_tokens(5, torch.zeros(backend.hidden_size).numpy(), 10, 2)
    backend.reset()
    _, hidden = backend.target(prompt, 0)
    assert len(backend.draft_tokens(5, hidden[-1], len(prompt), 2)) == 2

