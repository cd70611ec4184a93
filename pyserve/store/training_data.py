"""Fine-tuning data as the OpenAI platform takes it, checked line by line: JSONL whose lines are
chat examples {"messages": [...]} ending with the assistant's turn (supervised), or preference
examples {"input": {"messages": [...]}, "preferred_output": [...], "non_preferred_output": [...]}
(DPO). A bad line is refused with its number and what is wrong."""

import json

from ..errors import InvalidParameter

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_LINES = 100_000


def check(data: bytes, field: str = "file") -> int:
    """The number of examples; InvalidParameter naming `field` and the first bad line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidParameter(field, "is not UTF-8 text (JSONL expected)") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        raise InvalidParameter(field, "has no examples")
    if len(lines) > MAX_LINES:
        raise InvalidParameter(field, f"has {len(lines)} examples; at most {MAX_LINES} are taken")
    for n, line in lines:
        problem = _problem(line)
        if problem:
            raise InvalidParameter(field, f"line {n}: {problem}")
    return len(lines)


def _problem(line: str) -> str | None:
    try:
        example = json.loads(line)
    except json.JSONDecodeError as exc:
        return f"not valid JSON ({exc.msg})"
    if not isinstance(example, dict):
        return "each line must be a JSON object"
    if "messages" in example:
        return _messages_problem(example["messages"], ends_with_assistant=True)
    if "input" in example:
        messages = example["input"].get("messages") if isinstance(example["input"], dict) else None
        problem = _messages_problem(messages, ends_with_assistant=False)
        if problem:
            return f"input: {problem}"
        for key in ("preferred_output", "non_preferred_output"):
            output = example.get(key)
            if (not isinstance(output, list) or not output
                    or any(not isinstance(m, dict) or m.get("role") != "assistant" for m in output)):
                return f"{key} must be a list of assistant messages"
        return None
    return 'a line needs "messages" (supervised) or "input", "preferred_output" and "non_preferred_output" (DPO)'


def _messages_problem(messages, ends_with_assistant: bool) -> str | None:
    if not isinstance(messages, list) or not messages:
        return "messages must be a non-empty list"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            return f"messages[{i}] has an unknown role {m.get('role') if isinstance(m, dict) else m!r}"
        content = m.get("content")
        if not isinstance(content, (str, list)) and not (content is None and m.get("tool_calls")):
            return f"messages[{i}].content must be a string or a list of parts"
    if ends_with_assistant and messages[-1].get("role") != "assistant":
        return "the last message must be the assistant's (the answer to learn)"
    return None
