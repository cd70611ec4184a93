"""The LLM features applications build on: prompt logprobs and echo (checked against transformers),
structured output (outputs validated against their schemas with jsonschema), and tool calling
through the official `openai` SDK."""

import json

import jsonschema
import openai
import pytest
import torch

from pyserve import LLM, SamplingParams
from pyserve.client import Client
from pyserve.engine.llm import StructuredOutput
from pyserve.errors import InvalidParameter

from conftest import serving
from tiny_models import load_reference

SCHEMAS = {
    "flat": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                             "age": {"type": "integer", "minimum": 0, "maximum": 120}},
             "required": ["name", "age"], "additionalProperties": False},
    "nested_optional": {"type": "object", "additionalProperties": False, "required": ["user"],
                        "properties": {"user": {"type": "object", "additionalProperties": False,
                                                "required": ["id"],
                                                "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9999},
                                                               "admin": {"type": "boolean"}}},
                                       "note": {"type": "string", "maxLength": 4}}},
    "array_enum": {"type": "object", "additionalProperties": False, "required": ["tags", "level"],
                   "properties": {"tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                                           "minItems": 1, "maxItems": 3},
                                  "level": {"enum": ["low", "high", 3]}}},
    "bounded_numbers": {"type": "object", "additionalProperties": False, "required": ["x", "p"],
                        "properties": {"x": {"type": "number", "minimum": -2.5, "maximum": 2.5, "multipleOf": 0.25},
                                       "p": {"type": "integer", "exclusiveMinimum": 0, "maximum": 9}}},
    "array_of_objects": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "additionalProperties": False, "required": ["k"],
        "properties": {"k": {"type": "integer", "minimum": 0, "maximum": 99}}}},
}
PROMPTS = ["Hello world", "Once upon a time", "The quick brown fox"]


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(tiny_llama_dir, device="cpu")


# -- prompt logprobs and echo --------------------------------------------------------------------

def expected_prompt_logprobs(model_dir, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = load_reference(model_dir)(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, -1)


@pytest.mark.parametrize("engine_args", [{}, {"max_num_batched_tokens": 5, "block_size": 4}],
                         ids=["one-step", "chunked-prefill"])
def test_prompt_logprobs_match_transformers(tiny_llama_dir, engine_args):
    llm = LLM(tiny_llama_dir, device="cpu", **engine_args)
    prompt = "The quick brown fox jumps over the lazy dog. Hello world"
    ids = llm.engine.tokenizer.encode(prompt)
    want = expected_prompt_logprobs(tiny_llama_dir, ids)
    llm.generate(prompt, SamplingParams(max_tokens=2, temperature=0))  # the prompt is now in the prefix cache
    outs = llm.generate([prompt, prompt], [SamplingParams(max_tokens=0, prompt_logprobs=3),
                                           SamplingParams(max_tokens=3, prompt_logprobs=0, temperature=0)])
    for out in outs:
        got = out.prompt_logprobs
        assert got[0] is None and len(got) == len(ids)
        scored = torch.tensor([e["logprob"] for e in got[1:]])
        torch.testing.assert_close(scored, want[torch.arange(len(ids) - 1), ids[1:]], atol=1e-4, rtol=0)
    top = outs[0].prompt_logprobs[5]["top"]
    best = torch.topk(want[4], 3)
    assert list(top) == best.indices.tolist()
    torch.testing.assert_close(torch.tensor(list(top.values())), best.values, atol=1e-4, rtol=0)
    assert outs[0].token_ids == [] and outs[0].outputs[0].finish_reason == "length"
    assert len(outs[1].token_ids) == 3


# -- structured output, offline --------------------------------------------------------------------

@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_outputs_validate_greedy_and_seeded(llm, name):
    schema = SCHEMAS[name]
    params = [SamplingParams(max_tokens=120, temperature=0, structured=StructuredOutput(json=schema))]
    params += [SamplingParams(max_tokens=120, temperature=1.0, seed=s, structured=StructuredOutput(json=schema))
               for s in range(4)]
    outs = llm.generate([PROMPTS[i % 3] for i in range(len(params))], params)
    for out in outs:
        assert out.outputs[0].finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), schema)


def test_a_strict_json_schema_allows_only_the_properties_it_lists(llm):
    """OpenAI's `strict`: objects have exactly their listed properties (additionalProperties false
    implied, nested ones too); without it JSON Schema lets others in. Checked on the compiled
    grammar, token by token, as the engine's matcher takes them."""
    from pyserve.engine.llm.structured import GrammarCompiler
    from pyserve.server.adapters import structured_output
    compiler = GrammarCompiler(llm.engine.tokenizer, llm.engine.model.spec.vocab_size)
    schema = {"type": "object", "required": ["user"],
              "properties": {"user": {"type": "object", "properties": {"name": {"type": "string"}}}}}

    def accepts(text: str, strict: bool) -> bool:
        fields = {"response_format": {"type": "json_schema",
                                      "json_schema": {"name": "u", "schema": schema, "strict": strict}}}
        matcher = compiler.matcher(structured_output(fields))
        return all(matcher.consume_token(t) for t in compiler.tokenizer.tokenize_str(text)) and matcher.is_accepting()

    for text in ('{"user": {"name": "a"}}', '{"user": {}}'):
        assert accepts(text, strict=True) and accepts(text, strict=False)
    for text in ('{"user": {"name": "a"}, "extra": 1}', '{"user": {"name": "a", "extra": 1}}'):
        assert accepts(text, strict=False) and not accepts(text, strict=True)


def test_constrained_and_free_rows_share_a_batch(llm):
    free = [SamplingParams(max_tokens=12, temperature=t, seed=5, ignore_eos=True) for t in (0.0, 1.0)]
    alone = llm.generate(PROMPTS[:2], free)
    constrained = [SamplingParams(max_tokens=60, temperature=1.0, seed=s, structured=StructuredOutput(json=schema))
                   for s, schema in enumerate(SCHEMAS.values())]
    mixed = llm.generate(PROMPTS[:2] + [PROMPTS[2]] * len(constrained), free + constrained)
    assert [o.token_ids for o in mixed[:2]] == [o.token_ids for o in alone]  # unconstrained rows untouched
    for out, schema in zip(mixed[2:], SCHEMAS.values()):
        jsonschema.validate(json.loads(out.text), schema)


def test_regex_choice_grammar_and_json_object(llm):
    def run(temperature=1.0, **constraint):
        params = [SamplingParams(max_tokens=40, temperature=temperature, seed=s,
                                 structured=StructuredOutput(**constraint)) for s in range(3)]
        return [o.text for o in llm.generate([PROMPTS[0]] * 3, params)]

    import re
    assert all(re.fullmatch(r"[0-9]{3}-[a-z]{2,5}", t) for t in run(regex=r"[0-9]{3}-[a-z]{2,5}"))
    assert set(run(choice=("yes", "no", 'say "maybe"'))) <= {"yes", "no", 'say "maybe"'}
    lark = 'start: "(" item ("," item)* ")"\nitem: /[a-c]/ | start'
    assert all(re.fullmatch(r"[(),a-c]+", t) and t.count("(") == t.count(")") for t in run(grammar=lark))
    gbnf = 'root ::= "on" | "off"'
    assert set(run(grammar=gbnf)) <= {"on", "off"}
    for text in run(temperature=0.5, json_object=True):  # free-form keys: a random model at T=1 rambles
        assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("constraint,field", [
    (dict(regex="([a-z]", field="guided_regex"), "guided_regex"),
    (dict(json={"type": "nonsense"}, field="response_format"), "response_format"),
    (dict(grammar="start: undefined_rule", field="guided_grammar"), "guided_grammar"),
    (dict(choice=(), field="guided_choice"), "guided_choice"),
    (dict(regex="a", choice=("b",)), "structured_output"),
])
def test_invalid_constraints_name_their_field(llm, constraint, field):
    with pytest.raises(InvalidParameter, match=f"^{field}:"):
        llm.generate("Hi", SamplingParams(structured=StructuredOutput(**constraint)))
    assert not llm.engine.has_unfinished()


# -- through the servers ---------------------------------------------------------------------------

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                       "properties": {"city": {"enum": ["Paris", "Tokyo"]}, "unit": {"enum": ["C", "F"]}}}}},
    {"type": "function", "function": {
        "name": "add", "description": "Add two small integers",
        "parameters": {"type": "object", "additionalProperties": False, "required": ["a", "b"],
                       "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                      "b": {"type": "integer", "minimum": 0, "maximum": 9}}}}},
]
# A Hermes-style template written for this test: tools in the system turn, calls and results in
# the history.
HERMES_TEMPLATE = (
    "{% if tools %}<|system|>Tools:{% for t in tools %}\n{{ t | tojson }}{% endfor %}</s>{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'tool' %}<|tool|><tool_response>{{ m['content'] }}</tool_response></s>"
    "{% else %}<|{{ m['role'] }}|>{{ m['content'] or '' }}{% for c in m.get('tool_calls') or [] %}<tool_call>\n"
    "{{ {'name': c['function']['name'], 'arguments': c['function']['arguments']} | tojson }}\n</tool_call>"
    "{% endfor %}</s>{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key="none", max_retries=0, timeout=60)


def test_lm_eval_loglikelihood_request_shape(client, tiny_llama_dir, llm):
    """lm-evaluation-harness scores continuations with echo, logprobs=1 and max_tokens 0 (or 1)."""
    context, continuation = "The quick brown fox", " jumps over the lazy dog"
    ids = llm.engine.tokenizer.encode(context + continuation)
    want = expected_prompt_logprobs(tiny_llama_dir, ids)
    for max_tokens in (0, 1):
        resp = client.completions.create(model="tiny", prompt=[ids], echo=True, logprobs=1, max_tokens=max_tokens,
                                         temperature=0, seed=1234)
        lp = resp.choices[0].logprobs
        assert len(lp.token_logprobs) == len(ids) + max_tokens
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        torch.testing.assert_close(torch.tensor(lp.token_logprobs[1:len(ids)]),
                                   want[torch.arange(len(ids) - 1), ids[1:]], atol=1e-4, rtol=0)
        greedy = [max(top, key=top.get) for top in lp.top_logprobs[1:len(ids)]]
        decode = llm.engine.tokenizer.decode
        assert greedy == [decode([int(t)], False) for t in want[:-1].argmax(-1)]
        assert lp.tokens[:len(ids)] == [decode([t], False) for t in ids]
        assert lp.text_offset[:3] == [0, len(lp.tokens[0]), len(lp.tokens[0]) + len(lp.tokens[1])]
        assert resp.choices[0].text.startswith(decode(ids))
    text = client.completions.create(model="tiny", prompt=context, echo=True, max_tokens=4, temperature=0)
    assert text.choices[0].text.startswith(context)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=context, echo=True, max_tokens=4, temperature=0, stream=True))
    assert streamed == text.choices[0].text


def test_response_format_and_guided_fields_through_the_sdk(client):
    schema = SCHEMAS["nested_optional"]
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Give me a user"}], max_tokens=80, temperature=0.7,
        seed=2, response_format={"type": "json_schema", "json_schema": {"name": "user", "schema": schema}})
    jsonschema.validate(json.loads(chat.choices[0].message.content), schema)
    done = client.completions.create(model="tiny", prompt="Hi", max_tokens=80, temperature=0, n=2,
                                     extra_body={"response_format": {"type": "json_object"}})
    assert all(isinstance(json.loads(c.text), dict) for c in done.choices)
    regex = client.completions.create(model="tiny", prompt="Hi", max_tokens=20, temperature=1.0, seed=1,
                                      extra_body={"guided_regex": "[a-f]{4}"})
    assert len(regex.choices[0].text) == 4 and set(regex.choices[0].text) <= set("abcdef")
    choice = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "ok?"}],
                                            max_tokens=5, extra_body={"guided_choice": ["yes", "no"]})
    assert choice.choices[0].message.content in ("yes", "no")
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=60, temperature=1.0, seed=3,
        stream=True, extra_body={"guided_json": SCHEMAS["flat"]}) if c.choices)
    jsonschema.validate(json.loads(streamed), SCHEMAS["flat"])


@pytest.mark.parametrize("body,field", [
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "bogus"}}}}, "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_grammar": "start: missing"}, "guided_grammar"),
    ({"guided_grammar": "root ::= undefined"}, "guided_grammar"),  # GBNF with a rule never defined
    ({"guided_choice": "yes"}, "guided_choice"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
])
def test_bad_constraints_get_400_naming_the_field(client, body, field):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                       extra_body=body)
    assert field in err.value.message


def validate_call(call, tools=TOOLS):
    fn = next(t["function"] for t in tools if t["function"]["name"] == call.function.name)
    jsonschema.validate(json.loads(call.function.arguments), fn["parameters"])
    assert call.id and call.type == "function"


@pytest.fixture(scope="module")
def served_long(tmp_path_factory):
    """A tiny model with room for tool descriptions (its 300-token vocabulary spells them out)."""
    from tiny_models import make_model
    with serving(make_model(tmp_path_factory.mktemp("tiny-long"), "llama", max_position_embeddings=2048)) as running:
        yield running


@pytest.fixture
def tool_client(served_long):
    return openai.OpenAI(base_url=served_long[0].url + "/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture
def hermes_template(served_long):
    tokenizer = served_long[1].engine.tokenizer
    old, tokenizer.chat_template = tokenizer.chat_template, HERMES_TEMPLATE
    yield tokenizer
    tokenizer.chat_template = old


@pytest.mark.parametrize("template", ["model's own (no tools)", "hermes"])
def test_tool_calls_plain_and_streaming_through_the_sdk(tool_client, request, template):
    client = tool_client
    if template == "hermes":
        request.getfixturevalue("hermes_template")
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    for choice in ("required", {"type": "function", "function": {"name": "add"}}):
        resp = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice=choice,
                                              max_tokens=200, temperature=1.0, seed=7, parallel_tool_calls=False)
        msg = resp.choices[0].message
        assert resp.choices[0].finish_reason == "tool_calls" and len(msg.tool_calls) == 1
        validate_call(msg.tool_calls[0])
        if choice != "required":
            assert msg.tool_calls[0].function.name == "add"
        chunks = list(client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice=choice,
                                                     max_tokens=200, temperature=1.0, seed=7,
                                                     parallel_tool_calls=False, stream=True))
        deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
        assert [d.function.name for d in deltas] == [msg.tool_calls[0].function.name]
        assert deltas[0].function.arguments == msg.tool_calls[0].function.arguments
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
    several = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice="required",
                                             max_tokens=400, temperature=1.0, seed=11)
    for call in several.choices[0].message.tool_calls:
        validate_call(call)
    auto = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, max_tokens=8)
    assert auto.choices[0].finish_reason in ("stop", "length")  # a random model writes text, not calls


def test_a_tool_result_round_trips_through_the_template(tool_client, served_long, hermes_template):
    client, served = tool_client, served_long
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}
    messages = [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "5"}]
    resp = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, max_tokens=6, temperature=0)
    rendered = hermes_template.apply_chat_template(
        [messages[0], {**messages[1], "tool_calls": [{**call, "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
         messages[2]], tools=TOOLS)
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>' in rendered
    assert "<tool_response>5</tool_response>" in rendered and '"name": "get_weather"' in rendered
    want = served[1].generate(hermes_template.encode(rendered, add_special_tokens=False),
                              SamplingParams(max_tokens=6, temperature=0))[0]
    assert resp.choices[0].message.content == want.text
    with pytest.raises(openai.BadRequestError, match="arguments is not JSON"):
        client.chat.completions.create(model="tiny", max_tokens=2, messages=[
            messages[0], {"role": "assistant", "tool_calls": [{**call, "function": {"name": "add", "arguments": "{"}}]}])


def test_msgpack_generate_takes_the_same_options(served, tiny_llama_dir, llm):
    server = served[0]
    with Client("127.0.0.1", server.msgpack_port) as c:
        out = c.generate("tiny", "Hi", max_tokens=60, temperature=1.0, seed=9, guided_json=SCHEMAS["flat"])
        jsonschema.validate(json.loads(out.text), SCHEMAS["flat"])
        ids = llm.engine.tokenizer.encode("Hello world")
        scored = c.generate("tiny", ids, max_tokens=0, echo=True, logprobs=2)
        want = expected_prompt_logprobs(tiny_llama_dir, ids)
        assert scored.prompt_logprobs[0] is None and scored.text == llm.engine.tokenizer.decode(ids)
        torch.testing.assert_close(torch.tensor([e["logprob"] for e in scored.prompt_logprobs[1:]]),
                                   want[torch.arange(len(ids) - 1), ids[1:]], atol=1e-4, rtol=0)
        assert len(scored.prompt_logprobs[1]["top"]) == 2


@pytest.mark.parametrize("fmt", ["hermes", "llama3_json"])
def test_call_formats_generate_and_parse_valid_calls(llm, fmt):
    """Each format's grammar yields calls that its own parser reads back, with valid arguments."""
    from pyserve.server.tool_calls import HERMES, LLAMA3_JSON
    calls = {"hermes": HERMES, "llama3_json": LLAMA3_JSON}[fmt]
    params = [SamplingParams(max_tokens=300, temperature=1.0, seed=s,
                             structured=StructuredOutput(grammar=calls.grammar(TOOLS, parallel=False)))
              for s in range(3)]
    params.append(SamplingParams(max_tokens=200, temperature=1.0, seed=3,
                                 structured=StructuredOutput(grammar=calls.grammar(TOOLS, parallel=True))))
    outs = llm.generate(["Call a tool"] * 4, params)
    for out in outs[:3]:
        assert out.outputs[0].finish_reason == "stop", out.text
        content, found = calls.parse(out.text)
        assert content is None and len(found) == 1
    # Parallel calls: a random model may keep calling until max_tokens; the complete ones count.
    stopped = outs[3].outputs[0].finish_reason == "stop"
    parallel = calls.parse(outs[3].text)[1] if stopped else calls.complete_calls(outs[3].text)
    assert parallel or fmt == "llama3_json"  # Llama 3 calls are only known complete at the end
    for out in outs[:3]:
        for call in calls.parse(out.text)[1] + parallel:
            fn = next(t["function"] for t in TOOLS if t["function"]["name"] == call.name)
            jsonschema.validate(json.loads(call.arguments), fn["parameters"])


def test_call_parsers_and_streaming_hold_back():
    from pyserve.server.tool_calls import HERMES, LLAMA3_JSON
    text = 'Sure. <tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n<tool_call>{"name": "x"'
    content, found = HERMES.parse(text)
    # The call cut off by max_tokens cannot be parsed: it stays in the content, where the client sees it.
    assert content == 'Sure. \n<tool_call>{"name": "x"'
    assert [(c.name, json.loads(c.arguments)) for c in found] == [("add", {"a": 1, "b": 2})]
    assert HERMES.complete_calls(text) == found[:1]
    assert HERMES.content_end("Hello <tool_ca") == len("Hello ") and HERMES.content_end("Hello") == 5
    assert HERMES.parse("no calls here") == ("no calls here", [])
    content, found = LLAMA3_JSON.parse('<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}; '
                                       '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "C"}}')
    assert content is None and [c.name for c in found] == ["add", "get_weather"]
    assert json.loads(found[1].arguments) == {"city": "Paris", "unit": "C"}
    assert LLAMA3_JSON.parse("plain answer") == ("plain answer", [])
    assert LLAMA3_JSON.content_end('{"na') == 0 and LLAMA3_JSON.content_end("Hi") == 2


def test_streamed_logprobs_add_up_to_the_whole_reply(client):
    """Each chunk carries the logprobs of the tokens drawn since the previous one."""
    kw = dict(model="tiny", max_tokens=12, temperature=0, logprobs=2)
    whole = client.completions.create(prompt="Hello world", **kw).choices[0].logprobs
    chunks = [c.choices[0].logprobs for c in client.completions.create(prompt="Hello world", stream=True, **kw)
              if c.choices and c.choices[0].logprobs]
    # (a later request may find its prompt cached: the same values to rounding)
    assert [lp for c in chunks for lp in c.token_logprobs] == pytest.approx(whole.token_logprobs, abs=1e-5)
    assert [t for c in chunks for t in c.tokens] == whole.tokens
    chat = dict(model="tiny", max_tokens=12, temperature=0, logprobs=True, top_logprobs=2,
                messages=[{"role": "user", "content": "Hi"}])
    reply = client.chat.completions.create(**chat).choices[0].logprobs.content
    streamed = [item for c in client.chat.completions.create(stream=True, **chat)
                if c.choices and c.choices[0].logprobs for item in c.choices[0].logprobs.content]
    assert [i.token for i in streamed] == [i.token for i in reply]
    assert [i.logprob for i in streamed] == pytest.approx([i.logprob for i in reply], abs=1e-5)
    assert all(len(i.top_logprobs) == 2 for i in streamed)
