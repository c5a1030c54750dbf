"""Tools: typed Python functions an agent calls, with a schema taken from their signature and docstring, and a
text protocol for models without a tool-call parser (the small models built here).

The protocol, one call per turn, closed by a stop string so generation ends right after it:

    model:        ...<call>lookup("b7")</call>          arguments are Python literals, never evaluated code
    environment:  <result>42</result>                   or <error>KeyError: 'b7'</error> when the tool raised
    model:        ...<answer>84</answer>                ends the episode; `score` pays it

A turn that ends without a call (EOS, or the turn's token budget) is the final answer as it stands.
"""
from __future__ import annotations

import ast
import inspect
import re
import typing
from typing import Callable, Optional

from pipeline.envs.base import Observation, StepResult

CALL_OPEN, CALL_CLOSE = "<call>", "</call>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
_CALL = re.compile(r"<call>\s*([A-Za-z_]\w*)\s*\((.*)\)\s*</call>\s*$", re.S)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)
_JSON_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean", list: "array", dict: "object"}


def tool_schema(fn: Callable) -> dict:
    """The OpenAI / chat-template `tools` entry of a typed function: name, the docstring's first paragraph as its
    description, each parameter's JSON type from its annotation and its text from a Google-style `Args:`
    section, and the parameters without a default as required."""
    doc = inspect.getdoc(fn) or ""
    description = doc.split("\n\n")[0].replace("\n", " ").strip()
    arg_docs = dict(re.findall(r"^\s+(\w+)(?:\s*\([^)]*\))?:\s*(.+)$", doc.split("Args:", 1)[1], re.M)) \
        if "Args:" in doc else {}
    hints = typing.get_type_hints(fn)
    properties, required = {}, []
    for name, param in inspect.signature(fn).parameters.items():
        tp = typing.get_origin(hints.get(name)) or hints.get(name)
        prop = {"type": _JSON_TYPES.get(tp, "string")}
        if name in arg_docs:
            prop["description"] = arg_docs[name].strip()
        properties[name] = prop
        if param.default is inspect.Parameter.empty:
            required.append(name)
    return {"type": "function", "function": {"name": fn.__name__, "description": description,
                                             "parameters": {"type": "object", "properties": properties,
                                                            "required": required}}}


def parse_call(action: str) -> Optional[tuple[str, list, dict]]:
    """(name, args, kwargs) of a turn that ends in `<call>name(...)</call>`; None when it holds no call.
    Raises ValueError when the call is there but its arguments are not Python literals."""
    m = _CALL.search(action)
    if m is None:
        return None
    name, arg_text = m.group(1), m.group(2)
    try:
        call = ast.parse(f"f({arg_text})", mode="eval").body
        args = [ast.literal_eval(a) for a in call.args]
        kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    except (SyntaxError, ValueError) as err:
        raise ValueError(f"arguments of {name} are not Python literals: {arg_text!r}") from err
    return name, args, kwargs


def parse_answer(action: str) -> str:
    """The text inside `<answer>...</answer>`, else the whole turn stripped."""
    m = _ANSWER.search(action)
    return (m.group(1) if m else action).strip()


class ToolEnvironment:
    """An environment over typed tools. Subclass it and give `tools` (functions or bound methods), `task`
    (the first observation of a row) and `score` (the reward of the final answer); `stop_errors` are exception
    types that end the episode instead of going back to the model as an `<error>` observation."""

    stop = [CALL_CLOSE, ANSWER_CLOSE]
    stop_errors: tuple[type[BaseException], ...] = ()

    def __init__(self, tools: Optional[list[Callable]] = None,
                 stop_errors: Optional[tuple[type[BaseException], ...]] = None):
        self.tools = {fn.__name__: fn for fn in (tools if tools is not None else self.default_tools())}
        if stop_errors is not None:
            self.stop_errors = stop_errors
        self.row: dict = {}

    def default_tools(self) -> list[Callable]:
        return []

    @property
    def schemas(self) -> list[dict]:
        """The tools as a chat template's `tools` argument."""
        return [tool_schema(fn) for fn in self.tools.values()]

    def task(self, row: dict, seed: int) -> Observation:
        return row["prompt"]

    def score(self, answer: str, row: dict) -> float:
        raise NotImplementedError("a ToolEnvironment scores the final answer: define score(answer, row)")

    def reset(self, row: dict, seed: int) -> Observation:
        self.row = row
        return self.task(row, seed)

    def step(self, action: str) -> StepResult:
        try:
            call = parse_call(action)
        except ValueError as err:
            return StepResult(f"<error>{err}</error>", info={"tool_calls": 1, "tool_errors": 1})
        if call is None:
            return StepResult(reward=float(self.score(parse_answer(action), self.row)), done=True)
        name, args, kwargs = call
        info = {"tool_calls": 1, "tool_errors": 0}
        if name not in self.tools:
            info["tool_errors"] = 1
            return StepResult(f"<error>no tool {name!r}; tools: {', '.join(self.tools)}</error>", info=info)
        try:
            result = self.tools[name](*args, **kwargs)
        except self.stop_errors as err:
            info.update(tool_errors=1, stopped_by=type(err).__name__)
            return StepResult(f"<error>{type(err).__name__}: {err}</error>", done=True, info=info)
        except Exception as err:  # a tool's failure is the model's to read and react to
            info["tool_errors"] = 1
            return StepResult(f"<error>{type(err).__name__}: {err}</error>", info=info)
        return StepResult(f"<result>{result}</result>", info=info)

    def close(self) -> None:
        pass


def describe_tools(tools: list[Callable]) -> str:
    """One line per tool, `name(param: type, ...) - description`, for a text prompt."""
    lines = []
    for fn in tools:
        f = tool_schema(fn)["function"]
        params = ", ".join(f"{k}: {v['type']}" for k, v in f["parameters"]["properties"].items())
        lines.append(f"{f['name']}({params}) - {f['description']}")
    return "\n".join(lines)


__all__ = ["ToolEnvironment", "tool_schema", "parse_call", "parse_answer", "describe_tools"]
