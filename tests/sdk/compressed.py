"""The official OpenAI and Anthropic Python SDKs through Tollgate while the upstream compresses.

Run by tests/tests/sdk.rs (reverse mode: the proxy's base URL as the third argument) and
tests/tests/forward_proxy.rs (HTTPS_PROXY mode: no third argument, the SDKs talk to their
default hosts). Arguments: the agent id to tag every call with, and the coding the mock is to
use: `offered` (whatever the SDK's own Accept-Encoding asks for: gzip), or a name sent as
`x-mock-content-encoding` (`identity` for a plain answer, `deflate`, ...).

Calls chat, responses, embeddings and messages, streamed and not, one after the other, and
prints one JSON line per call with the usage the SDK itself read and the Content-Encoding the
answer arrived with. Exits non-zero on the first unexpected outcome.
"""

import json
import sys

import anthropic
import openai

AGENT = sys.argv[1]
CODING = sys.argv[2]
BASE = sys.argv[3] if len(sys.argv) > 3 else None
TAGS = {"x-agent-id": AGENT, "x-cost-center": "CC-1234", "x-project-id": "PROJ-SDK001"}
if CODING != "offered":
    TAGS["x-mock-content-encoding"] = CODING
HELLO = [{"role": "user", "content": "hello"}]


def report(check, raw, input_tokens, output_tokens, **fields):
    print(json.dumps({"check": check, "encoding": raw.headers.get("content-encoding"),
                      "input_tokens": input_tokens, "output_tokens": output_tokens, **fields}),
          flush=True)


def main():
    kw = {"base_url": f"{BASE}/v1"} if BASE else {}
    oa = openai.OpenAI(api_key="sk-test", default_headers=TAGS, max_retries=0, **kw)

    raw = oa.chat.completions.with_raw_response.create(model="gpt-4o", messages=HELLO, max_tokens=50)
    chat = raw.parse()
    assert chat.choices[0].message.content == "Hello from the mock upstream", chat
    report("chat", raw, chat.usage.prompt_tokens, chat.usage.completion_tokens)

    raw = oa.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=HELLO, max_tokens=50, stream=True,
        stream_options={"include_usage": True})
    chunks = list(raw.parse())
    usage = [c.usage for c in chunks if c.usage][-1]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from the mock upstream", text
    report("chat_stream", raw, usage.prompt_tokens, usage.completion_tokens)

    # Without include_usage: Tollgate asks for the usage chunk itself.
    raw = oa.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=HELLO, max_tokens=50, stream=True)
    chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from the mock upstream", text
    usage_chunks = [c.usage for c in chunks if not c.choices and c.usage]
    report("chat_stream_no_usage", raw, None, None, usage_chunks=len(usage_chunks))

    raw = oa.responses.with_raw_response.create(model="gpt-4o", input="hello")
    resp = raw.parse()
    assert resp.output_text == "Hello from the mock upstream", resp
    report("responses", raw, resp.usage.input_tokens, resp.usage.output_tokens)

    raw = oa.responses.with_raw_response.create(model="gpt-4o", input="hello", stream=True)
    done = [e for e in raw.parse() if e.type == "response.completed"]
    assert len(done) == 1, done
    usage = done[0].response.usage
    report("responses_stream", raw, usage.input_tokens, usage.output_tokens)

    raw = oa.embeddings.with_raw_response.create(
        model="text-embedding-3-small", input=["hello", "world"], encoding_format="float")
    emb = raw.parse()
    assert len(emb.data) == 2, emb
    report("embeddings", raw, emb.usage.prompt_tokens, 0)

    kw = {"base_url": BASE} if BASE else {}
    an = anthropic.Anthropic(api_key="sk-ant-test", default_headers=TAGS, max_retries=0, **kw)
    raw = an.messages.with_raw_response.create(model="claude-sonnet-4-5", max_tokens=50, messages=HELLO)
    msg = raw.parse()
    assert msg.content[0].text == "Hello from the mock upstream", msg
    report("messages", raw, msg.usage.input_tokens, msg.usage.output_tokens)

    raw = an.messages.with_raw_response.create(
        model="claude-sonnet-4-5", max_tokens=50, messages=HELLO, stream=True)
    input_tokens = output_tokens = None
    text = ""
    for event in raw.parse():
        if event.type == "message_start":
            input_tokens = event.message.usage.input_tokens
        elif event.type == "content_block_delta":
            text += event.delta.text
        elif event.type == "message_delta":
            output_tokens = event.usage.output_tokens
    assert text == "Hello from the mock upstream", text
    report("messages_stream", raw, input_tokens, output_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
