"""Models, data and the supervised warm start, on a tiny local Llama (no network)."""
from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.data.prompt_table import DataError, PromptSampler, read_prompt_table
from pipeline.demo.task import make_arithmetic_task
from pipeline.trainers.engine import lr_factor
from pipeline.rollout.evaluation import exact_match_accuracy
from pipeline.rollout.generation import sample_completions
from pipeline.models import ModelLoadError, ValueModel, completion_forward, load_causal_lm, load_tokenizer
from pipeline.small_models import build_char_tokenizer, build_tiny_model
from pipeline.trainers.sft import encode_supervised, sft_loss, supervised_finetune

pytestmark = pytest.mark.unit
os.environ["HF_HUB_OFFLINE"] = "1"  # everything here is local; a hub lookup would be a bug


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), hidden_size=32, num_layers=2,
                            num_heads=2, intermediate_size=64, seed=0)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_causal_lm(tiny_dir), load_tokenizer(tiny_dir)


# ----------------------------------------------------------------------------- tokenizer and models

def test_char_tokenizer_round_trips_without_spaces():
    tok = build_char_tokenizer()
    ids = tok("123+456=")["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == 9          # <bos> + one id per character
    assert tok.pad_token_id == 0 and tok.padding_side == "left"
    assert tok.decode(ids, skip_special_tokens=True) == "123+456="
    assert tok.decode(tok("1 2-3", add_special_tokens=False)["input_ids"]) == "1 2-3"


def test_tiny_model_folder_reloads_offline(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert os.path.isfile(os.path.join(tiny_dir, "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert tok.decode(tok("12+34=")["input_ids"], skip_special_tokens=True) == "12+34="
    assert model.config.pad_token_id == tok.pad_token_id == 0
    assert model.config.eos_token_id == tok.eos_token_id == model.generation_config.eos_token_id


def test_folder_without_config_gives_one_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="not a Hugging Face model folder.*rlpipe warmstart"):
        load_causal_lm(tmp_path)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")


def test_generate_logprobs_match_completion_forward(tiny):
    model, tok = tiny
    prompts = ["1+2=", "123+456=", "77*3="]  # different lengths: exercises left padding
    out = sample_completions(model, tok, prompts, max_new_tokens=6, temperature=0.7, generator_seed=0)
    scored = completion_forward(model, out["prompt_ids"], out["prompt_mask"], out["completion_ids"],
                                out["completion_mask"], temperature=0.7, want_entropy=True,
                                want_hidden=True)
    mask = out["completion_mask"]
    assert torch.allclose(scored["logprobs"][mask], out["logprobs"][mask], atol=1e-4)
    n, T = out["completion_ids"].shape
    assert scored["hidden"].shape == (n, T, model.config.hidden_size)
    assert (scored["entropy"][mask] > 0).all()


def test_completion_mask_keeps_eos_and_drops_what_follows(tiny):
    model, tok = tiny
    head = model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features)  # same weights, <eos> made likely
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[tok.eos_token_id] = 2.0
    model.lm_head = biased
    try:
        out = sample_completions(model, tok, ["1+2=", "45+6="] * 8, max_new_tokens=8,
                                 temperature=1.0, generator_seed=3)
    finally:
        model.lm_head = head
    ids, mask = out["completion_ids"], out["completion_mask"]
    lengths = mask.sum(-1)
    assert lengths.min() < ids.shape[1]                            # some sequences ended early
    for row, length in zip(ids, lengths.tolist()):
        eos_at = (row == tok.eos_token_id).nonzero().flatten().tolist()
        if eos_at:
            assert length == eos_at[0] + 1                         # EOS itself is inside the mask
            assert (row[length:] == tok.pad_token_id).all()        # and everything after is pad
    assert (out["logprobs"][~mask] == 0).all()


def test_critic_starts_at_zero_and_reloads(tiny_dir):
    critic = ValueModel(tiny_dir)
    ids = torch.tensor([[0, 1, 5, 6], [1, 5, 6, 7]])
    values = critic(ids, ids != 0)
    assert values.shape == (2, 4) and (values == 0).all()
    again = ValueModel(tiny_dir)
    again.load_state_dict(critic.state_dict())


# ----------------------------------------------------------------------------- data

def test_arithmetic_splits_are_disjoint_and_correct(tmp_path):
    paths = make_arithmetic_task(tmp_path, digits=2, n_labelled=50, n_rl=300, n_eval=40, seed=1)
    tables = {name: pq.read_table(p) for name, p in paths.items()}
    prompts = {name: set(t.column("prompt").to_pylist()) for name, t in tables.items()}
    assert [len(prompts[k]) for k in ("labelled", "train", "eval")] == [50, 300, 40]
    assert not (prompts["labelled"] & prompts["train"] or prompts["labelled"] & prompts["eval"]
                or prompts["train"] & prompts["eval"])
    for row in tables["train"].to_pylist():
        a, b = row["prompt"].rstrip("=").split("+")
        assert len(a) == len(b) == 2 and row["answer"] == str(int(a) + int(b))
    again = make_arithmetic_task(tmp_path / "again", digits=2, n_labelled=50, n_rl=300, n_eval=40, seed=1)
    assert pq.read_table(again["eval"]).equals(tables["eval"])     # deterministic in the seed


def test_read_prompt_table_parquet_and_jsonl(tmp_path):
    pq.write_table(pa.table({"prompt": ["1+1="], "answer": ["2"]}), tmp_path / "p.parquet")
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"prompt": p, "answer": a})
                                                for p, a in [("1+1=", "2"), ("2+2=", "4")]))
    assert read_prompt_table(tmp_path / "p.parquet", ("prompt", "answer")).num_rows == 1
    assert read_prompt_table(tmp_path / "p.jsonl").column("answer").to_pylist() == ["2", "4"]


def test_read_prompt_table_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_prompt_table(tmp_path / "nope.parquet")
    (tmp_path / "p.csv").write_text("prompt\n1+1=\n")
    with pytest.raises(DataError, match="unsupported extension '.csv'"):
        read_prompt_table(tmp_path / "p.csv")
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="cannot read prompt file"):
        read_prompt_table(tmp_path / "bad.parquet")
    pq.write_table(pa.table({"question": ["1+1="], "answer": ["2"]}), tmp_path / "q.parquet")
    with pytest.raises(DataError, match="lacks column\\(s\\) prompt; columns present: question, answer"):
        read_prompt_table(tmp_path / "q.parquet")
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    with pytest.raises(DataError, match="has no rows"):
        read_prompt_table(tmp_path / "empty.parquet")


def test_prompt_sampler_resumes_with_the_same_prompts():
    table = pa.table({"prompt": [f"p{i}" for i in range(10)]})
    sampler = PromptSampler(table, batch_size=4, seed=7)
    first_epoch = [r["prompt"] for _ in range(2) for r in sampler.next_batch()]  # 8 of epoch 0
    state = sampler.state_dict()
    expected = [sampler.next_batch() for _ in range(5)]          # crosses two epoch boundaries
    resumed = PromptSampler(table, batch_size=4, seed=7)
    resumed.load_state_dict(state)
    assert [resumed.next_batch() for _ in range(5)] == expected
    one_epoch = [r["prompt"] for r in PromptSampler(table, 10, seed=7).next_batch()]
    assert one_epoch[:8] == first_epoch and sorted(one_epoch) == sorted(table.column("prompt").to_pylist())
    assert one_epoch != sorted(one_epoch)                          # shuffled


# ----------------------------------------------------------------------------- warm start

def test_encode_supervised_puts_the_loss_on_answer_and_eos():
    tok = build_char_tokenizer()
    data = encode_supervised(tok, ["1+2=", "10+20="], ["3", "30"])
    assert data["completion_ids"].tolist() == [[tok.convert_tokens_to_ids("3"), tok.eos_token_id, 0],
                                               [tok.convert_tokens_to_ids("3"),
                                                tok.convert_tokens_to_ids("0"), tok.eos_token_id]]
    assert data["completion_mask"].sum(-1).tolist() == [2, 3]
    assert data["prompt_mask"].sum(-1).tolist() == [5, 7]         # <bos> + characters, left-padded


def test_supervised_finetune_lowers_the_loss(tiny_dir):
    torch.manual_seed(0)
    model, tok = load_causal_lm(tiny_dir), load_tokenizer(tiny_dir)
    prompts = [f"{a}+{b}=" for a in range(10, 14) for b in range(20, 24)]
    answers = [str(int(p[:2]) + int(p[3:5])) for p in prompts]
    batch = encode_supervised(tok, prompts, answers)
    before = sft_loss(model, batch).item()
    lines = []
    result = supervised_finetune(model, tok, prompts, answers, prompts[:4], answers[:4], lr=3e-3,
                                 batch_size=16, max_steps=40, eval_every=20, seed=0, log=lines.append)
    after = sft_loss(model, batch).item()
    assert after < 0.7 * before
    assert result["steps"] == 40 and [s for s, _, _ in result["curve"]] == [0, 20, 40]
    assert len(lines) == 3 and "eval/accuracy" in lines[1] and "train/loss" in lines[1]
    acc = exact_match_accuracy(model, tok, prompts[:4], answers[:4], max_new_tokens=4)
    assert acc == result["final_accuracy"] and model.training


def test_early_stopping_restores_the_best_weights(tiny_dir):
    model, tok = load_causal_lm(tiny_dir), load_tokenizer(tiny_dir)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    prompts, answers = ["12+34=", "56+21="], ["46", "77"]
    # A near-random model scores 0 on unseen 3-digit sums: no eval beats step 0, so patience 2 stops at
    # step 10 and hands back the step-0 weights.
    result = supervised_finetune(model, tok, prompts, answers, ["123+456=", "321+222="], ["579", "543"],
                                 lr=1e-3, batch_size=2, max_steps=100, eval_every=5, patience=2, seed=0,
                                 log=lambda s: None)
    assert result["best_step"] == 0 and result["steps"] == 10
    assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    assert lr_factor(0, 10, 100) == pytest.approx(0.1) and lr_factor(9, 10, 100) == 1.0
    assert lr_factor(10, 10, 100) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100) == pytest.approx(0.55)
    assert lr_factor(100, 10, 100) == lr_factor(500, 10, 100) == pytest.approx(0.1)
    assert lr_factor(500, 0, None) == 1.0


def test_warm_start_and_baseline_run_with_the_demo_thread_count():
    """The plateau follows the floating-point order, which follows the thread count: the demo fixes it and
    gives the caller's back."""
    from pipeline.demo.warmstart import DEMO_THREADS, _demo_threads

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert _demo_threads(torch.get_num_threads)() == DEMO_THREADS == 2
        assert _demo_threads(torch.are_deterministic_algorithms_enabled)()
        assert torch.get_num_threads() == 1 and not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.set_num_threads(before)
