"""Security (issue 15): one access policy on both ports, the admin role, prefix-cache isolation by
salt and by tenant, a digest collision that cannot share blocks, and TLS on both ports."""

import datetime
import ipaddress
import logging
import signal
import socket
import ssl
import threading
import urllib.error
import urllib.request

import openai
import pytest

from pyserve import LLM, SamplingParams
from pyserve.client import AsyncClient, Client, RemoteError
from pyserve.engine.llm.block_manager import BlockManager
from pyserve.errors import Forbidden, Unauthorized
from pyserve.engine.llm import AsyncLLMEngine
from pyserve.protocol import encode
from pyserve.server.auth import AccessPolicy, read_key_file
from pyserve.server.config import ServerConfig

from conftest import cli_server, read_frame, serving

USER, OTHER, ADMIN = "user-key-7f3a", "other-key-91bc", "admin-key-c0de"
WRONG = "wrong-key-5e5e"
# Over two 16-token blocks under the tiny tokenizer, so a repeat can hit the prefix cache.
LONG_PROMPT = "Once upon a time there was a little robot who lived in a quiet town by the sea, and every day"


@pytest.fixture(scope="module")
def secured(tiny_llama_dir):
    def loader(name):
        if name != "second":
            raise KeyError(name)
        return AsyncLLMEngine(LLM(tiny_llama_dir, device="cpu").engine)

    access = AccessPolicy([USER, OTHER], admin_keys=[ADMIN])
    with serving(tiny_llama_dir, access=access, loader=loader) as running:
        yield running


def http(method: str, url: str, key: str | None, body: bytes | None = None) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# -- the policy ----------------------------------------------------------------------------------

def test_policy_roles_and_refusals(tmp_path):
    policy = AccessPolicy([USER, OTHER], admin_keys=[ADMIN])
    assert policy.authenticate(USER).role == "inference" and policy.authenticate(ADMIN).role == "admin"
    for key in (None, "", WRONG, USER + "x", USER[:-1]):
        with pytest.raises(Unauthorized):
            policy.authenticate(key)
    with pytest.raises(Forbidden):
        policy.authenticate(USER).require_admin()
    with pytest.raises(Forbidden):  # keys but no admin key: the operations are closed
        AccessPolicy([USER]).authenticate(USER).require_admin()
    AccessPolicy().authenticate(None).require_admin()  # no keys at all: an open development server
    assert USER not in repr(policy) and ADMIN not in repr(policy)
    salted = AccessPolicy([USER, OTHER], salt_by_key=True)
    tenants = {salted.authenticate(USER).tenant, salted.authenticate(OTHER).tenant}
    assert len(tenants) == 2 and not any(USER in t or OTHER in t for t in tenants)
    path = tmp_path / "keys.txt"
    path.write_text(f"# team keys\n{USER}\n\n  {OTHER}  \n")
    assert read_key_file(str(path)) == [USER, OTHER]


def test_only_loopback_hosts_count_as_private():
    assert ServerConfig(host="127.0.0.1").loopback_only and ServerConfig(host="::1").loopback_only
    assert ServerConfig(host="localhost").loopback_only
    assert not ServerConfig(host="0.0.0.0").loopback_only and not ServerConfig(host="example.org").loopback_only


# -- msgpack authentication --------------------------------------------------------------------------

def test_msgpack_refuses_requests_without_a_valid_key(secured, reference):
    server, _ = secured
    for first_frame in ({"type": "request", "id": 1, "method": "models", "params": {}},
                        {"type": "auth", "id": 1},
                        {"type": "auth", "id": 1, "api_key": WRONG}):
        sock = socket.create_connection(("127.0.0.1", server.msgpack_port), timeout=10)
        hello = read_frame(sock)
        assert hello["auth_required"] is True and "models" not in hello  # nothing is told before auth
        sock.sendall(encode(first_frame))
        error = read_frame(sock)
        assert error["type"] == "error" and error["code"] == 401
        assert sock.recv(1) == b""  # and the connection is closed
        sock.close()
    with pytest.raises(RemoteError) as refused:
        Client("127.0.0.1", server.msgpack_port, api_key=WRONG)
    assert refused.value.code == 401 and WRONG not in refused.value.message
    with pytest.raises(RemoteError) as missing:
        Client("127.0.0.1", server.msgpack_port, api_key="")
    assert missing.value.code == 401

    want = reference.generate("Hello", SamplingParams(max_tokens=8, temperature=0))[0].text
    with Client("127.0.0.1", server.msgpack_port, api_key=USER) as c:
        assert c.server_models == ["tiny"]
        assert c.generate("tiny", "Hello", max_tokens=8, temperature=0).text == want


def test_msgpack_clients_read_the_key_from_the_environment(secured, monkeypatch):
    server, _ = secured
    monkeypatch.setenv("PYSERVE_API_KEY", USER)
    with Client("127.0.0.1", server.msgpack_port) as c:
        assert c.models() == ["tiny"]

    async def run():
        async with await AsyncClient.connect("127.0.0.1", server.msgpack_port) as c:
            return await c.models()

    import asyncio
    assert asyncio.run(run()) == ["tiny"]


# -- the admin role --------------------------------------------------------------------------------

ADMIN_ROUTES = [("GET", "/v1/feedback/export"), ("POST", "/v2/repository/models/second/load"),
                ("POST", "/v2/repository/models/second/unload")]


def test_admin_routes_and_methods_refuse_inference_keys(secured):
    server, _ = secured
    for method, path in ADMIN_ROUTES:
        assert http(method, server.url + path, None, b"{}" if method == "POST" else None)[0] == 401
        for key in (USER, OTHER):
            status, body = http(method, server.url + path, key, b"{}" if method == "POST" else None)
            assert status == 403 and b"admin" in body, (path, status, body)
    for method, path in ADMIN_ROUTES:  # in this order: export, load, unload
        status, _ = http(method, server.url + path, ADMIN, b"{}" if method == "POST" else None)
        assert status == 200, path
    assert http("GET", server.url + "/v1/models", ADMIN)[0] == 200  # the admin key also infers

    with Client("127.0.0.1", server.msgpack_port, api_key=USER) as c:
        for call in (c.load, c.unload):
            with pytest.raises(RemoteError) as refused:
                call("second")
            assert refused.value.code == 403
    with Client("127.0.0.1", server.msgpack_port, api_key=ADMIN) as c:
        assert c.load("second") == ["tiny", "second"]
        assert c.generate("second", "Hello", max_tokens=2).token_ids
        assert c.unload("second") == ["tiny"]


def test_keys_never_reach_the_logs(secured, caplog):
    server, _ = secured
    with caplog.at_level(logging.DEBUG):
        http("GET", server.url + "/v1/models", WRONG)
        http("POST", server.url + "/v2/repository/models/second/load", USER, b"{}")
        http("POST", server.url + "/v1/completions", USER, b'{"model": "tiny", "prompt": "Hi", "max_tokens": 2}')
        with pytest.raises(RemoteError):
            Client("127.0.0.1", server.msgpack_port, api_key=WRONG)
        with Client("127.0.0.1", server.msgpack_port, api_key=USER) as c:
            with pytest.raises(RemoteError):
                c.load("second")
    text = caplog.text
    assert "401" in text and "403" in text  # the refusals were logged, one line each
    for key in (USER, OTHER, ADMIN, WRONG):
        assert key not in text


# -- prefix-cache isolation -------------------------------------------------------------------------

def test_salts_decide_who_shares_cached_prefixes(secured, reference):
    server, _ = secured
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=USER, max_retries=0, timeout=60)

    def cached(**extra) -> tuple[int, str]:
        resp = client.completions.create(model="tiny", prompt=LONG_PROMPT, max_tokens=4, temperature=0,
                                         extra_body=extra)
        return resp.usage.prompt_tokens_details.cached_tokens, resp.choices[0].text

    want = reference.generate(LONG_PROMPT, SamplingParams(max_tokens=4, temperature=0))[0].text
    first, text = cached(cache_salt="salt-a")
    assert first == 0 and text == want
    again, text = cached(cache_salt="salt-a")
    assert again > 0 and text == want
    assert cached(cache_salt="salt-b")[0] == 0
    assert cached()[0] == 0  # no salt: not the salted blocks
    assert cached()[0] > 0
    with Client("127.0.0.1", server.msgpack_port, api_key=USER) as c:
        assert c.generate("tiny", LONG_PROMPT, max_tokens=4, cache_salt="salt-a").usage[
            "prompt_tokens_details"]["cached_tokens"] > 0
        assert c.generate("tiny", LONG_PROMPT, max_tokens=4, cache_salt="salt-c").usage[
            "prompt_tokens_details"]["cached_tokens"] == 0
    status, body = http("POST", server.url + "/v1/completions", USER,
                        b'{"model": "tiny", "prompt": "Hi", "cache_salt": ""}')
    assert status == 400 and b"cache_salt" in body


def test_per_key_salting_keeps_tenants_apart(tiny_llama_dir):
    access = AccessPolicy([USER, OTHER], salt_by_key=True)
    with serving(tiny_llama_dir, access=access) as (server, _):
        def cached(key: str, **extra) -> int:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)
            resp = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": LONG_PROMPT}],
                                                  max_tokens=2, extra_body=extra)
            return resp.usage.prompt_tokens_details.cached_tokens

        assert cached(USER) == 0
        assert cached(OTHER) == 0  # the same prompt under another key
        assert cached(USER) > 0
        assert cached(OTHER, cache_salt="s") == 0 and cached(OTHER, cache_salt="s") > 0


def test_a_forced_digest_collision_cannot_hand_out_another_prompts_kv(tiny_llama_dir, reference, monkeypatch):
    params = SamplingParams(max_tokens=6, temperature=0)
    prompt_a = LONG_PROMPT
    prompt_b = "The weather report said that heavy rain would fall over the northern hills for most of the week"
    want = [o.token_ids for o in reference.generate([prompt_a, prompt_b], params)]
    monkeypatch.setattr(BlockManager, "chain_hash", staticmethod(lambda parent, tokens: b"\0" * 32))
    llm = LLM(tiny_llama_dir, device="cpu")  # every block of every prompt now has the same digest
    first_a = llm.generate(prompt_a, params)[0]
    b = llm.generate(prompt_b, params)[0]
    again_a = llm.generate(prompt_a, params)[0]
    assert [first_a.token_ids, b.token_ids, again_a.token_ids] == [want[0], want[1], want[0]]
    assert b.num_cached_tokens == 0  # the digest matched A's block; its tokens did not
    # Only A's first block was registered (later ones collided with it), so exactly it is reused.
    assert again_a.num_cached_tokens == llm.engine.block_size


# -- TLS ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1, made here."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pyserve-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .sign(key, hashes.SHA256()))
    folder = tmp_path_factory.mktemp("tls")
    certfile, keyfile = folder / "cert.pem", folder / "key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return str(certfile), str(keyfile)


def test_tls_on_both_ports(tiny_llama_dir, reference, certificate):
    certfile, keyfile = certificate
    trust = ssl.create_default_context(cafile=certfile)
    want = reference.generate("Hello", SamplingParams(max_tokens=6, temperature=0))[0].text
    with serving(tiny_llama_dir, api_key=USER, ssl_certfile=certfile, ssl_keyfile=keyfile) as (server, _):
        assert server.url.startswith("https://")
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=USER, max_retries=0, timeout=60,
                               http_client=openai.DefaultHttpxClient(verify=trust))
        assert client.completions.create(model="tiny", prompt="Hello", max_tokens=6, temperature=0).choices[0].text \
            == want
        with pytest.raises(openai.APIConnectionError):  # an untrusted certificate is refused
            openai.OpenAI(base_url=server.url + "/v1", api_key=USER, max_retries=0, timeout=10).models.list()

        with Client("127.0.0.1", server.msgpack_port, api_key=USER, ssl=trust) as c:
            assert c.generate("tiny", "Hello", max_tokens=6, temperature=0).text == want

        async def run():
            async with await AsyncClient.connect("127.0.0.1", server.msgpack_port, api_key=USER, ssl=trust) as c:
                return [chunk.text async for chunk in c.stream("tiny", "Hello", max_tokens=6, temperature=0)]

        import asyncio
        assert "".join(asyncio.run(run())) == want
        with pytest.raises((ConnectionError, OSError, ValueError)):  # plain TCP gets no hello
            Client("127.0.0.1", server.msgpack_port, api_key=USER, timeout=5)


def test_stopping_over_tls_waits_for_requests_not_for_idle_pooled_clients(tiny_llama_dir, certificate):
    """An idle keep-alive connection over TLS ends at once when the server stops (it used to hold
    the stop for the whole drain time, waiting for a close_notify the pooled client never sends),
    while a stream still running at the stop finishes."""
    certfile, keyfile = certificate
    trust = ssl.create_default_context(cafile=certfile)
    with serving(tiny_llama_dir, api_key=USER, ssl_certfile=certfile, ssl_keyfile=keyfile) as (server, _):
        def client():
            return openai.OpenAI(base_url=server.url + "/v1", api_key=USER, max_retries=0, timeout=60,
                                 http_client=openai.DefaultHttpxClient(verify=trust))

        idle = client()
        idle.completions.create(model="tiny", prompt="Hello", max_tokens=2)  # its connection stays pooled
        stream = client().completions.create(model="tiny", prompt="Hello", max_tokens=40, temperature=0, stream=True,
                                             extra_body={"ignore_eos": True})
        next(iter(stream))
        stopping = threading.Thread(target=server.stop)
        stopping.start()
        chunks = list(stream)
        # A bound for a hang, not a speed: a stop takes well under a second here, and the idle
        # connection held it for asyncio's 30 s TLS shutdown timeout.
        server.thread.join(timeout=15)
        ended = not server.thread.is_alive()
        stopping.join()
        assert chunks[-1].choices[0].finish_reason == "length"
        assert ended, "the stop waited on the idle connection"


def test_the_command_line_takes_keys_salting_and_tls_and_logs_no_key(tiny_llama_dir, certificate, tmp_path):
    certfile, keyfile = certificate
    trust = ssl.create_default_context(cafile=certfile)
    key_file = tmp_path / "keys.txt"
    key_file.write_text(f"# inference keys\n{OTHER}\n")
    args = ["--api-key", USER, "--api-key-file", str(key_file), "--admin-api-key", ADMIN, "--cache-salt-per-key",
            "--ssl-certfile", certfile, "--ssl-keyfile", keyfile]
    with cli_server(tiny_llama_dir, *args, tls=trust) as (proc, url, tcp_port):
        def status(key: str | None, path: str = "/v1/models", method: str = "GET") -> int:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            req = urllib.request.Request(url + path, method=method, headers=headers,
                                         data=b"{}" if method == "POST" else None)
            try:
                with urllib.request.urlopen(req, timeout=30, context=trust) as r:
                    return r.status
            except urllib.error.HTTPError as e:
                return e.code

        assert [status(None), status(WRONG), status(USER), status(OTHER), status(ADMIN)] == [401, 401, 200, 200, 200]
        assert status(OTHER, "/v1/feedback/export") == 403 and status(ADMIN, "/v1/feedback/export") == 200
        with Client("127.0.0.1", tcp_port, api_key=OTHER, ssl=trust) as c:  # a key from the file
            first = c.generate("tiny", LONG_PROMPT, max_tokens=2)
            again = c.generate("tiny", LONG_PROMPT, max_tokens=2)
        with Client("127.0.0.1", tcp_port, api_key=USER, ssl=trust) as c:  # another tenant
            other_tenant = c.generate("tiny", LONG_PROMPT, max_tokens=2)
        assert [r.usage["prompt_tokens_details"]["cached_tokens"] > 0 for r in (first, again, other_tenant)] == [
            False, True, False]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        output = proc.stdout.read().decode()
    assert "over TLS" in output and "https://" in output and "-> 401" in output  # refusals are logged
    for key in (USER, OTHER, ADMIN, WRONG):
        assert key not in output
