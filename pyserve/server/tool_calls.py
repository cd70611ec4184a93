"""Tool calling for the chat API: tools into the prompt, calls out of the model's text.

A model learns one way of writing calls from its chat template; `call_format` picks it from the
template: Hermes / Qwen2 style (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`) or
Llama 3 JSON (`{"name": ..., "parameters": {...}}`). A template that never mentions tools gets
them in a system message that teaches the Hermes style. `tool_choice` "required" or a named
function is enforced with a grammar (structured output), so such a call always parses and its
arguments match the function's JSON schema; "auto" parses whatever calls the text holds.
"""

import json
import re
import uuid
from dataclasses import dataclass

from ..engine.llm.structured import JSON_OPTIONS
from ..errors import InvalidParameter
from ..tokenizer import Tokenizer


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as the OpenAI API carries it

    def to_openai(self) -> dict:
        return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


def tools_of(body: dict) -> list[dict]:
    """The request's `tools`, checked: OpenAI function tools with names and object schemas."""
    tools = body.get("tools")
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise InvalidParameter("tools", "must be a list")
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise InvalidParameter("tools", f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}")
        if not isinstance(fn.get("name"), str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", fn["name"]):
            raise InvalidParameter("tools", f"tools[{i}].function.name must be 1-64 letters, digits, _ . or -")
        if not isinstance(fn.get("parameters", {}), dict):
            raise InvalidParameter("tools", f"tools[{i}].function.parameters must be a JSON schema object")
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise InvalidParameter("tools", "function names must be unique")
    return tools


def choice_of(body: dict, tools: list[dict]) -> str | None:
    """"auto", "none", "required" or a function's name; None when the request has no tools."""
    choice = body.get("tool_choice")
    if not tools:
        if choice not in (None, "none"):
            raise InvalidParameter("tool_choice", "needs `tools`")
        return None
    if choice is None:
        return "auto"
    if choice in ("auto", "none", "required"):
        return choice
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(name, str):
        raise InvalidParameter("tool_choice", "must be auto, none, required or {'type': 'function', "
                                              "'function': {'name': ...}}")
    if name not in {t["function"]["name"] for t in tools}:
        raise InvalidParameter("tool_choice", f"names {name!r}, which is not among the tools")
    return name


class CallFormat:
    """How a model writes tool calls; subclasses fill in the syntax."""

    arguments_key = "arguments"

    def call_schema(self, tools: list[dict]) -> dict:
        """JSON schema of one call to any of `tools`, with arguments matching its parameters."""
        calls = [{"type": "object", "additionalProperties": False, "required": ["name", self.arguments_key],
                  "properties": {"name": {"const": t["function"]["name"]},
                                 self.arguments_key: t["function"].get("parameters") or {"type": "object"}}}
                 for t in tools]
        # Compact JSON, as response_format gets (a grammar's %json defaults to free whitespace).
        return {"x-guidance": JSON_OPTIONS, **(calls[0] if len(calls) == 1 else {"anyOf": calls})}

    def grammar(self, tools: list[dict], parallel: bool) -> str:
        """A Lark grammar (llguidance dialect) whose every sentence is one or more valid calls."""
        raise NotImplementedError

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """The content outside calls (None if only whitespace) and the calls, in order."""
        raise NotImplementedError

    def content_end(self, text: str) -> int:
        """While streaming: how much of `text` is surely content, not the start of a call."""
        raise NotImplementedError

    def complete_calls(self, text: str) -> list[ToolCall]:
        """While streaming: the calls in `text` that can no longer change."""
        return []

    def so_far(self, text: str, finished: bool) -> tuple[str, list[ToolCall]]:
        """A streamed reply's content and calls that can be shown now: all of it once finished
        (text that parses to no call stays content), else the sure content and complete calls."""
        if finished:
            content, found = self.parse(text)
            return (text, []) if not found else (content or "", found)
        return text[:self.content_end(text)], self.complete_calls(text)

    def _call(self, payload: str) -> ToolCall | None:
        try:
            obj = json.loads(payload)
        except ValueError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        args = obj.get(self.arguments_key, obj.get("arguments", {}))
        return ToolCall(obj["name"], args if isinstance(args, str) else json.dumps(args))


class HermesFormat(CallFormat):
    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def grammar(self, tools, parallel):
        return _call_grammar(f'"{self.OPEN}\\n" %json{json.dumps(self.call_schema(tools))} "\\n{self.CLOSE}"',
                             '"\\n"', parallel)

    def parse(self, text):
        calls, content, at = [], [], 0
        for match in re.finditer(rf"{self.OPEN}(.*?)(?:{self.CLOSE}|$)", text, re.DOTALL):
            call = self._call(match.group(1).strip())
            if call is None:
                continue
            calls.append(call)
            content.append(text[at:match.start()])
            at = match.end()
        content.append(text[at:])
        rest = "".join(content)
        return (rest if rest.strip() else None), calls

    def complete_calls(self, text):
        end = text.rfind(self.CLOSE)
        return self.parse(text[:end + len(self.CLOSE)])[1] if end >= 0 else []

    def content_end(self, text):
        start = text.find(self.OPEN)
        if start >= 0:
            return start
        for keep in range(min(len(self.OPEN) - 1, len(text)), 0, -1):  # a tag may be arriving
            if self.OPEN.startswith(text[-keep:]):
                return len(text) - keep
        return len(text)


class Llama3JsonFormat(CallFormat):
    """Llama 3.1+ JSON calls: the reply is the call (after an optional <|python_tag|>); several are
    separated by '; '."""

    arguments_key = "parameters"
    TAG = "<|python_tag|>"

    def grammar(self, tools, parallel):
        return _call_grammar(f"%json{json.dumps(self.call_schema(tools))}", '"; "', parallel)

    def parse(self, text):
        body = text.strip().removeprefix(self.TAG).strip()
        if not body.startswith("{"):
            return (text if text.strip() else None), []
        decoder, calls, at = json.JSONDecoder(), [], 0
        while at < len(body):
            try:
                obj, end = decoder.raw_decode(body, at)
            except ValueError:
                break
            call = self._call(json.dumps(obj))
            if call is None:
                break
            calls.append(call)
            at = end
            while at < len(body) and body[at] in "; \n":
                at += 1
        return (None if calls else text), calls

    def content_end(self, text):
        stripped = text.lstrip()
        if not stripped or stripped.startswith(("{", self.TAG[:len(stripped)])):
            return 0  # maybe a call: hold it until the end
        return len(text)


def _call_grammar(call: str, separator: str, parallel: bool) -> str:
    """Lark: one call, or several with `separator` (a Lark literal) between them."""
    start = f"start: call ({separator} call)*" if parallel else "start: call"
    return f"{start}\ncall: {call}\n"


HERMES, LLAMA3_JSON = HermesFormat(), Llama3JsonFormat()


def call_format(tokenizer: Tokenizer) -> CallFormat:
    template = tokenizer.chat_template or ""
    if "<|python_tag|>" in template or ("ipython" in template and "parameters" in template):
        return LLAMA3_JSON
    return HERMES


def teaches_tools(tokenizer: Tokenizer) -> bool:
    """Whether the chat template renders `tools` itself."""
    return "tools" in (tokenizer.chat_template or "")


def with_tool_prompt(messages: list[dict], tools: list[dict]) -> list[dict]:
    """Messages for a template that knows nothing of tools: the tools and the Hermes call syntax in
    the system message, earlier calls written into their assistant turns."""
    prompt = ("You may call these functions. To call one, reply with\n<tool_call>\n"
              '{"name": <function name>, "arguments": <arguments as a JSON object>}\n</tool_call>\n'
              "Functions:\n" + "\n".join(json.dumps(t["function"]) for t in tools))
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = "".join(f"{HermesFormat.OPEN}\n{json.dumps(_hermes_call(c))}\n{HermesFormat.CLOSE}"
                            for c in m["tool_calls"])
            m = _with_text(m, calls)
        out.append(m)
    if out and out[0]["role"] == "system":
        return [_with_text(out[0], f"\n\n{prompt}")] + out[1:]
    return [{"role": "system", "content": prompt}] + out


def _hermes_call(call: dict) -> dict:
    return {"name": call["function"]["name"], "arguments": call["function"]["arguments"]}


def _with_text(message: dict, text: str) -> dict:
    """The message with text appended, whether its content is a string or a list of parts."""
    content = message.get("content") or ""
    if isinstance(content, list):
        return {**message, "content": content + [{"type": "text", "text": text}]}
    return {**message, "content": content + text}
