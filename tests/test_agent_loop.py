"""The agent loop through the real hf backend on a tiny random model: token identity (what is trained is what was
sampled), termination (length, max_turns, timeout, env_error reach stop_reason, rewards and masks; no turn after
truncation) and isolation (a slow or crashing environment does not stall or fail the others; no state crosses
episodes)."""
from __future__ import annotations

import itertools
import time
from dataclasses import replace

import pytest
import torch

from pipeline.batch import concat_rollouts, select_rollout
from pipeline.config import EnvConfig, ModelConfig, RolloutConfig
from pipeline.envs import StepResult
from pipeline.rollout.agent import episodes_to_rollout, run_episodes

pytestmark = pytest.mark.unit

OBSERVATION = " 45 "
PROMPTS = ["12+3=", "7*8=", "99-1=", "5+5="]


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """A generator (the plain class) on a tiny random model with room for several turns."""
    from pipeline.rollout.generator import RolloutGenerator
    from pipeline.small_models import build_tiny_model

    path = build_tiny_model(str(tmp_path_factory.mktemp("agent") / "model"), hidden_size=32, num_layers=2,
                            num_heads=2, intermediate_size=64, max_positions=256, seed=0)
    return RolloutGenerator(ModelConfig(path=path, device="cpu"), RolloutConfig(max_new_tokens=6))


class CountingEnv:
    """Answers every turn with the same observation and pays 1 per turn; done after `done_after` steps (never
    when None). Records what it was given, so a test can compare it with what was trained."""

    stop: list[str] = []
    made = itertools.count()

    def __init__(self, done_after=3, slow_rows=(), crash_rows=(), stop=None):
        self.done_after, self.slow_rows, self.crash_rows = done_after, slow_rows, crash_rows
        self.stop = stop or []
        self.actions: list[str] = []
        self.instance = next(CountingEnv.made)

    def reset(self, row, seed):
        self.row = row
        return row["prompt"]

    def step(self, action):
        self.actions.append(action)
        if self.row["id"] in self.slow_rows:
            time.sleep(3.0)
        if self.row["id"] in self.crash_rows:
            raise RuntimeError("the sandbox died")
        done = self.done_after is not None and len(self.actions) >= self.done_after
        return StepResult(OBSERVATION, reward=1.0, done=done, info={"tool_calls": 1})


def run(policy, make_env, env_cfg, n=8, seed=0):
    """Episodes of `n` rows (the prompts cycled), with a record of each episode's environment."""
    made = []

    def factory():
        made.append(make_env())
        return made[-1]

    rows = [{"prompt": f"{i} {PROMPTS[i % len(PROMPTS)]}", "id": i} for i in range(n)]     # distinct contexts
    episodes = run_episodes(policy.backend, policy.prompt_format, factory, rows, env_cfg, policy.cfg, seed)
    return episodes, {e.row["id"]: e.env for e in episodes if e.env is not None}, made


def spans(mask: list[bool]) -> list[tuple[int, int]]:
    """[start, end) of each run of True."""
    out, start = [], None
    for i, m in enumerate(mask + [False]):
        if m and start is None:
            start = i
        if not m and start is not None:
            out.append((start, i))
            start = None
    return out


def test_trained_ids_are_the_sampled_ids_and_observations_are_masked(policy):
    from pipeline.models import completion_forward

    env_cfg = EnvConfig(max_turns=3, max_turn_tokens=6, max_episode_tokens=64)
    sampled_turns = []
    sample = policy.backend.sample_turns

    def recording(contexts, **kw):          # what the engine returned, before the loop touched it
        out = sample(contexts, **kw)
        sampled_turns.append([(list(c), ids) for c, (ids, _, _) in zip(contexts, out)])
        return out

    policy.backend.sample_turns = recording
    try:
        episodes, envs, _ = run(policy, lambda: CountingEnv(done_after=3), env_cfg)
    finally:
        policy.backend.sample_turns = sample
    tok = policy.prompt_format.tokenizer
    obs_ids = tok(OBSERVATION, add_special_tokens=False)["input_ids"]
    for e in episodes:
        assert len(e.ids) == len(e.loss_mask) == len(e.logprobs) == len(e.rewards)
        turns = spans(e.loss_mask)
        assert len(turns) == e.turns
        # each sampled span is exactly what the engine returned for this episode's context at that turn
        for k, (a, b) in enumerate(turns):
            context = e.prompt_ids + e.ids[:a]
            engine = [ids for c, ids in sampled_turns[k] if c == context]
            assert engine and e.ids[a:b] == engine[0][:b - a]
            if not (e.stop_reason == "length" and k == len(turns) - 1):     # a cut turn is never stepped
                assert envs[e.row["id"]].actions[k] == tok.decode(e.ids[a:b], skip_special_tokens=True)
        # between turns: the observation's own tokens, mask 0, no log-prob
        for (a, b), (c, _) in zip(turns, turns[1:]):
            assert e.ids[b:c] == obs_ids and not any(e.loss_mask[b:c]) and not any(e.logprobs[b:c])
        # one reward per stepped turn, on its last sampled token
        rewarded = [i for i, r in enumerate(e.rewards) if r]
        stepped = len(envs[e.row["id"]].actions)
        if e.stop_reason == "stop":
            assert rewarded == [b - 1 for _, b in turns][:stepped]
    # the recorded log-probs are the policy's for these ids in these contexts (observations included)
    rollout = episodes_to_rollout(episodes, list(range(len(episodes))), list(range(len(episodes))), 0,
                                  tok.pad_token_id, tok)
    out = completion_forward(policy.backend.model, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
                             rollout.completion_mask, temperature=1.0)
    m = rollout.loss_mask
    assert m.sum() > 0 and (~m & rollout.completion_mask).sum() > 0
    torch.testing.assert_close(out["logprobs"][m], rollout.logprobs[m], atol=1e-4, rtol=0)
    assert (rollout.logprobs[~m] == 0).all() and (rollout.token_rewards[~m] == 0).all()


def test_a_turn_cut_by_its_budget_ends_the_episode_without_a_step(policy):
    env_cfg = EnvConfig(max_turns=4, max_turn_tokens=3, max_episode_tokens=64, truncated_reward="keep")
    episodes, envs, _ = run(policy, lambda: CountingEnv(done_after=None), env_cfg, n=12)
    cut = [e for e in episodes if e.stop_reason == "length"]
    assert cut, [e.stop_reason for e in episodes]
    for e in cut:
        turns = spans(e.loss_mask)
        a, b = turns[-1]
        assert b - a == 3 and b == len(e.ids)                  # ends on the cut turn: nothing after it
        assert len(envs[e.row["id"]].actions) == e.turns - 1   # the cut turn never reached the environment
        assert sum(e.rewards) == e.turns - 1                   # keep: the finished turns' rewards


def test_the_episode_budget_and_max_turns_end_episodes_and_zero_pays_nothing(policy):
    env_cfg = EnvConfig(max_turns=2, max_turn_tokens=6, max_episode_tokens=200, truncated_reward="zero")
    episodes, envs, _ = run(policy, lambda: CountingEnv(done_after=None, stop=["="]), env_cfg)
    for e in episodes:
        assert e.stop_reason in ("max_turns", "length")
        assert sum(e.rewards) == 0.0                            # zero: unfinished episodes earn nothing
        assert e.turns <= 2 and len(envs[e.row["id"]].actions) <= 2
    at_max = [e for e in episodes if e.stop_reason == "max_turns"]
    assert at_max and all(len(envs[e.row["id"]].actions) == 2 for e in at_max)
    # an episode budget smaller than two turns plus an observation: the second turn never starts
    tight = EnvConfig(max_turns=4, max_turn_tokens=6, max_episode_tokens=8)
    episodes, envs, _ = run(policy, lambda: CountingEnv(done_after=None), tight)
    for e in episodes:
        assert e.stop_reason == "length" and len(e.ids) <= 8


def test_a_slow_and_a_crashing_environment_become_placeholders_and_the_rest_finish(policy):
    env_cfg = EnvConfig(max_turns=3, max_turn_tokens=16, max_episode_tokens=64, timeout_s=0.5)
    start = time.monotonic()
    episodes, envs, _ = run(policy, lambda: CountingEnv(done_after=2, slow_rows=(0,), crash_rows=(1,),
                                                        stop=["=", "+", "*"]), env_cfg)
    elapsed = time.monotonic() - start
    assert elapsed < 2.5                           # the 3 s sleeper held nobody past its 0.5 s deadline
    by_id = {e.row["id"]: e for e in episodes}
    assert by_id[0].stop_reason == "timeout" and "timeout_s=0.5" in by_id[0].error
    assert by_id[1].stop_reason == "env_error" and "the sandbox died" in by_id[1].error
    for e in (by_id[0], by_id[1]):
        assert not any(e.loss_mask) and sum(e.rewards) == 0.0
    others = [e for i, e in by_id.items() if i > 1]
    assert all(e.stop_reason in ("stop", "length") for e in others)
    assert any(e.stop_reason == "stop" and sum(e.rewards) == 2.0 for e in others)


def test_every_episode_gets_its_own_environment_and_state(policy):
    class Remembering:
        stop: list[str] = []

        def __init__(self):
            self.seen = []

        def reset(self, row, seed):
            return row["prompt"]

        def step(self, action):
            self.seen.append(action)
            return StepResult(f" {len(self.seen)} ", reward=float(len(self.seen)), done=len(self.seen) == 3)

    env_cfg = EnvConfig(max_turns=3, max_turn_tokens=4, max_episode_tokens=64)
    episodes, envs, made = run(policy, Remembering, env_cfg)
    assert len(made) == len(episodes) == len({id(e) for e in made})
    tok = policy.prompt_format.tokenizer
    for e in episodes:
        turns = spans(e.loss_mask)
        observed = [tok.decode(e.ids[b:c]) for (_, b), (c, _) in zip(turns, turns[1:])]
        assert observed == [f" {k} " for k in range(1, len(observed) + 1)]   # its own count, never another's


def test_an_async_environment_and_a_gymnasium_tuple(policy):
    class AsyncEnv:
        stop = ["=", "+", "*", " "]

        async def reset(self, row, seed):
            return row["prompt"]

        async def step(self, action):
            return "", 0.5, True, False, {}

    episodes, _, _ = run(policy, AsyncEnv, EnvConfig(max_turns=2, max_turn_tokens=30, max_episode_tokens=64))
    stopped = [e for e in episodes if e.stop_reason == "stop"]
    assert stopped and all(e.turns == 1 and sum(e.rewards) == 0.5 for e in stopped)


def test_episode_rollouts_join_and_select_with_their_masks(policy):
    env_cfg = EnvConfig(max_turns=2, max_turn_tokens=5, max_episode_tokens=64)
    tok = policy.prompt_format.tokenizer
    parts = []
    for shard, seed in ((range(0, 3), 0), (range(3, 5), 1)):
        episodes, _, _ = run(policy, lambda: CountingEnv(done_after=2), env_cfg, n=len(shard), seed=seed)
        parts.append(episodes_to_rollout(episodes, list(shard), list(shard), 0, tok.pad_token_id, tok))
    joined = concat_rollouts(parts[::-1])
    assert joined.sample_index.tolist() == [0, 1, 2, 3, 4]
    for name in ("completion_ids", "completion_mask", "logprobs", "loss_mask", "token_rewards"):
        assert getattr(joined, name).shape == joined.completion_ids.shape
    assert len(joined.stop_reasons) == 5 and joined.episode_counts.shape == (5, 3)
    for i, (part, row) in enumerate([(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]):
        n = parts[part].completion_ids.shape[1]
        assert joined.loss_mask[i, :n].equal(parts[part].loss_mask[row])
        assert not joined.loss_mask[i, n:].any()
    picked = select_rollout(joined, torch.tensor([4, 0]))
    assert picked.stop_reasons == [joined.stop_reasons[4], joined.stop_reasons[0]]
    assert picked.train_mask.equal(joined.loss_mask[[4, 0]])
    assert replace(joined, loss_mask=None).train_mask is joined.completion_mask


def test_placeholders_leave_the_batch_and_the_stop_reasons_are_counted(policy):
    from actors.driver import score_episodes

    env_cfg = EnvConfig(max_turns=2, max_turn_tokens=16, max_episode_tokens=64, truncated_reward="keep")
    episodes, _, _ = run(policy, lambda: CountingEnv(done_after=1, crash_rows=(2,), stop=["=", "+", "*"]), env_cfg,
                         n=6)
    tok = policy.prompt_format.tokenizer
    batch, stats = score_episodes(episodes_to_rollout(episodes, [i // 2 for i in range(6)], list(range(6)), 0,
                                                      tok.pad_token_id, tok))
    assert batch.num_sequences == 5 and 2 not in batch.rollout.sample_index.tolist()   # the crashed one left
    assert stats["reward/dropped"] == 1 and stats["env/stop/env_error"] == 1 / 6
    assert abs(sum(v for k, v in stats.items() if k.startswith("env/stop/")) - 1.0) < 1e-9
    assert batch.scores.tolist() == [sum(e.rewards) for e in episodes if e.row["id"] != 2]


def test_settings_an_environment_would_ignore_are_refused():
    from pipeline.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="reward.normalize"):
        load_config(None, ["env.name=reward_functions", "data.eval_path=null", "reward.normalize=true"])
    with pytest.raises(ConfigError, match="env.max_episode_tokens"):
        load_config(None, ["env.name=reward_functions", "data.eval_path=null", "env.max_episode_tokens=4"])


@pytest.fixture(scope="module")
def chat_policy(tmp_path_factory):
    """A generator rendering prompts with a ChatML template (<|im_end|> then "\\n" between turns), BPE tokens."""
    from pipeline.rollout.generator import RolloutGenerator
    from pipeline.small_models import build_bpe_model

    path = build_bpe_model(str(tmp_path_factory.mktemp("chat") / "llama"), arch="llama", hidden_size=64,
                           num_layers=2, num_heads=4, max_positions=256, seed=0)
    return RolloutGenerator(ModelConfig(path=path, device="cpu"), RolloutConfig(max_new_tokens=8), chat_template=True)


class ChatEnv:
    stop = [" the", "."]

    def reset(self, row, seed):
        return [{"role": "system", "content": "Answer."}, {"role": "user", "content": row["prompt"]}]

    def step(self, action):
        return StepResult([{"role": "tool", "content": "42"}], reward=1.0)


def test_chat_observations_are_the_new_turn_only_and_the_ids_are_the_whole_conversation(chat_policy):
    from pipeline.models import completion_forward

    tok = chat_policy.prompt_format.tokenizer
    im_end, newline = tok.convert_tokens_to_ids("<|im_end|>"), tok("\n", add_special_tokens=False)["input_ids"]
    env_cfg = EnvConfig(max_turns=3, max_turn_tokens=8, max_episode_tokens=120, truncated_reward="keep")
    rows = [{"prompt": f"what is {i} and {i}", "id": i} for i in range(8)]
    episodes = run_episodes(chat_policy.backend, chat_policy.prompt_format, ChatEnv, rows, env_cfg, chat_policy.cfg, 0)
    observed = 0
    for e in episodes:
        turns = spans(e.loss_mask)
        for (_, b), (c, _) in zip(turns, turns[1:]):
            gap = e.ids[b:c]
            observed += 1
            # the end of turn the model sampled (then the template's "\n"), or one inserted after a stop string
            ended = e.ids[b - 1] == im_end
            assert gap[:len(newline)] == newline if ended else gap[:1 + len(newline)] == [im_end] + newline
            assert tok.decode(gap).endswith("<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n")
        if len(turns) > 1:   # up to its last turn, the ids are the template's render of the whole conversation
            assert tok.decode(e.prompt_ids + e.ids[:turns[-1][0]], skip_special_tokens=False,
                              clean_up_tokenization_spaces=False) == \
                tok.apply_chat_template(e.messages, tokenize=False, add_generation_prompt=True)
    assert observed > 0
    r = episodes_to_rollout(episodes, list(range(8)), list(range(8)), 0, tok.pad_token_id, tok)
    out = completion_forward(chat_policy.backend.model, r.prompt_ids, r.prompt_mask, r.completion_ids,
                             r.completion_mask, temperature=1.0)
    torch.testing.assert_close(out["logprobs"][r.loss_mask], r.logprobs[r.loss_mask], atol=1e-4, rtol=0)


def test_a_template_that_is_not_the_sum_of_its_turns_stops_the_run(chat_policy):
    from pipeline.rollout.chat_bridge import BridgeError

    tok = chat_policy.prompt_format.tokenizer
    original = tok.chat_template
    # Like Qwen3's dropping of earlier <think> blocks: an assistant turn's text is rendered only while it is last.
    tok.chat_template = original.replace(
        "{{ m['content'] }}", "{% if m['role'] == 'assistant' and not loop.last %}...{% else %}{{ m['content'] }}{% endif %}")
    try:
        env_cfg = EnvConfig(max_turns=3, max_turn_tokens=24, max_episode_tokens=120)
        rows = [{"prompt": f"what is {i}", "id": i} for i in range(8)]
        with pytest.raises(BridgeError, match="not prefix-preserving"):
            run_episodes(chat_policy.backend, chat_policy.prompt_format, ChatEnv, rows, env_cfg, chat_policy.cfg, 0)
    finally:
        tok.chat_template = original


def test_the_strict_check_names_where_tokens_and_the_full_render_part(chat_policy):
    from pipeline.rollout.chat_bridge import BridgeError, ChatBridge

    tok = chat_policy.prompt_format.tokenizer
    bridge = ChatBridge(tok, tok.convert_tokens_to_ids("<|im_end|>"))
    messages = [{"role": "user", "content": "what is 2"}, {"role": "assistant", "content": " four"},
                {"role": "tool", "content": "42"}]
    ids = bridge.encode(bridge.render(messages))
    bridge.check(ids, messages)                                   # the same conversation: no error
    trimmed = [*messages[:1], {"role": "assistant", "content": "four"}, messages[2]]
    with pytest.raises(BridgeError, match="differ at character"):
        bridge.check(ids, trimmed)


def test_held_out_episodes_give_success_pass_at_k_and_mean_reward():
    from pipeline.rollout.agent import episode_eval_metrics

    per_row = [[(1.0, "stop", 2, 1), (0.0, "stop", 1, 0)],          # one of two succeeded
               [(None, "timeout", 1, 0), (0.5, "max_turns", 3, 2)],   # a placeholder fails; 0.5 < 1
               [(2.0, "stop", 2, 2), (1.0, "stop", 2, 1)]]
    m = episode_eval_metrics(per_row, success_reward=1.0)
    assert m["eval/success"] == 3 / 6 and m["eval/pass_at_2"] == 2 / 3
    assert m["eval/mean_reward"] == (1.0 + 0.0 + 0.5 + 2.0 + 1.0) / 5          # over the episodes that ran
    assert m["eval/turns"] == 11 / 6 and m["eval/tool_calls"] == 1.0
    assert m["eval/stop/stop"] == 4 / 6 and m["eval/stop/timeout"] == 1 / 6


def test_an_environments_tools_reach_the_chat_template_and_the_bridge(chat_policy):
    from pipeline.envs import tool_schema

    def lookup(key: str) -> int:
        """The value under a key."""
        return 42

    class ToolChat(ChatEnv):
        schemas = [tool_schema(lookup)]

    tok = chat_policy.prompt_format.tokenizer
    original = tok.chat_template
    tok.chat_template = ("{% if tools %}<|im_start|>system\nTools: {% for t in tools %}{{ t['function']['name'] }}"
                         "{% endfor %}<|im_end|>\n{% endif %}" + original)
    try:
        env_cfg = EnvConfig(max_turns=3, max_turn_tokens=24, max_episode_tokens=120, truncated_reward="keep")
        rows = [{"prompt": f"what is {i}", "id": i} for i in range(8)]
        episodes = run_episodes(chat_policy.backend, chat_policy.prompt_format, ToolChat, rows, env_cfg,
                                chat_policy.cfg, 0)
        assert all(e.prompt_text.startswith("<|im_start|>system\nTools: lookup<|im_end|>\n") for e in episodes)
        several = [e for e in episodes if e.turns > 1]
        assert several
        for e in several:      # the strict check rendered the conversation with the same tools
            last = spans(e.loss_mask)[-1][0]
            assert tok.decode(e.prompt_ids + e.ids[:last], clean_up_tokenization_spaces=False) == \
                tok.apply_chat_template(e.messages, tools=ToolChat.schemas, tokenize=False, add_generation_prompt=True)
    finally:
        tok.chat_template = original
