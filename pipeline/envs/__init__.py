"""Environments: multi-turn episodes and tools behind a Gymnasium-shaped interface (`base`), typed tools and their text
protocol (`tools`); the generator's agent loop (`pipeline.rollout.agent`) steps them, one instance per episode."""
from pipeline.envs.base import ENVIRONMENTS, Environment, EnvironmentLoadError, StepResult, resolve_environment
from pipeline.envs.tools import ToolEnvironment, tool_schema

__all__ = ["ENVIRONMENTS", "Environment", "EnvironmentLoadError", "StepResult", "resolve_environment",
           "ToolEnvironment", "tool_schema"]
