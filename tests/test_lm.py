"""LM side of retrieval TTT: scoring convention, LoRA state handling, fine-tuning, logit lens.

The model is conftest's tiny GPT-2 (a tokenizer trained in about a second on pydoc text), so
the tests never wait for (or depend on) the cached default model.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from pipeline.embedded.text import DONE, TextBuildError, pydoc_documents
from pipeline.embedded.tiny_lm import BENCH_SETTINGS, model_dir, train_tiny_lm
from ttt import lens, lm
from workers.lm_adapter import CausalLMAdapter

TEXT = pydoc_documents()[0][1][:700]  # the "assert" topic: real text with a few hundred tokens


@pytest.fixture()
def adapter(tiny_lm_dir):
    torch.manual_seed(0)
    return CausalLMAdapter(tiny_lm_dir, lora={"rank": 4, "alpha": 8.0, "target_modules": ["c_attn", "c_proj"]})


def _score(adapter, texts):
    batch = next(iter(adapter.build_loader([{"sample_id": str(i), "text": t} for i, t in enumerate(texts)],
                                           batch_size=len(texts))))
    return adapter.predict(batch)


def test_bits_per_byte_by_hand():
    assert lm.bits_per_byte(math.log(2) * 12, 4) == pytest.approx(3.0)
    assert lm.bits_per_byte(0.0, 7) == 0.0
    with pytest.raises(ValueError):
        lm.bits_per_byte(1.0, 0)


def test_windows_score_every_token_once():
    ids = list(range(1, 24))
    for width in (4, 5, 8, 23, 40):
        scored = [t for window, labels in lm.token_windows(ids, width) for t in labels if t != lm.IGNORE]
        assert scored == ids[1:]
        assert all(len(w) <= width for w, _ in lm.token_windows(ids, width))


def test_nll_equals_manual_sum_of_log_probs(adapter):
    """Adapter nll = sum over every token after BOS of -log p, in one unpadded forward."""
    text = TEXT[:150]  # fits one window, so one plain forward is the reference
    ids = lm.encode_with_bos(adapter.tokenizer, text)
    assert len(ids) <= adapter.max_length and adapter.tokenizer.decode(ids[1:]) == text
    with torch.no_grad():
        logp = adapter.model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
    manual = -sum(float(logp[t, ids[t + 1]]) for t in range(len(ids) - 1))
    # scored next to a longer text, so padding and windowing are in play too
    row = _score(adapter, [text, TEXT])[0]
    assert row["nll"] == pytest.approx(manual, rel=1e-5)
    assert row["n_tokens"] == len(ids) - 1 and row["n_bytes"] == len(text.encode())
    assert row["bits_per_byte"] == pytest.approx(manual / (math.log(2) * len(text.encode())))


def test_long_text_loss_matches_predict(adapter):
    row = _score(adapter, [TEXT])[0]
    assert row["n_tokens"] > adapter.max_length  # spans several windows
    with torch.no_grad():
        loss = adapter.lm_loss([TEXT])
    assert float(loss) * row["n_tokens"] == pytest.approx(row["nll"], rel=1e-5)


def test_record_without_text_is_an_error_entry(adapter):
    records = [{"sample_id": "a", "text": TEXT[:100]}, {"sample_id": "b"}, {"sample_id": "c", "text": ""},
               {"sample_id": "d", "text": float("nan")}]
    batch = next(iter(adapter.build_loader(records, batch_size=4)))
    assert [r["sample_id"] for r in batch.records] == ["a"]
    assert [r["sample_id"] for r, _ in batch.errors] == ["b", "c", "d"]
    assert "no 'text'" in batch.errors[0][1]
    assert len(adapter.predict(batch)) == 1
    empty = next(iter(adapter.build_loader([{"sample_id": "x"}], batch_size=1)))
    assert empty.inputs is None and adapter.predict(empty) == []


def test_long_texts_are_scored_a_few_windows_at_a_time_with_the_same_nll(adapter):
    """Memory stays bounded at any length: `forward` runs `windows_per_forward` windows at a time,
    and the rows equal those of one forward of every window."""
    texts = [TEXT * 6, TEXT[:90]]
    batch = next(iter(adapter.build_loader([{"sample_id": str(i), "text": t} for i, t in enumerate(texts)],
                                           batch_size=2)))
    assert batch.inputs.input_ids.shape[0] > 4  # the long text spans many windows
    with torch.no_grad():
        whole = lm.token_nll(adapter.model(input_ids=batch.inputs.input_ids,
                                           attention_mask=batch.inputs.attention_mask).logits, batch.inputs.labels)
    adapter.windows_per_forward = 2
    rows = adapter.predict(batch)
    torch.testing.assert_close(adapter.forward(batch.inputs), whole, rtol=1e-5, atol=1e-5)
    assert [r["nll"] for r in rows] == pytest.approx([float(whole[[w for w, o in enumerate(batch.inputs.owner) if o == i]]
                                                            .double().sum()) for i in range(2)], rel=1e-5)


def test_a_text_above_max_text_bytes_is_an_error_row_that_names_the_limit(tiny_lm_dir):
    adapter = CausalLMAdapter(tiny_lm_dir, max_text_bytes=len(TEXT.encode()) - 1)
    records = [{"sample_id": "long", "text": TEXT}, {"sample_id": "short", "text": TEXT[:50]},
               {"sample_id": "bad", "text": None, "_error": "row 'text' is not valid UTF-8 (byte 0xff at offset 3)"}]
    batch = next(iter(adapter.build_loader(records, batch_size=3)))
    assert [r["sample_id"] for r in batch.records] == ["short"]
    errors = dict((r["sample_id"], e) for r, e in batch.errors)
    assert "model.max_text_bytes" in errors["long"] and f"{len(TEXT.encode()):,} bytes" in errors["long"]
    assert "not valid UTF-8" in errors["bad"]


def test_lora_reset_is_bitwise_and_state_swap_reproduces_logits(adapter):
    model = adapter.get_model()
    base = lm.lora_state(model)
    x = torch.tensor([lm.encode_with_bos(adapter.tokenizer, TEXT[:120])])
    with torch.no_grad():
        before = model(input_ids=x).logits.clone()
    result = lm.finetune_on_texts(model, adapter.lm_loss, [TEXT[:300]] * 3, lr=1e-2)
    assert len(result.losses) == 3 and result.steps == 3 and result.stop_reason == "steps_done"
    with torch.no_grad():
        trained_logits = model(input_ids=x).logits.clone()
    assert not torch.equal(trained_logits, before)
    trained = lm.lora_state(model)
    lm.reset_lora(model, base)
    assert all(torch.equal(p, base[n]) for n, p in lm.lora_state(model).items())
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, before)
    lm.load_lora_state(model, trained)
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, trained_logits)
    with pytest.raises(ValueError, match="does not fit"):
        lm.load_lora_state(model, {"nope": torch.zeros(1)})


def test_only_lora_weights_train(adapter):
    model = adapter.get_model()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    lm.finetune_on_texts(model, adapter.lm_loss, [TEXT[:200]] * 2, lr=1e-2)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if "lora_" not in n)


def test_finetuning_on_a_text_lowers_its_nll(adapter):
    text = TEXT[:400]
    before = _score(adapter, [text])[0]["nll"]
    losses = lm.finetune_on_texts(adapter.get_model(), adapter.lm_loss, [text] * 4, lr=1e-2, epochs=2).losses
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert _score(adapter, [text])[0]["nll"] < before
    batch_losses = lm.finetune_on_texts(adapter.get_model(), adapter.lm_loss, [text, text], lr=1e-2,
                                        epochs=3, one_step_per_neighbour=False).losses
    assert len(batch_losses) == 3


def test_logit_lens_last_layer_is_the_models_output(adapter):
    model, tok = adapter.get_model(), adapter.tokenizer
    text = TEXT[:120]
    records = adapter.logit_lens(text, top_k=5)
    n_layer = lm.unwrap(model).config.n_layer
    assert [r["layer"] for r in records] == list(range(n_layer + 1))
    ids = lm.encode_with_bos(tok, text)
    with torch.no_grad():
        probs = model(input_ids=torch.tensor([ids])).logits[0, -1].softmax(-1)
    top = probs.topk(5)
    assert records[-1]["top_ids"] == top.indices.tolist()
    assert records[-1]["top_probs"] == pytest.approx(top.values.tolist(), rel=1e-5)
    # an intermediate layer is that block's output read through ln_f and the unembedding
    base = lm.unwrap(model)
    seen = {}
    handle = base.transformer.h[0].register_forward_hook(lambda m, i, o: seen.setdefault("h", o))
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]))
        handle.remove()
        block_out = seen["h"][0] if isinstance(seen["h"], tuple) else seen["h"]
        mid = base.lm_head(base.transformer.ln_f(block_out[0, -1])).softmax(-1)
    assert records[1]["top_probs"] == pytest.approx(mid.topk(5).values.tolist(), rel=1e-5)
    rows = lens.lens_rows(records, stage="before")
    assert len(rows) == 5 * len(records) and rows[0]["stage"] == "before" and rows[0]["rank"] == 0


def test_score_choices_prefers_the_trained_continuation(adapter):
    context, good, bad = TEXT[:80], TEXT[80:100], " zebra quantum"
    lm.finetune_on_texts(adapter.get_model(), adapter.lm_loss, [TEXT[:100]] * 6, lr=2e-2)
    scores = adapter.score_choices(context, [good, bad])
    assert len(scores) == 2 and scores[0] > scores[1]


def test_attach_lora_refuses_unknown_targets(tiny_lm_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, local_files_only=True)
    with pytest.raises(ValueError, match="none of target_modules"):
        lm.attach_lora(model, target_modules=["q_proj"])


def test_a_llama_architecture_works_the_same(tiny_lm_dir, tmp_path):
    """Any HF causal LM from a directory: a tiny Llama (RMSNorm `model.norm`, q/v projections,
    PEFT's default LoRA targets) scores, trains LoRA, resets and reads through the lens."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    adapter = CausalLMAdapter(tmp_path, lora={"rank": 4})  # targets: PEFT's Llama default
    model = adapter.get_model()
    assert any("q_proj.lora_A" in n for n in lm.lora_state(model))
    base = lm.lora_state(model)
    before = _score(adapter, [TEXT])[0]
    assert before["n_tokens"] > adapter.max_length  # windows on a second architecture too
    result = lm.finetune_on_texts(model, adapter.lm_loss, [TEXT[:200]] * 2, lr=1e-2)
    assert result.steps == 2 and _score(adapter, [TEXT])[0]["nll"] != before["nll"]
    lm.reset_lora(model, base)
    assert _score(adapter, [TEXT])[0]["nll"] == before["nll"]
    records = adapter.logit_lens(TEXT[:120], top_k=3)
    with torch.no_grad():
        probs = model(input_ids=torch.tensor([lm.encode_with_bos(tok, TEXT[:120])])).logits[0, -1].softmax(-1)
    assert len(records) == 3 and records[-1]["top_ids"] == probs.topk(3).indices.tolist()


def test_a_time_capped_training_caches_nothing(tmp_path):
    """A cap that fires raises: the seed, not the machine's load, fixes the cached model."""
    with pytest.raises(TextBuildError, match="max_seconds"):
        train_tiny_lm(tmp_path, steps=50, vocab_size=300, n_layer=1, n_embd=16, n_head=2, context=32, batch_size=2,
                      max_seconds=0.0, threads=1)
    assert not list(tmp_path.glob(f"tiny_gpt2*/{DONE}"))


def test_a_cached_model_stopped_early_is_refused(tmp_path):
    """A model cached by the old time cap (fewer steps than asked) is not silently reused."""
    settings = {"seed": 0, **BENCH_SETTINGS}
    out = model_dir(tmp_path, settings)
    out.mkdir()
    (out / "train.json").write_text(json.dumps({**settings, "steps_done": 26, "stop_reason": "time"}))
    (out / DONE).write_text("ok\n")
    with pytest.raises(TextBuildError, match="26 of 600"):
        train_tiny_lm(tmp_path, **BENCH_SETTINGS)


def test_the_build_says_where_it_stands_and_each_setting_gets_its_own_folder(tmp_path, capsys):
    small = {"steps": 6, "vocab_size": 300, "n_layer": 1, "n_embd": 16, "n_head": 2, "context": 32, "batch_size": 2}
    out = train_tiny_lm(tmp_path, **small, threads=1, progress_s=0.0)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[train-lm]")]
    assert lines[0].startswith(f"[train-lm] building the tiny LM once into {out}")
    assert [ln.split()[2] for ln in lines if " to go)" in ln] == [f"{k}/6" for k in range(1, 6)]
    info = json.loads((out / "train.json").read_text())
    assert info["steps_done"] == 6 and info["n_layer"] == 1 and (out / DONE).exists()
    assert train_tiny_lm(tmp_path, **small, threads=1) == out and "[train-lm]" not in capsys.readouterr().out
    assert model_dir(tmp_path, {**info, "steps": 7}) != out  # other settings: another folder, never a mix-up
