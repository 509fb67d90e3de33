"""The built-in tool loop (`--max-turns N --tools module.fn ...`), itself a custom generation function.

    model turn (ends at </tool_call> or end-of-sequence) -> parse Qwen3/hermes tool calls from its text
        -> run each tool under --tool-timeout-s -> append the observations as one tool turn, then the assistant
        opener -> next model turn ... until a turn calls no tool (completed), --max-turns (truncated) or the
        response budget (--rollout-max-response-len, truncated)

A tool is `fn(**arguments) -> str`, named by its function name. A call that cannot be parsed, names no tool, raises
or does not answer in time becomes an error observation and counts in rollout/tool_failures; none stops the run.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass

from ..plugins import load_function
from .trajectory import Trajectory

TOOL_CALL_END = "</tool_call>"
TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_SENTINEL = "\x00vime-assistant-turn\x00"


@dataclass
class ToolCall:
    name: str
    arguments: dict


def parse_tool_calls(text: str) -> tuple[list[ToolCall], list[str]]:
    """The `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` calls in `text`, and an error message for each
    one that is not such JSON."""
    calls, errors = [], []
    for body in TOOL_CALL.findall(text):
        try:
            call = json.loads(body)
        except ValueError as e:
            errors.append(f"error: the tool call is not JSON ({e})")
            continue
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or \
                not isinstance(call.get("arguments", {}), dict):
            errors.append('error: a tool call must be {"name": "...", "arguments": {...}}')
            continue
        calls.append(ToolCall(call["name"], call.get("arguments", {})))
    return calls, errors


async def call_tool(fn: Callable[..., object], arguments: dict, timeout_s: float) -> tuple[str, bool]:
    """`fn(**arguments)` in a thread of its own, as (observation, succeeded). A tool that hangs is abandoned (Python
    cannot stop a thread; it is a daemon, so it does not hold the process at exit)."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(result: tuple[str, bool]) -> None:
        if not future.done():
            future.set_result(result)

    def work() -> None:
        try:
            result = (str(fn(**arguments)), True)
        except Exception as e:  # a tool's failure is the model's observation
            result = (f"error: {type(e).__name__}: {e}", False)
        try:
            loop.call_soon_threadsafe(settle, result)
        except RuntimeError:  # the loop closed: the call was abandoned long ago
            pass

    threading.Thread(target=work, daemon=True, name="vime-tool").start()
    try:
        return await asyncio.wait_for(future, timeout_s)
    except TimeoutError:
        return f"error: the tool did not answer within {timeout_s} s", False


def tool_turn_text(tokenizer, observations: list[str]) -> str:
    """The text after a model turn that called tools: its close, one tool message per observation and the next
    assistant opener, rendered with the tokenizer's chat template (as the part of a rendered conversation after an
    assistant message), else a plain `<tool_response>` wrapper."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": "?"}, {"role": "assistant", "content": _SENTINEL},
                    *({"role": "tool", "content": o} for o in observations)]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:  # a template that refuses this shape: fall back to the wrapper
            text = ""
        if _SENTINEL in text:
            return text.split(_SENTINEL, 1)[1]
    return "".join(f"\n<tool_response>\n{o}\n</tool_response>" for o in observations) + "\n"


class ToolLoop:
    """`async (record, sampling, tokenizer, client) -> Trajectory` (README "Multi-turn and tools")."""

    def __init__(self, tools: dict[str, Callable[..., object]], max_turns: int, timeout_s: float,
                 max_tokens_per_turn: int | None = None) -> None:
        """`max_tokens_per_turn`: a model turn's own cap (default: only the response budget)."""
        self.tools, self.max_turns, self.timeout_s = tools, max_turns, timeout_s
        self.max_tokens_per_turn = max_tokens_per_turn

    @classmethod
    def of(cls, rollout) -> ToolLoop:
        """From --tools, --max-turns and --tool-timeout-s."""
        tools = {}
        for path in rollout.tools or []:
            fn = load_function(path, "--tools")
            name = getattr(fn, "__name__", path)
            if name in tools:
                raise ValueError(f"--tools {path}: a second tool named {name!r}; tools are called by function name")
            tools[name] = fn
        return cls(tools, rollout.max_turns, rollout.tool_timeout_s)

    def tool_calls(self, text: str) -> tuple[list[ToolCall], list[str]]:
        """The calls in one model turn's text (a subclass may parse another format)."""
        return parse_tool_calls(text)

    async def run_tools(self, calls: list[ToolCall]) -> list[tuple[str, bool]]:
        async def one(call: ToolCall) -> tuple[str, bool]:
            fn = self.tools.get(call.name)
            if fn is None:
                return f"error: no tool named {call.name!r}; tools: {', '.join(self.tools) or 'none'}", False
            return await call_tool(fn, call.arguments, self.timeout_s)

        return list(await asyncio.gather(*(one(c) for c in calls)))

    async def __call__(self, record, sampling: dict, tokenizer, client) -> Trajectory:
        trajectory = Trajectory([], [], [])
        overrides = {"stop": [*(sampling.get("stop") or []), TOOL_CALL_END], "include_stop_str_in_output": True}
        if self.max_tokens_per_turn is not None:
            overrides["max_tokens"] = self.max_tokens_per_turn
        for turn in range(self.max_turns):
            out = await client.generate(record.prompt_ids + trajectory.response_ids, overrides)
            trajectory.append(out.token_ids, out.logprobs)
            # "length" without a turn cap: the response budget is spent (with one, the next call says so)
            if not out.token_ids or (out.finish_reason == "length" and self.max_tokens_per_turn is None):
                trajectory.status = "truncated"
                break
            calls, errors = self.tool_calls(tokenizer.decode(out.token_ids))
            if not calls and not errors:
                break  # the model answered
            if turn == self.max_turns - 1:
                trajectory.status = "truncated"  # it still calls tools, with no turn left
                break
            results = [(e, False) for e in errors] + await self.run_tools(calls)
            trajectory.num_tool_calls += len(results)
            trajectory.num_tool_failures += sum(not ok for _, ok in results)
            text = tool_turn_text(tokenizer, [observation for observation, _ in results])
            eos = tokenizer.eos_token
            if eos and out.token_ids[-1] == tokenizer.eos_token_id and text.startswith(eos):
                text = text[len(eos):]  # the model closed its turn itself
            trajectory.append(tokenizer.encode(text, add_special_tokens=False))
        return trajectory
