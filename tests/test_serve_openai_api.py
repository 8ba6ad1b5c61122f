"""scripts/serve_openai_api.py: the OpenAI-compatible API on a trained smoke checkpoint with two LoRAs.

The official ``openai`` client (a test-only requirement) talks to the server of the ``api_server`` fixture:
plain and streamed replies, replies equal to ``eval_llm.py --prompt``, per-request adapter switching,
every error status, 16 concurrent clients, a client that drops a stream; plus adapter discovery and
the command line's bad input.
"""
import http.client
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

import eval_llm
from conftest import IDENTITY_ANSWER, MEDICAL_ANSWER
from model.common import ROOT, TinyMindError, checkpoint_names, run_main
from model.model import TinyMindForCausalLM, get_config, save_model
from model.model_lora import apply_lora, save_lora
from scripts import serve_openai_api as S

openai = pytest.importorskip("openai")

MODELS = ["full_sft", "full_sft+lora_identity", "full_sft+lora_medical", "full_sft+lora_identity+lora_medical"]


@pytest.fixture(scope="module")
def client(api_server):
    return openai.OpenAI(base_url=api_server[1] + "/v1", api_key="unused", max_retries=0, timeout=60)


def ask(client, model, question, max_tokens=24, **kw):
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                       temperature=0, max_tokens=max_tokens, **kw)
    return r.choices[0].message.content


def raw(api_server, method, path, body=b"", headers=None):
    """One plain HTTP request; returns (status, parsed JSON body or text)."""
    host, port = api_server[0].server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request(method, path, body=body, headers=headers or {"Content-Type": "application/json"})
    r = conn.getresponse()
    data = r.read().decode("utf-8")
    conn.close()
    return r.status, json.loads(data) if r.getheader("Content-Type", "").startswith("application/json") else data


def wait_for_log(api_server, line_matches, what, seconds=30):
    """The server writes its log line after the reply has left, so a client may finish first: wait for it."""
    deadline = time.monotonic() + seconds
    while not any(line_matches(x) for x in list(api_server[2])):
        assert time.monotonic() < deadline, f"the server never logged {what}: {api_server[2][-5:]}"
        time.sleep(0.02)


@pytest.mark.slow   # the server of the trained smoke checkpoint (trained once per session)
def test_models_lists_the_base_and_every_adapter_set(client):
    assert [m.id for m in client.models.list().data] == MODELS


@pytest.mark.slow   # the server of the trained smoke checkpoint (trained once per session)
def test_plain_and_streamed_replies(client, api_server):
    r = client.chat.completions.create(model="full_sft+lora_identity", temperature=0, max_tokens=24,
                                       messages=[{"role": "system", "content": "你是一个助手"},
                                                 {"role": "user", "content": "你是谁？"}])
    text = r.choices[0].message.content
    assert r.object == "chat.completion" and r.model == "full_sft+lora_identity"
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens >= 2
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(client.chat.completions.create(
        model="full_sft+lora_identity", temperature=0, max_tokens=24, stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "system", "content": "你是一个助手"}, {"role": "user", "content": "你是谁？"}]))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == text and len(pieces) >= 3          # token by token, same text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    wait_for_log(api_server, lambda x: "model=full_sft+lora_identity prompt=" in x and "tokens/s" in x
                 and x.endswith("stream"), "the streamed request")


@pytest.mark.slow   # the server of the trained smoke checkpoint (trained once per session)
@pytest.mark.parametrize("model,lora", [("full_sft", []), ("full_sft+lora_identity", ["--lora_weight", "lora_identity"])])
def test_temperature_0_equals_eval_llm_prompt(client, trained_smoke, capsys, model, lora):
    d, tok_path = trained_smoke
    eval_llm.main(["--save_dir", str(d), "--tokenizer_path", str(tok_path), "--device", "cpu", "--weight",
                   "full_sft", "--prompt", "你是谁？", "--temperature", "0", "--max_new_tokens", "24", *lora])
    expected = capsys.readouterr().out
    assert ask(client, model, "你是谁？") + "\n" == expected


@pytest.mark.slow   # the server of the trained smoke checkpoint (trained once per session)
def test_model_field_switches_the_adapters(client):
    base = ask(client, "full_sft", "你是谁？")
    assert ask(client, "full_sft+lora_identity", "你是谁？") == IDENTITY_ANSWER
    assert ask(client, "full_sft+lora_medical", "感冒应该挂什么科？") == MEDICAL_ANSWER
    assert IDENTITY_ANSWER not in base and MEDICAL_ANSWER not in base
    assert ask(client, "full_sft", "你是谁？") == base   # back to the plain base model


@pytest.mark.slow   # the server of the trained smoke checkpoint (trained once per session)
def test_every_error_status_and_the_next_request_works(client, api_server):
    good = json.dumps({"model": "full_sft", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 4})
    cases = [  # (method, path, body, status, words in the message)
        ("POST", "/v1/chat/completions", b"{not json", 400, "not valid JSON"),
        ("POST", "/v1/chat/completions", b"[1, 2]", 400, "JSON object"),
        ("POST", "/v1/chat/completions", b'{"model": "full_sft"}', 400, "missing required field 'messages'"),
        ("POST", "/v1/chat/completions", b'{"messages": []}', 400, "missing required field 'model'"),
        ("POST", "/v1/chat/completions", b'{"model": "full_sft", "messages": []}', 400, "non-empty list"),
        ("POST", "/v1/chat/completions", b'{"model": "full_sft", "messages": [{"role": "robot", "content": "x"}]}',
         400, "messages[0] needs a role"),
        ("POST", "/v1/chat/completions",
         b'{"model": "full_sft", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}',
         400, "'temperature' must be a number"),
        ("POST", "/v1/chat/completions", json.dumps({"model": "full_sft", "messages": [
            {"role": "user", "content": "".join(chr(0x4E00 + i) for i in range(600))}]}).encode(),
         400, "context is 512"),
        ("POST", "/v1/chat/completions", json.dumps({"model": "nope", "messages": []}).encode(), 404,
         "the model 'nope' does not exist; available: full_sft, full_sft+lora_identity"),
        ("POST", "/v1/chat/completions", b" " * 30000, 413, "the request body is 30000 bytes; the limit is 20000"),
        ("POST", "/v1/other", good.encode(), 404, "no such path: /v1/other"),
        ("GET", "/v1/chat/completions", b"", 405, "use POST"),
    ]
    for method, path, body, status, words in cases:
        got, data = raw(api_server, method, path, body)
        assert got == status, (path, body[:60], data)
        assert words in data["error"]["message"] and data["error"]["type"] == "invalid_request_error"
        assert raw(api_server, "POST", "/v1/chat/completions", good.encode())[0] == 200
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        ask(client, "full_sft+lora_nope", "你好")
    with pytest.raises(openai.BadRequestError, match="context is 512"):
        ask(client, "full_sft", "".join(chr(0x4E00 + i) for i in range(600)))
    assert ask(client, "full_sft+lora_identity", "你是谁？") == IDENTITY_ANSWER
    wait_for_log(api_server, lambda x: " 413 " in x and "request body is 30000 bytes" in x, "the 413")


@pytest.mark.slow   # the server of the trained smoke checkpoint (trained once per session)
def test_a_bug_is_a_500_and_the_server_goes_on(client, api_server, monkeypatch):
    def broken(req, on_text=None):
        raise RuntimeError("boom")

    monkeypatch.setattr(api_server[0], "complete", broken)
    with pytest.raises(openai.InternalServerError, match="internal error: RuntimeError: boom"):
        ask(client, "full_sft", "你好")
    monkeypatch.undo()
    assert ask(client, "full_sft+lora_identity", "你是谁？") == IDENTITY_ANSWER
    status, page = raw(api_server, "GET", "/?compare=1")
    assert status == 200 and "<title>TinyMind</title>" in page


@pytest.mark.slow   # the server of the trained smoke checkpoint (trained once per session)
def test_sixteen_concurrent_requests(client):
    questions = [(m, q) for m in MODELS for q in ("你是谁？", "感冒应该挂什么科？")]
    expected = {(m, q): ask(client, m, q, max_tokens=12) for m, q in questions}

    def one(i):
        model, question = questions[i % len(questions)]
        if i % 2:  # half of them streamed
            stream = client.chat.completions.create(model=model, temperature=0, max_tokens=12, stream=True,
                                                    messages=[{"role": "user", "content": question}])
            return (model, question), "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        return (model, question), ask(client, model, question, max_tokens=12)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    assert len(results) == 16
    for key, text in results:
        assert text == expected[key], key


@pytest.mark.slow   # the server of the trained smoke checkpoint (trained once per session)
def test_a_client_dropping_a_stream_does_not_stop_the_server(client, api_server):
    host, port = api_server[0].server_address[:2]
    body = json.dumps({"model": "full_sft", "stream": True, "max_tokens": 400, "temperature": 1.0, "seed": 1,
                       "messages": [{"role": "user", "content": "讲一个长故事"}]}).encode()
    with socket.create_connection((host, port), timeout=30) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        first = s.recv(4096)
        assert first.startswith(b"HTTP/1.1 200") and b"text/event-stream" in first
    wait_for_log(api_server, lambda x: "client disconnected" in x, "the dropped client")
    assert ask(client, "full_sft+lora_identity", "你是谁？") == IDENTITY_ANSWER


@pytest.mark.slow   # the server of the trained smoke checkpoint (trained once per session)
def test_a_connection_reset_is_no_traceback(client, api_server, capsys):
    host, port = api_server[0].server_address[:2]
    s = socket.create_connection((host, port), timeout=30)
    s.sendall(b"GET /v1/models HTTP/1.1\r\n")          # half a request, then a reset (RST, not FIN)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    time.sleep(0.5)
    assert [m.id for m in client.models.list().data] == MODELS
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.slow   # the server of the trained smoke checkpoint (trained once per session)
def test_default_adapters_are_the_lora_files_for_this_base(trained_smoke, tmp_path):
    d, tok_path = trained_smoke
    for name in ("full_sft_64.pth", "lora_identity_64.pth"):
        (tmp_path / name).write_bytes((d / name).read_bytes())
    (tmp_path / "junk_64.pth").write_text("not a checkpoint")
    other = TinyMindForCausalLM(get_config("smoke"))   # same config, other weights
    save_model(other, tmp_path / "pretrain_64.pth", stage="pretrain")   # a full checkpoint is no adapter
    apply_lora(other, adapter_name="lora_other", rank=2)
    save_lora(other, tmp_path / "lora_other_64.pth", adapter_name="lora_other")

    def models(*flags):
        args = S.parse_args(["--save_dir", str(tmp_path), "--tokenizer_path", str(tok_path), "--device", "cpu",
                             "--port", "0", *flags])
        server = S.make_server(args, log=lambda line: None)
        server.server_close()
        return list(server.models)

    (tmp_path / "lora_identity_64_resume.pth").write_text("a resume file is not a checkpoint")
    assert checkpoint_names(tmp_path, 64) == ["full_sft", "junk", "lora_identity", "lora_other", "pretrain"]
    assert models() == ["full_sft", "full_sft+lora_identity"]
    assert models("--lora_weight", "none") == ["full_sft"]
    with pytest.raises(TinyMindError, match="lora_x_64.pth not found"):
        models("--lora_weight", "lora_x")
    with pytest.raises(TinyMindError, match="other base weights"):
        models("--lora_weight", "lora_other")
    with pytest.raises(TinyMindError, match="--device foo"):
        models("--device", "foo")


@pytest.mark.slow   # the server of the trained smoke checkpoint (trained once per session)
def test_a_busy_port_is_one_clear_error(api_server, trained_smoke):
    d, tok_path = trained_smoke
    port = api_server[0].server_address[1]
    with pytest.raises(TinyMindError, match=f"cannot listen on 127.0.0.1:{port}"):
        S.make_server(S.parse_args(["--save_dir", str(d), "--tokenizer_path", str(tok_path), "--device", "cpu",
                                    "--port", str(port)]))


def test_request_validation_of_the_sampling_fields():
    models = {"m": ()}

    def parse(**fields):
        return S.parse_request(json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}], **fields})
                               .encode(), models, 512)

    r = parse()
    assert (r.temperature, r.top_p, r.max_tokens, r.seed, r.stream) == (0.7, 0.9, 512, None, False)
    r = parse(max_completion_tokens=7, seed=3, stream=True, stream_options={"include_usage": True})
    assert (r.max_tokens, r.seed, r.stream, r.include_usage) == (7, 3, True, True)
    assert parse(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text",
                                                                                        "text": "b"}]}]).messages \
        == [{"role": "user", "content": "ab"}]
    for bad, words in (({"max_tokens": 0}, "'max_tokens' must be an integer"), ({"temperature": True}, "temperature"),
                       ({"top_p": 1.5}, "top_p"), ({"n": 2}, "'n' must be"), ({"stream": "yes"}, "'stream'"),
                       ({"seed": 1.5}, "'seed'")):
        with pytest.raises(S.ApiError, match=words):
            parse(**bad)


@pytest.mark.slow   # the server of the trained smoke checkpoint (trained once per session)
def test_command_line_from_its_own_folder_and_ctrl_c(trained_smoke, capsys):
    d, tok_path = trained_smoke
    # A shell that starts jobs in the background hands them SIGINT ignored, and a Python started that way
    # never turns Ctrl-C into KeyboardInterrupt: give the server the default disposition, as a terminal would.
    restore_sigint = (lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) if os.name == "posix" else None
    proc = subprocess.Popen([sys.executable, "serve_openai_api.py", "--save_dir", str(d), "--device", "cpu",
                             "--port", "0"], cwd=ROOT / "scripts", stderr=subprocess.PIPE, text=True,
                            preexec_fn=restore_sigint)
    try:
        lines = []
        while not lines or not lines[-1].startswith("  page: "):
            line = proc.stderr.readline()
            assert line, f"the server exited: {lines}"
            lines.append(line)
        url = lines[-1].split()[-1]
        assert "serving full_sft, full_sft+lora_identity, full_sft+lora_medical" in "".join(lines)
        models = json.load(urllib.request.urlopen(url + "v1/models", timeout=30))
        assert [m["id"] for m in models["data"]] == MODELS
    finally:
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=30)[1]
    assert proc.returncode == 0 and "Traceback" not in rest
    assert "GET /v1/models 200" in rest            # one log line per request
    with pytest.raises(SystemExit) as e:
        run_main(S.main, ["--save_dir", str(d), "--lora_weight", "lora_x", "--port", "0", "--device", "cpu"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: ")
