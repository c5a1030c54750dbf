"""Environments and tools without a model: schemas from signatures, the text protocol, tool errors, names."""
from __future__ import annotations

import pytest

from pipeline.envs import ENVIRONMENTS, EnvironmentLoadError, StepResult, ToolEnvironment, resolve_environment, tool_schema
from pipeline.envs.base import as_step_result
from pipeline.envs.tools import parse_call

pytestmark = pytest.mark.unit


def lookup(key: str, default: int = 0) -> int:
    """The value stored under a key.

    Args:
        key: the name to look up
        default (int): returned when the key is missing
    """
    return {"b7": 42}.get(key, default)


def divide(a: int, b: int) -> float:
    """a / b."""
    return a / b


class Arithmetic(ToolEnvironment):
    stop_errors = (OverflowError,)

    def default_tools(self):
        return [lookup, divide, self.explode]

    def explode(self) -> None:
        """Always too big."""
        raise OverflowError("too big")

    def score(self, answer, row):
        return float(answer == row["answer"])


def test_a_tools_schema_comes_from_its_signature_and_docstring():
    assert tool_schema(lookup) == {"type": "function", "function": {
        "name": "lookup", "description": "The value stored under a key.",
        "parameters": {"type": "object", "required": ["key"], "properties": {
            "key": {"type": "string", "description": "the name to look up"},
            "default": {"type": "integer", "description": "returned when the key is missing"}}}}}
    assert tool_schema(divide)["function"]["parameters"]["properties"]["b"] == {"type": "integer"}


def test_calls_are_literals_never_code():
    assert parse_call('I will look. <call>lookup("b7", default=3)</call>') == ("lookup", ["b7"], {"default": 3})
    assert parse_call("the answer is 5") is None
    with pytest.raises(ValueError, match="not Python literals"):
        parse_call("<call>lookup(__import__('os'))</call>")


def test_tool_results_errors_and_stop_errors_as_observations():
    env = Arithmetic()
    assert env.reset({"prompt": "what is b7?", "answer": "42"}, seed=0) == "what is b7?"
    ok = env.step('<call>lookup("b7")</call>')
    assert (ok.observation, ok.done, ok.info) == ("<result>42</result>", False, {"tool_calls": 1, "tool_errors": 0})
    err = env.step("<call>divide(1, 0)</call>")         # the model reads the error and goes on
    assert err.observation == "<error>ZeroDivisionError: division by zero</error>" and not err.done
    assert err.info["tool_errors"] == 1
    missing = env.step("<call>search(1)</call>")
    assert "no tool 'search'" in missing.observation and missing.info["tool_errors"] == 1
    bad = env.step("<call>lookup(os.system)</call>")
    assert "not Python literals" in bad.observation and not bad.done
    stopped = env.step("<call>explode()</call>")        # a stop error ends the episode
    assert stopped.done and stopped.info["stopped_by"] == "OverflowError"
    assert env.step("<answer>42</answer>") == StepResult(reward=1.0, done=True)
    assert env.step("41").reward == 0.0                  # a turn without a call is the final answer
    assert [s["function"]["name"] for s in env.schemas] == ["lookup", "divide", "explode"]


def test_a_gymnasium_tuple_is_a_step_result_and_anything_else_is_refused():
    assert as_step_result(("obs", 1, False, True, None)) == StepResult("obs", 1.0, False, True, {})
    with pytest.raises(TypeError, match="return a StepResult"):
        as_step_result({"observation": "x"})


def test_environments_by_name_or_module_class_from_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "my_envs.py").write_text(
        "class Echo:\n    def reset(self, row, seed):\n        return row['prompt']\n"
        "    def step(self, action):\n        return (action, 0.0, True, False, {})\n"
        "class NotAnEnv:\n    pass\n")
    monkeypatch.chdir(tmp_path)
    assert resolve_environment("my_envs:Echo")().step("hi") == ("hi", 0.0, True, False, {})
    assert resolve_environment("reward_functions") is ENVIRONMENTS.get("reward_functions")
    with pytest.raises(EnvironmentLoadError, match="has no reset or step"):
        resolve_environment("my_envs:NotAnEnv")
    with pytest.raises(EnvironmentLoadError, match="cannot import module 'nowhere'"):
        resolve_environment("nowhere:Env")
    with pytest.raises(EnvironmentLoadError, match="not registered"):
        resolve_environment("echo")


def test_a_single_turn_reward_function_is_the_one_step_environment():
    env = resolve_environment("reward_functions")(functions=("exact_match",))
    assert env.reset({"prompt": "2+2=", "answer": "4"}, seed=0) == "2+2="
    assert env.step("4") == StepResult(reward=1.0, done=True)
    env.reset({"prompt": "2+3=", "answer": "5"}, seed=0)
    assert env.step("4").reward == 0.0
    weighted = resolve_environment("reward_functions")(functions=("exact_match", "format_number"), weights=[2.0, 0.5])
    weighted.reset({"prompt": "2+2=", "answer": "4"}, seed=0)
    assert weighted.step("4").reward == 2.0 * 1.0 + 0.5 * 1.0

