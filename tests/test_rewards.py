"""Reward functions on literal strings, user functions by module:function, per-sample failure isolation."""
import sys
import textwrap

import pytest

from pipeline.rewards.functions import (REWARD_FUNCTIONS, RewardComposer, RewardLoadError, ScoredShard, merge_scored_shards,
                              resolve_reward_fn)

pytestmark = pytest.mark.unit


def test_exact_match_strips_whitespace():
    fn = REWARD_FUNCTIONS.get("exact_match")
    assert fn(["1+2="] * 4, ["3", " 3 ", "4", "33"], answer=["3", "3", "3", 3]) == [1.0, 1.0, 0.0, 0.0]


def test_arithmetic_verifier_needs_no_labels():
    fn = REWARD_FUNCTIONS.get("arithmetic")
    assert fn(["37+48=", "9-12=", "6*7=", "hello"], ["85", "-3", "41", "1"]) == [1.0, 1.0, 0.0, None]


def test_format_number():
    assert REWARD_FUNCTIONS.get("format_number")(["p"] * 3, ["12", "1 2", "x"]) == [1.0, 0.0, 0.0]


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def length_penalty(prompts, completions, **columns):
            return [-0.1 * len(c) for c in completions]

        def picky(prompts, completions, answer, **columns):
            out = []
            for c, a in zip(completions, answer):
                if c == "boom":
                    raise ValueError("cannot parse")
                out.append(float(c == a))
            return out

        def undecided(prompts, completions, **columns):
            return [None if c == "?" else 1.0 for c in completions]

        def one_value(prompts, completions, **columns):
            return [1.0]

        def words(prompts, completions, **columns):
            return ["good" for c in completions]

        not_a_function = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rewards"
    sys.modules.pop("my_rewards", None)


def test_user_function_by_module_path(user_module):
    fn = resolve_reward_fn(f"{user_module}:length_penalty")
    assert fn(["p"], ["abc"]) == pytest.approx([-0.3])


@pytest.mark.parametrize("spec, fragment", [
    ("no_such_reward", "is not registered"),
    ("no_such_module_xyz:fn", "cannot import module 'no_such_module_xyz'"),
    ("my_rewards:missing", "has no callable 'missing'"),
    ("my_rewards:not_a_function", "has no callable 'not_a_function'"),
])
def test_unloadable_reward_names_the_fix(user_module, spec, fragment):
    with pytest.raises(RewardLoadError, match=fragment):
        resolve_reward_fn(spec)


def test_raising_sample_fails_alone_and_weights_sum(user_module):
    composer = RewardComposer([f"{user_module}:picky", f"{user_module}:length_penalty"], weights=[1.0, 0.5],
                              failed_reward=-1.0)
    shard = composer.score(["a", "b", "c"], ["12", "boom", "13"], {"answer": ["12", "12", "12"]})
    assert shard.failed == [False, True, False]
    assert shard.scores == pytest.approx([1.0 - 0.5 * 0.2, -1.0, 0.0 - 0.5 * 0.2])


def test_a_wrong_number_of_values_fails_the_whole_batch(user_module):
    """[1.0] for 3 samples: which sample it belongs to is unknown, so none gets it (it used to be retried one
    sample at a time, where [1.0] fits, and every sample silently got 1.0)."""
    composer = RewardComposer([f"{user_module}:one_value"], failed_reward=-1.0)
    shard = composer.score(["a", "b", "c"], ["x", "y", "z"], {})
    assert shard.failed == [True] * 3 and shard.scores == [-1.0] * 3
    assert shard.errors == {f"{user_module}:one_value": "returned 1 values for 3 samples (one per sample expected)"}


def test_the_first_failure_of_each_function_travels_with_the_shard(user_module):
    composer = RewardComposer([f"{user_module}:picky", f"{user_module}:words"])
    shard = composer.score(["a", "b"], ["boom", "12"], {"answer": ["12", "12"]})
    assert shard.errors == {f"{user_module}:picky": "ValueError: cannot parse",
                            f"{user_module}:words": "returned 'good', not a finite number"}
    merged = merge_scored_shards(2, [([1], ScoredShard([0.0], [False], {}, {})), ([0], shard_of(shard, 0))])
    assert merged.errors == shard.errors


def shard_of(shard, i):
    return ScoredShard([shard.scores[i]], [shard.failed[i]], {k: [v[i]] for k, v in shard.per_function.items()},
                       shard.errors)


def test_none_and_nan_mark_failure(user_module):
    composer = RewardComposer([f"{user_module}:undecided"])
    shard = composer.score(["a", "b"], ["?", "x"], {})
    assert shard.failed == [True, False] and shard.scores == [0.0, 1.0]


def test_digit_match_gives_partial_credit_aligned_from_the_right():
    fn = REWARD_FUNCTIONS.get("digit_match")
    got = fn(["p"] * 5, ["579", "589", "79", "1579", ""], answer=["579"] * 5)
    assert got == pytest.approx([1.0, 2 / 3, 2 / 3, 3 / 4, 0.0])


def test_scored_shards_merge_in_sample_order_and_each_sample_once():
    from pipeline.rewards.functions import ScoredShard, merge_scored_shards

    def shard(raw):   # as the composer makes them: a failed sample scores failed_reward (0.0)
        return ScoredShard(scores=[0.0 if v is None else v for v in raw], failed=[v is None for v in raw],
                           per_function={"f": raw})

    merged = merge_scored_shards(4, [([2, 3], shard([0.3, None])), ([0, 1], shard([0.0, 0.1]))])
    assert merged.scores == [0.0, 0.1, 0.3, 0.0] and merged.failed == [False, False, False, True]
    assert merged.per_function == {"f": [0.0, 0.1, 0.3, None]}
    with pytest.raises(RuntimeError, match=r"samples \[1\] were scored \[2\] times"):
        merge_scored_shards(3, [([0, 1], shard([0.0, 0.1])), ([1, 2], shard([0.1, 0.2]))])
    with pytest.raises(RuntimeError, match=r"samples \[2\] were scored \[0\] times"):
        merge_scored_shards(3, [([0, 1], shard([0.0, 0.1]))])
