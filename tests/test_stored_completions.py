"""Stored chat completions through the `openai` SDK: `store: true` keeps the request's messages,
the completion and its metadata; list (filters, pages), retrieve, messages, update, delete; a
streamed completion is stored once finished; records (and stored responses) outlive a SIGKILL."""

import json
import signal
import urllib.request

import openai
import pytest

from conftest import cli_server

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


@pytest.fixture
def client(served):
    server, _ = served
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def test_a_stored_completion_is_listed_retrieved_updated_and_deleted(client):
    done = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, temperature=0, store=True,
                                          metadata={"topic": "greeting", "run": "a"})
    kept = client.chat.completions.retrieve(done.id)
    assert kept.id == done.id and kept.choices[0].message.content == done.choices[0].message.content
    assert kept.usage.total_tokens == done.usage.total_tokens and kept.metadata == {"topic": "greeting", "run": "a"}
    assert [m.content for m in client.chat.completions.messages.list(done.id)] == ["Be brief.", "Hello there"]
    listed = [c.id for c in client.chat.completions.list(model="tiny", metadata={"topic": "greeting", "run": "a"})]
    assert listed == [done.id]
    assert client.chat.completions.list(metadata={"topic": "farewell"}).data == []
    updated = client.chat.completions.update(done.id, metadata={"topic": "greeting", "rated": "yes"})
    assert updated.metadata == {"topic": "greeting", "rated": "yes"}
    assert [c.id for c in client.chat.completions.list(metadata={"rated": "yes"})] == [done.id]
    deleted = client.chat.completions.delete(done.id)
    assert deleted.deleted and deleted.id == done.id
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.retrieve(done.id)


def test_only_what_asks_is_stored_and_streams_are_stored_when_finished(client):
    plain = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.retrieve(plain.id)
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, temperature=0,
                                                 store=True, stream=True, metadata={"kind": "streamed"}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    kept = client.chat.completions.retrieve(chunks[0].id)
    assert kept.choices[0].message.content == text and kept.metadata == {"kind": "streamed"}


def test_pages_follow_after_and_order(client):
    ids = [client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, store=True,
                                          metadata={"batch": "pages"}).id for _ in range(3)]
    first = client.chat.completions.list(metadata={"batch": "pages"}, limit=2)
    assert [c.id for c in first.data] == ids[:2] and first.has_more
    assert [c.id for c in client.chat.completions.list(metadata={"batch": "pages"}, limit=2)] == ids  # auto-paging
    newest = client.chat.completions.list(metadata={"batch": "pages"}, order="desc", limit=1)
    assert [c.id for c in newest.data] == ids[-1:]


@pytest.mark.parametrize("call, param", [
    (lambda c: c.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, store="yes"), "store"),
    (lambda c: c.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, store=True,
                                         metadata={"k": "v" * 600}), "metadata"),
    (lambda c: c.chat.completions.list(limit=0), "limit"),
    (lambda c: c.chat.completions.list(order="sideways"), "order"),
    (lambda c: c.chat.completions.list(after="chatcmpl-none"), "completion_id"),
])
def test_bad_requests_name_the_field(client, call, param):
    with pytest.raises((openai.BadRequestError, openai.NotFoundError)) as caught:
        call(client)
    assert caught.value.body["param"] == param, caught.value.body


def test_stored_completions_outlive_a_sigkill(tiny_llama_dir, tmp_path):
    def post(url, body):
        req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())
    with cli_server(tiny_llama_dir, "--data-dir", str(tmp_path)) as (proc, url, _):
        done = post(url + "/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, "max_tokens": 4,
                                                   "store": True, "metadata": {"k": "v"}})
        response = post(url + "/v1/responses", {"model": "tiny", "input": "Hello there", "max_output_tokens": 4})
        proc.send_signal(signal.SIGKILL)  # right after the answers: nothing may be lost
        proc.wait(timeout=30)
    with cli_server(tiny_llama_dir, "--data-dir", str(tmp_path)) as (_, url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        kept = client.chat.completions.retrieve(done["id"])
        assert kept.choices[0].message.content == done["choices"][0]["message"]["content"]
        assert kept.metadata == {"k": "v"}
        assert client.responses.retrieve(response["id"]).output_text == response["output"][0]["content"][0]["text"]
        follow = client.responses.create(model="tiny", input="And then?", previous_response_id=response["id"],
                                         max_output_tokens=2)
        assert follow.previous_response_id == response["id"]


def test_ratings_of_stored_answers_become_a_fine_tuning_file(served, client):
    """Thumbs up: the answer is a supervised line; thumbs down with a correction: the correction is
    a supervised line and the pair a DPO line; thumbs down alone: nothing. The file is in the
    files API and passes its fine-tune checks; the export carries the rated messages and answer."""
    import urllib.request
    server, _ = served

    def post(path, body):
        req = urllib.request.Request(server.url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())
    asked = [client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"Question {i}"}],
                                            max_tokens=4, temperature=0, store=True, metadata={"set": "loop"})
             for i in range(3)]
    post("/v1/feedback", {"response_id": asked[0].id, "rating": 1})
    post("/v1/feedback", {"response_id": asked[1].id, "rating": -1, "correction": "The right answer."})
    post("/v1/feedback", {"response_id": asked[2].id, "rating": -1, "comment": "bad"})
    made = post("/v1/feedback/datasets", {"method": "both", "metadata": {"set": "loop"}})
    assert made["supervised_lines"] == 2 and made["dpo_lines"] == 1
    lines = [json.loads(line) for line in client.files.content(made["file"]["id"]).text.splitlines()]
    supervised = [line["messages"] for line in lines if "messages" in line]
    assert supervised == [[{"role": "user", "content": "Question 0"},
                           {"role": "assistant", "content": asked[0].choices[0].message.content}],
                          [{"role": "user", "content": "Question 1"},
                           {"role": "assistant", "content": "The right answer."}]]
    (pair,) = [line for line in lines if "input" in line]
    assert pair["preferred_output"][0]["content"] == "The right answer."
    assert pair["non_preferred_output"][0]["content"] == asked[1].choices[0].message.content
    assert client.files.retrieve(made["file"]["id"]).purpose == "fine-tune"
    only_dpo = post("/v1/feedback/datasets", {"method": "dpo", "metadata": {"set": "loop"}})
    assert only_dpo["supervised_lines"] == 0 and only_dpo["dpo_lines"] == 1
    with urllib.request.urlopen(server.url + "/v1/feedback/export", timeout=10) as r:
        exported = {row["response_id"]: row for row in map(json.loads, r.read().decode().splitlines())}
    assert exported[asked[1].id]["correction"] == "The right answer."
    assert exported[asked[1].id]["messages"] == [{"role": "user", "content": "Question 1"}]
    assert exported[asked[1].id]["answer"] == asked[1].choices[0].message.content


def test_a_dataset_of_nothing_or_a_bad_method_is_a_400(client, served):
    import urllib.error
    import urllib.request
    server, _ = served
    for body, param in (({"method": "rlhf"}, "method"), ({"metadata": {"set": "none-such"}}, "method")):
        req = urllib.request.Request(server.url + "/v1/feedback/datasets", data=json.dumps(body).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(req, timeout=10)
        assert caught.value.code == 400 and json.loads(caught.value.read())["error"]["param"] == param


def test_one_key_never_sees_anothers_records(tiny_llama_dir):
    """Stored completions, responses and files belong to the key that made them, whether or not
    the server salts its prefix cache by key."""
    from pyserve.server.auth import AccessPolicy

    from conftest import serving
    with serving(tiny_llama_dir, access=AccessPolicy(["key-a", "key-b"])) as (server, _):
        a, b = (openai.OpenAI(base_url=server.url + "/v1", api_key=k, max_retries=0, timeout=60)
                for k in ("key-a", "key-b"))
        done = a.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, store=True)
        response = a.responses.create(model="tiny", input="Hi", max_output_tokens=2)
        uploaded = a.files.create(file=("n.txt", b"notes"), purpose="user_data")
        assert a.chat.completions.retrieve(done.id).id == done.id
        for read in (lambda: b.chat.completions.retrieve(done.id), lambda: b.responses.retrieve(response.id),
                     lambda: b.files.retrieve(uploaded.id)):
            with pytest.raises(openai.NotFoundError):
                read()
        assert b.chat.completions.list().data == [] and b.files.list().data == []
