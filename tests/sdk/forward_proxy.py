"""The official OpenAI and Anthropic Python SDKs, unmodified, using Tollgate as HTTPS_PROXY.

Run by tests/tests/forward_proxy.rs with HTTPS_PROXY pointing at the proxy and SSL_CERT_FILE
at Tollgate's CA; the SDKs talk to their default https://api.openai.com and
https://api.anthropic.com, which the proxy intercepts (and, by an upstream address override,
sends to a local TLS mock). The only argument is the proxy's host:port, used to build a proxy
URL with credentials. Prints one JSON line per check and exits non-zero on the first
unexpected outcome.
"""

import json
import os
import sys

import anthropic
import openai

PROXY = sys.argv[1]
TAGS = {"x-agent-id": "sdk-agent", "x-cost-center": "CC-1234", "x-project-id": "PROJ-SDK001"}


def report(check, **fields):
    print(json.dumps({"check": check, **fields}), flush=True)


def main():
    assert "HTTPS_PROXY" in os.environ and "SSL_CERT_FILE" in os.environ
    oa = openai.OpenAI(api_key="sk-test", default_headers=TAGS, max_retries=0)
    assert str(oa.base_url).startswith("https://api.openai.com"), oa.base_url
    chat = oa.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hello"}], max_tokens=50
    )
    report("openai_chat", content=chat.choices[0].message.content,
           prompt_tokens=chat.usage.prompt_tokens, completion_tokens=chat.usage.completion_tokens)

    chunks = list(oa.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hello"}], max_tokens=50, stream=True
    ))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    content_chunks = sum(1 for c in chunks if c.choices and c.choices[0].delta.content)
    usage_chunks = sum(1 for c in chunks if not c.choices)
    report("openai_stream", chunks=len(chunks), content_chunks=content_chunks, text=text,
           usage_chunks=usage_chunks)

    untagged = openai.OpenAI(api_key="sk-test", max_retries=0)
    try:
        untagged.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        report("openai_untagged", raised=None)
        return 1
    except openai.PermissionDeniedError as e:
        report("openai_untagged", raised=type(e).__name__, status=e.status_code, message=str(e))

    # Attribution as proxy credentials in the proxy URL (user = agent, password = the rest):
    # no header at all on the request.
    credited = openai.OpenAI(
        api_key="sk-test", max_retries=0,
        http_client=openai.DefaultHttpxClient(
            proxy=f"http://sdk-credited:cost_center=CC-1234,project=PROJ-SDK001@{PROXY}"),
    )
    chat = credited.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hello"}], max_tokens=50
    )
    report("openai_credentials", content=chat.choices[0].message.content)

    an = anthropic.Anthropic(api_key="sk-ant-test", default_headers=TAGS, max_retries=0)
    assert str(an.base_url).startswith("https://api.anthropic.com"), an.base_url
    msg = an.messages.create(
        model="claude-sonnet-4-5", max_tokens=50, messages=[{"role": "user", "content": "hello"}]
    )
    report("anthropic_message", text=msg.content[0].text,
           input_tokens=msg.usage.input_tokens, output_tokens=msg.usage.output_tokens)

    with an.messages.stream(
        model="claude-sonnet-4-5", max_tokens=50, messages=[{"role": "user", "content": "hello"}]
    ) as stream:
        deltas = list(stream.text_stream)
        final = stream.get_final_message()
    report("anthropic_stream", text="".join(deltas), deltas=len(deltas),
           input_tokens=final.usage.input_tokens, output_tokens=final.usage.output_tokens)

    broke = anthropic.Anthropic(
        api_key="sk-ant-test", max_retries=2, default_headers={**TAGS, "x-agent-id": "sdk-broke"},
    )
    try:
        broke.messages.create(
            model="claude-sonnet-4-5", max_tokens=4000, messages=[{"role": "user", "content": "hi"}]
        )
        report("anthropic_budget", raised=None)
        return 1
    except anthropic.APIStatusError as e:
        report("anthropic_budget", raised=type(e).__name__, status=e.status_code, message=str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
