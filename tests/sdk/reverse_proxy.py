"""The official OpenAI and Anthropic Python SDKs against Tollgate in reverse-proxy mode.

Run by tests/tests/sdk.rs with the proxy's base URL as the only argument; the proxy routes to
the mock upstream. Prints one JSON line per check so the Rust test can assert on the results,
and exits non-zero on the first unexpected outcome.
"""

import json
import sys

import anthropic
import openai

BASE = sys.argv[1]
TAGS = {"x-agent-id": "sdk-agent", "x-cost-center": "CC-1234", "x-project-id": "PROJ-SDK001"}


def report(check, **fields):
    print(json.dumps({"check": check, **fields}), flush=True)


def main():
    oa = openai.OpenAI(base_url=f"{BASE}/v1", api_key="sk-test", default_headers=TAGS, max_retries=0)
    chat = oa.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hello"}], max_tokens=50
    )
    report("openai_chat", content=chat.choices[0].message.content,
           prompt_tokens=chat.usage.prompt_tokens, completion_tokens=chat.usage.completion_tokens)

    chunks = list(oa.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hello"}], max_tokens=50, stream=True
    ))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage_chunks = sum(1 for c in chunks if not c.choices)
    report("openai_stream", chunks=len(chunks), text=text, usage_chunks=usage_chunks)

    untagged = openai.OpenAI(base_url=f"{BASE}/v1", api_key="sk-test", max_retries=0)
    try:
        untagged.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        report("openai_untagged", raised=None)
        return 1
    except openai.PermissionDeniedError as e:
        report("openai_untagged", raised=type(e).__name__, status=e.status_code, message=str(e))

    an = anthropic.Anthropic(base_url=BASE, api_key="sk-ant-test", default_headers=TAGS, max_retries=0)
    msg = an.messages.create(
        model="claude-sonnet-4-5", max_tokens=50, messages=[{"role": "user", "content": "hello"}]
    )
    report("anthropic_message", text=msg.content[0].text,
           input_tokens=msg.usage.input_tokens, output_tokens=msg.usage.output_tokens)

    with an.messages.stream(
        model="claude-sonnet-4-5", max_tokens=50, messages=[{"role": "user", "content": "hello"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    report("anthropic_stream", text=text, output_tokens=final.usage.output_tokens)

    broke = anthropic.Anthropic(
        base_url=BASE, api_key="sk-ant-test", max_retries=2,
        default_headers={**TAGS, "x-agent-id": "sdk-broke"},
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
