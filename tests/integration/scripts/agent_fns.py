"""Generation functions for tests/integration/test_agentic_e2e.py. The tiny model is random, so its text never holds
a tool call: the scripted loop's parser calls three tools after every model turn whatever the model wrote."""

from __future__ import annotations

import time

from vime_spmd.rollout.tools import ToolCall, ToolLoop


def lookup(key: str) -> str:
    return f"value of {key}"


def broken() -> str:
    raise ValueError("the tool broke")


def stuck() -> str:
    time.sleep(3600)  # abandoned at the timeout (a daemon thread)
    return "never"


class ScriptedToolLoop(ToolLoop):
    def tool_calls(self, text: str) -> tuple[list[ToolCall], list[str]]:
        return [ToolCall("lookup", {"key": "x"}), ToolCall("broken", {}), ToolCall("stuck", {})], []


# 3 model turns of at most 4 tokens; 2 tool turns between them, each with 1 good and 2 failing calls
scripted_tools = ScriptedToolLoop({"lookup": lookup, "broken": broken, "stuck": stuck}, max_turns=3, timeout_s=0.5,
                                  max_tokens_per_turn=4)
