"""`client.models.list()` and `client.models.retrieve()` with the official OpenAI and Anthropic
Python SDKs through Tollgate in reverse-proxy mode: free endpoints pass (attributed, at $0); an
untagged listing is still refused.

Run by tests/tests/sdk.rs with the proxy's base URL as the only argument. Prints one JSON line
per check and exits non-zero on the first unexpected outcome.
"""

import json
import sys

import anthropic
import openai

BASE = sys.argv[1]
TAGS = {"x-agent-id": "sdk-lister", "x-cost-center": "CC-1234", "x-project-id": "PROJ-SDK001"}


def report(check, **fields):
    print(json.dumps({"check": check, **fields}), flush=True)


def main():
    oa = openai.OpenAI(base_url=f"{BASE}/v1", api_key="sk-test", default_headers=TAGS, max_retries=0)
    report("openai_models", ids=[m.id for m in oa.models.list()])
    report("openai_model", id=oa.models.retrieve("gpt-4o-mini").id)

    an = anthropic.Anthropic(base_url=BASE, api_key="sk-ant-test", default_headers=TAGS, max_retries=0)
    report("anthropic_models", ids=[m.id for m in an.models.list()])
    report("anthropic_model", id=an.models.retrieve("claude-haiku-4-5-20251001").id)

    untagged = openai.OpenAI(base_url=f"{BASE}/v1", api_key="sk-test", max_retries=0)
    try:
        untagged.models.list()
        report("openai_untagged", raised=None)
        return 1
    except openai.PermissionDeniedError as e:
        report("openai_untagged", raised=type(e).__name__, status=e.status_code, message=str(e))

    untagged = anthropic.Anthropic(base_url=BASE, api_key="sk-ant-test", max_retries=0)
    try:
        untagged.models.list()
        report("anthropic_untagged", raised=None)
        return 1
    except anthropic.PermissionDeniedError as e:
        report("anthropic_untagged", raised=type(e).__name__, status=e.status_code, message=str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
