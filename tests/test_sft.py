"""`rlpipe init-model` and `rlpipe sft`: a model for a new task, supervised fine-tuning on the user's columns or
conversations, resume, bad input, and a never-seen task taken from a Parquet file to an RL policy by the CLI."""
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from actors.cli import main
from pipeline.data.demonstrations import read_demonstrations
from pipeline.runs.supervised import SFTConfig, run_sft
from pipeline.runs.init_model import init_model

TESTS = Path(__file__).parent


def write(path, **columns):
    pq.write_table(pa.table(columns), path)
    return str(path)


def conversations(pairs, final_role="assistant"):
    return [[{"role": "system", "content": "Add."}, {"role": "user", "content": f"{a}+{b}="},
             {"role": final_role, "content": str(a + b)}] for a, b in pairs]


PAIRS = [(a, b) for a in range(10, 40, 3) for b in range(5, 50, 7)]


@pytest.mark.unit
def test_messages_rows_split_into_prompt_and_reply(tmp_path):
    path = write(tmp_path / "chat.parquet", messages=conversations(PAIRS[:3]))
    demos = read_demonstrations(path, messages_column="messages")
    assert demos.prompts[0] == [{"role": "system", "content": "Add."}, {"role": "user", "content": "10+5="}]
    assert demos.responses == ["15", "22", "29"] and demos.answers is None


@pytest.mark.unit
def test_answer_column_is_the_response_when_there_is_no_response_column(tmp_path):
    path = write(tmp_path / "d.parquet", prompt=["1+2=", "3+4="], answer=[3, 7])
    demos = read_demonstrations(path)
    assert demos.responses == ["3", "7"] and demos.answers == ["3", "7"]
    train, held_out = demos.split(1, seed=0)
    assert sorted(train.prompts + held_out.prompts) == ["1+2=", "3+4="]


@pytest.mark.unit
@pytest.mark.parametrize("case, fragment", [
    ("messages_not_dicts", "row 0 of column 'messages' holds 'hi', not a role/content dict"),
    ("messages_no_reply", "row 0 of column 'messages' does not end with an assistant message"),
    ("missing_response", "lacks the response column 'reply'"),
    ("int_prompts", "row 0 of column 'prompt' is 12, neither text nor"),
    ("no_chat_template", "has no chat template"),
    ("too_long", "more than the model's 64 positions"),
])
def test_bad_demonstrations_one_clear_error_and_nothing_written(tiny_task, tmp_path, capsys, case, fragment):
    flags = []
    if case == "messages_not_dicts":
        data = write(tmp_path / "d.parquet", messages=[["hi", "there"], ["2+2=", "4"]])
        flags = ["--messages-column", "messages"]
    elif case == "messages_no_reply":
        data = write(tmp_path / "d.parquet", messages=conversations(PAIRS[:2], final_role="user"))
        flags = ["--messages-column", "messages"]
    elif case == "missing_response":
        data = write(tmp_path / "d.parquet", prompt=["1+2="] * 3, answer=["3"] * 3)
        flags = ["--response-column", "reply"]
    elif case == "int_prompts":
        data = write(tmp_path / "d.parquet", prompt=[12, 13, 14], answer=["3"] * 3)
    elif case == "no_chat_template":    # the demo's char tokenizer has none
        data = write(tmp_path / "d.parquet", messages=conversations(PAIRS[:4]))
        flags = ["--messages-column", "messages"]
    else:
        data = write(tmp_path / "d.parquet", prompt=["1+2="] * 3, answer=["1" * 70] * 3)
    out = tmp_path / "run"
    code = main(["sft", "--model", tiny_task["model"], "--data", data, "--out", str(out), "--eval-size", "1",
                 *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and fragment in err and len(err.splitlines()) == 1, err
    assert not out.exists()


@pytest.mark.unit
def test_init_model_tokenizer_covers_the_data(tmp_path):
    from pipeline.models import load_causal_lm, load_tokenizer

    data = write(tmp_path / "d.parquet", prompt=["añb→", "zz"], answer=["Ω", "!"],
                 messages=[[{"role": "user", "content": "¿?"}]] * 2)
    char = init_model([data], tmp_path / "char", size="tiny")
    tok = load_tokenizer(char["path"])
    assert set("añb→zzΩ!¿?") <= set(char["chars"])
    assert tok.unk_token_id not in tok("añb→Ω¿?", add_special_tokens=False)["input_ids"]
    assert tok.decode(tok("añb→Ω", add_special_tokens=False)["input_ids"]) == "añb→Ω"
    assert tok.apply_chat_template([{"role": "user", "content": "zz"}], tokenize=False,
                                   add_generation_prompt=True) == "<bos>user: zz\nassistant: "
    bpe = init_model([data], tmp_path / "bpe", tokenizer="bpe", vocab_size=300, size="small")
    model = load_causal_lm(bpe["path"])
    assert model.config.hidden_size == 256 and bpe["parameters"] == sum(p.numel() for p in model.parameters())
    assert char["max_positions"] == 64
    with pytest.raises(ValueError, match="unknown model size 'huge'; valid: tiny, small, base"):
        init_model([data], tmp_path / "x", size="huge")


@pytest.mark.unit
def test_a_reply_to_a_conversation_ends_with_the_templates_end_of_turn(bpe_task):
    """The chat template closes the assistant's turn with <|im_end|>: SFT trains that token after a reply to a
    rendered conversation (as the template writes the turn), and <eos> after a reply to a plain text prompt."""
    from pipeline.models import load_tokenizer
    from pipeline.data.prompt_format import PromptFormat
    from pipeline.trainers.sft import encode_supervised

    tokenizer = load_tokenizer(bpe_task["model"])
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end != tokenizer.eos_token_id and PromptFormat(tokenizer).end_of_turn_id() == end
    prompts = [conversations(PAIRS[:1])[0][:2], "12+5="]
    data = encode_supervised(tokenizer, prompts, ["17", "17"])
    last = data["completion_mask"].sum(1) - 1
    assert data["completion_ids"][0, last[0]].item() == end
    assert data["completion_ids"][1, last[1]].item() == tokenizer.eos_token_id
    reply = tokenizer.decode(data["completion_ids"][0, :last[0] + 1])
    turn = tokenizer.apply_chat_template(prompts[0] + [{"role": "assistant", "content": "17"}], tokenize=False)
    assert reply in turn                                               # the reply as the template writes it


@pytest.mark.slow
def test_sft_on_conversations_learns_and_writes_a_model_rl_loads(bpe_task, tmp_path):
    from pipeline.models import load_causal_lm

    data = write(tmp_path / "chat.parquet", messages=conversations(PAIRS),
                 answer=[str(a + b) for a, b in PAIRS])
    cfg = SFTConfig(model=bpe_task["model"], data=data, out=str(tmp_path / "sft"), messages_column="messages",
                    eval_size=20, lr=3e-3, batch_size=16, max_steps=60, eval_every=20, patience=None)
    lines = []
    result = run_sft(cfg, log=lines.append)
    held_out = [m["eval/loss"] for _, _, m in result["curve"]]
    train = [m["train/loss"] for _, _, m in result["curve"][1:]]
    assert held_out[-1] < held_out[0] and train[-1] < 0.6 * train[0], (held_out, train)
    assert {"eval/accuracy", "eval/loss", "train/loss"} <= set(result["curve"][-1][2])
    assert load_causal_lm(result["model_dir"]).config.n_embd == 64    # an ordinary HF folder for model.path
    saved = json.loads((Path(result["model_dir"]) / "config.json").read_text())
    assert saved["attn_pdrop"] == 0.1                                  # written back with the dropout it came with
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'sft'}/mlflow.db")
    history = client.get_metric_history(result["mlflow_run_id"], "eval/loss")
    assert [m.step for m in history] == [0, 20, 40, 60]
    assert any("eval/loss" in line for line in lines)


@pytest.mark.slow
def test_sft_resumes_exactly_where_it_stopped(tiny_task, tmp_path):
    labelled = tiny_task["data"]["labelled"]
    common = dict(model=tiny_task["model"], data=labelled, eval_size=20, lr=3e-3, batch_size=16, max_steps=40,
                  eval_every=10, checkpoint_every=10, patience=None)
    straight = run_sft(SFTConfig(out=str(tmp_path / "a"), **common), log=lambda _: None)

    class Stop(Exception):
        pass

    def stop_at_30(line):
        if line.startswith("step    30"):
            raise Stop

    with pytest.raises(Stop):
        run_sft(SFTConfig(out=str(tmp_path / "b"), **common), log=stop_at_30)
    assert not (tmp_path / "b" / "model").exists()
    code = main(["sft", "--resume", str(tmp_path / "b")])   # settings come from the run folder
    assert code == 0
    resumed = json.loads((tmp_path / "b" / "results.json").read_text())
    assert [s for s, _, _ in resumed["curve"]] == [0, 10, 20, 30, 40]
    a = load_file(str(tmp_path / "a" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["final_metrics"] == straight["final_metrics"]


@pytest.mark.slow
def test_a_new_task_from_parquet_to_rl_policy_through_the_cli(tmp_path):
    """A task this project never saw (reverse a word of new letters, a verifier in the user's own module)
    goes from Parquet files to an RL policy by commands alone, run from the folder holding the reward
    module with no PYTHONPATH, and prints nothing a user cannot act on. That RL's held-out accuracy ends
    above the SFT model's is the benchmark's claim (`benchmarks/new_task_cli.py`, docs/benchmarks.md)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("new_task_cli", TESTS.parent / "benchmarks" / "new_task_cli.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.run_new_task(tmp_path, rl_steps=10, sft_steps=300)
    assert result["rl_start"] == pytest.approx(result["sft_accuracy"]) and result["sft_accuracy"] > 0
    assert 0.0 <= result["rl_end"] <= 1.0 and (tmp_path / "rl" / "final_model" / "config.json").exists()
    # nothing on the console a user cannot act on: progress bars of every load and save, Ray's auth notice,
    # the critic's "lm_head.weight UNEXPECTED" load report, MLflow's table creation
    for command, output in result["outputs"]:
        for noise in ("Loading weights", "Writing model shards", "Token authentication is enabled", "UNEXPECTED",
                      "Creating initial MLflow database tables"):
            assert noise not in output, (command, noise, output[-2000:])


TOOL_EPISODE = [{"role": "assistant", "content": "3 "}, {"role": "tool", "content": " 45 "},
                {"role": "assistant", "content": "7"}]


@pytest.mark.unit
def test_demonstrated_episodes_train_the_assistant_turns_in_the_agent_loops_layout(tiny_task, tmp_path):
    """Text protocol (no chat template): prompt, then each turn's own tokens; observations attended, loss 0."""
    from pipeline.models import load_tokenizer
    from pipeline.trainers.sft import encode_supervised

    path = write(tmp_path / "episodes.parquet", prompt=["1+2=", "4+4="], response=[TOOL_EPISODE, TOOL_EPISODE[-1:]])
    demos = read_demonstrations(path)
    assert demos.responses == [TOOL_EPISODE, TOOL_EPISODE[-1:]]
    tok = load_tokenizer(tiny_task["model"])
    data = encode_supervised(tok, demos.prompts, demos.responses)
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]
    expected = enc("3 ") + enc(" 45 ") + enc("7") + [tok.eos_token_id]
    assert data["completion_ids"][0].tolist() == expected
    assert data["loss_mask"][0].tolist() == [True] * 2 + [False] * 4 + [True] * 2
    assert data["completion_mask"][0].all() and data["loss_mask"][1].sum() == 2     # "7" + eos
    with pytest.raises(Exception, match="not an episode"):
        read_demonstrations(write(tmp_path / "bad.parquet", prompt=["1+2="],
                                  response=[[{"role": "assistant", "content": "3"}, {"role": "tool", "content": "4"}]]))


@pytest.mark.unit
def test_a_chat_episode_is_the_templates_render_and_only_assistant_tokens_train(bpe_task, tmp_path):
    from pipeline.data.prompt_format import PromptFormat
    from pipeline.models import load_causal_lm, load_tokenizer
    from pipeline.trainers.sft import SupervisedTrainer, encode_supervised

    conversation = [{"role": "user", "content": "12+5="}, {"role": "assistant", "content": "the sum"},
                    {"role": "tool", "content": "17"}, {"role": "assistant", "content": "17"}]
    demos = read_demonstrations(write(tmp_path / "chat.parquet", messages=[conversation] * 4),
                                messages_column="messages")
    assert demos.prompts[0] == conversation[:1] and demos.responses[0] == conversation[1:]
    tok = load_tokenizer(bpe_task["model"])
    data = encode_supervised(tok, demos.prompts, demos.responses, PromptFormat(tok))
    ids = data["prompt_ids"][0][data["prompt_mask"][0]].tolist() + data["completion_ids"][0].tolist()
    full = tok.apply_chat_template(conversation, tokenize=False)
    assert tok.decode(ids, clean_up_tokenization_spaces=False) == full.removesuffix("\n")   # ends at <|im_end|>
    trained = data["completion_ids"][0][data["loss_mask"][0]].tolist()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert trained == tok("the sum", add_special_tokens=False)["input_ids"] + [im_end] + \
        tok("17", add_special_tokens=False)["input_ids"] + [im_end]
    trainer = SupervisedTrainer(load_causal_lm(bpe_task["model"]), tok, demos.prompts, demos.responses,
                                demos.prompts, demos.responses, lr=1e-2, batch_size=4)
    before = trainer.evaluate()["eval/loss"]
    for _ in range(3):
        trainer.train_step()
    assert trainer.evaluate()["eval/loss"] < before
