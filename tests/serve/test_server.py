"""roletune serve, started for real on 127.0.0.1 and spoken to with the official openai client."""
import concurrent.futures
import urllib.error
import urllib.request

import pytest

from roletune import decoding
from roletune.run_dir import open_run

QUESTION = "第3个问题：今天海上风大吗？"


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)

pytestmark = pytest.mark.slow  # each module starts server processes


def test_models_lists_the_base_and_each_run(client, trained_run, tiny_model):
    """Each run names its base (`parent`, as vLLM lists LoRA models) and its persona (roletune's addition)."""
    listed = client.models.list().data
    assert [m.id for m in listed] == [tiny_model.name, trained_run.name, "keeper"]
    assert [(m.parent, m.system_prompt) for m in listed] == \
        [(None, None)] + [(tiny_model.name, open_run(str(trained_run)).system_prompt)] * 2


def test_a_run_answers_in_character_as_chat_does(client, trained_run):
    """No system message in the request: the run's own system prompt, template and stop tokens apply, so the
    API's greedy answer is the one roletune's own decoding gives."""
    session = decoding.load_session(str(trained_run), device="cpu")
    (want,) = decoding.answer_batch(session, [[{"role": "user", "content": QUESTION}]],
                                    decoding.decoding_config(session, greedy=True, max_new_tokens=24))
    reply = client.chat.completions.create(model="keeper", messages=[{"role": "user", "content": QUESTION}],
                                           temperature=0, max_tokens=24)
    assert reply.choices[0].message.content == want.text and "灯塔照常亮着。" in want.text
    assert reply.choices[0].finish_reason == "stop" and reply.model == "keeper"
    assert reply.usage.completion_tokens == want.tokens and reply.usage.prompt_tokens > 10


def test_a_streamed_answer_is_the_whole_answer_in_pieces(client):
    messages = [{"role": "user", "content": QUESTION}]
    whole = client.chat.completions.create(model="keeper", messages=messages, temperature=0, max_tokens=24)
    chunks = list(client.chat.completions.create(model="keeper", messages=messages, temperature=0, max_tokens=24,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "stop" and len(chunks) > 3


def test_the_base_answers_too_and_max_tokens_and_stop_hold(client, tiny_model):
    base = client.chat.completions.create(model=tiny_model.name, messages=[{"role": "user", "content": QUESTION}],
                                          temperature=0, max_tokens=5)
    assert base.choices[0].finish_reason == "length" and base.usage.completion_tokens == 5
    tuned = client.chat.completions.create(model="keeper", messages=[{"role": "user", "content": QUESTION}],
                                           temperature=0, max_tokens=24, stop=["灯塔"])
    assert tuned.choices[0].finish_reason == "stop" and "灯塔" not in tuned.choices[0].message.content


def test_sixteen_concurrent_requests_are_all_answered(client):
    def ask(i):
        question = [{"role": "user", "content": f"第{i}个问题：今天海上风大吗？"}]
        return client.chat.completions.create(model="keeper", messages=question, temperature=0,
                                              max_tokens=16).choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    assert all(answers) and len(answers) == 16


@pytest.mark.parametrize("request_body, status, fragment", [
    ({"model": "nobody", "messages": [{"role": "user", "content": "x"}]}, 404, "model 'nobody' is not served"),
    ({"model": "keeper", "messages": []}, 400, "messages must be a non-empty list"),
    ({"model": "keeper", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role 'wizard'"),
    ({"model": "keeper", "messages": [{"role": "user", "content": 3}]}, 400, "messages[0].content must be a string"),
    ({"model": "keeper", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**9}, 400, "max_tokens"),
])
def test_bad_requests_get_their_status_and_the_server_goes_on(client, request_body, status, fragment):
    import openai

    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(**request_body)
    assert caught.value.status_code == status and fragment in caught.value.message
    assert client.chat.completions.create(model="keeper", messages=[{"role": "user", "content": QUESTION}],
                                          max_tokens=2).choices[0].message.content is not None


def test_a_body_that_is_not_json_is_a_400_in_openais_shape(server):
    import json

    request = urllib.request.Request(f"{server}/v1/chat/completions", data=b"{not json", method="POST")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == 400
    assert json.loads(caught.value.read())["error"]["message"] == "the request body is not JSON"


def test_with_an_api_key_a_missing_or_wrong_one_is_401(key_server, trained_run):
    import openai

    url = key_server.url
    for key in ("wrong", ""):
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key=key or "-", max_retries=0).models.list()
    listed = openai.OpenAI(base_url=f"{url}/v1", api_key=key_server.key).models.list().data
    assert listed[-1].id == trained_run.name
    with urllib.request.urlopen(f"{url}/health", timeout=5) as response:  # a health check needs no key
        assert response.status == 200


def test_other_origins_may_call_the_api_only_when_named(server, key_server):
    def preflight(url, origin):
        request = urllib.request.Request(f"{url}/v1/chat/completions", method="OPTIONS", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.headers.get("access-control-allow-origin")
        except urllib.error.HTTPError as refused:
            return refused.headers.get("access-control-allow-origin")

    assert preflight(server, key_server.origin) is None
    assert preflight(key_server.url, key_server.origin) == key_server.origin
    assert preflight(key_server.url, "http://elsewhere.example") is None
