"""Drives `kvplugin serve` with the official `openai` client (installed by `scripts/setup.sh
--tests` into a virtual environment) for the server tests in `integration-tests/tests/serve.rs`.

Each call prints one JSON object on stdout. Retries are off (`max_retries=0`): a failed request
must show as a failure, not be hidden by a retry.

    openai_driver.py URL chat --messages JSON [--stream] [--max-tokens N]
    openai_driver.py URL complete --prompt TEXT [--max-tokens N]
    openai_driver.py URL models
    openai_driver.py URL http METHOD PATH [--token T]
"""

import argparse
import json
import sys
import urllib.error
import urllib.request

import openai


def usage_of(usage):
    if usage is None:
        return None
    details = getattr(usage, "prompt_tokens_details", None)
    cached = getattr(details, "cached_tokens", None) if details is not None else None
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "cached_tokens": cached,
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("url")
    sub = p.add_subparsers(dest="cmd", required=True)
    chat = sub.add_parser("chat")
    chat.add_argument("--messages", required=True)
    chat.add_argument("--stream", action="store_true")
    chat.add_argument("--max-tokens", type=int, default=16)
    complete = sub.add_parser("complete")
    complete.add_argument("--prompt", required=True)
    complete.add_argument("--max-tokens", type=int, default=16)
    sub.add_parser("models")
    http = sub.add_parser("http")
    http.add_argument("method")
    http.add_argument("path")
    http.add_argument("--token")
    args = p.parse_args()

    client = openai.OpenAI(base_url=args.url + "/v1", api_key="unused", max_retries=0, timeout=600)
    if args.cmd == "chat":
        messages = json.loads(args.messages)
        if args.stream:
            text, usage, ids, chunks = "", None, set(), 0
            stream = client.chat.completions.create(
                model="default",
                messages=messages,
                max_tokens=args.max_tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            for chunk in stream:
                chunks += 1
                ids.add(chunk.id)
                for choice in chunk.choices:
                    text += choice.delta.content or ""
                if chunk.usage is not None:
                    usage = usage_of(chunk.usage)
            out = {"text": text, "usage": usage, "ids": sorted(ids), "chunks": chunks}
        else:
            r = client.chat.completions.create(
                model="default",
                messages=messages,
                max_tokens=args.max_tokens,
                temperature=0,
            )
            out = {
                "text": r.choices[0].message.content,
                "finish_reason": r.choices[0].finish_reason,
                "usage": usage_of(r.usage),
                "ids": [r.id],
            }
    elif args.cmd == "complete":
        r = client.completions.create(
            model="default", prompt=args.prompt, max_tokens=args.max_tokens, temperature=0
        )
        out = {"text": r.choices[0].text, "usage": usage_of(r.usage), "ids": [r.id]}
    elif args.cmd == "models":
        out = {"models": [m.id for m in client.models.list().data]}
    else:
        headers = {"Authorization": "Bearer " + args.token} if args.token else {}
        data = b"{}" if args.method == "POST" else None
        if data is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(
            args.url + args.path, data=data, headers=headers, method=args.method
        )
        try:
            with urllib.request.urlopen(request, timeout=600) as r:
                status, content_type, body = r.status, r.headers.get("content-type"), r.read()
        except urllib.error.HTTPError as e:
            status, content_type, body = e.code, e.headers.get("content-type"), e.read()
        out = {"status": status, "content_type": content_type, "body": body.decode()}
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
