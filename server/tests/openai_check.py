#!/usr/bin/env python3
"""Checks moera's OpenAI-compatible API with the official `openai` Python client.

    python3 server/tests/openai_check.py --base-url http://127.0.0.1:8080 --api-key KEY \\
        --model NAME [--embedding-model NAME]

The base URL may end in /v1 or not. Prints one line per check ("ok ..." or "FAIL ...") and
exits non-zero if any failed. Generation is greedy (temperature 0), so a streamed answer must
equal the same request's non-streamed one.
"""
import argparse
import math
import sys
import traceback

import openai

MESSAGES = [{"role": "user", "content": "Hello there"}]
PROMPT = "Once upon a time"
EMBED_INPUTS = ["The cat sat on the mat.", "Rust is a systems programming language."]
GREEDY = {"max_tokens": 8, "temperature": 0, "seed": 1}


class CheckFailed(Exception):
    pass


def expect(condition, message):
    if not condition:
        raise CheckFailed(message)


def check_usage(usage, max_completion=None):
    expect(usage is not None, "no usage")
    expect(usage.prompt_tokens > 0, f"prompt_tokens {usage.prompt_tokens}")
    expect(usage.prompt_tokens + usage.completion_tokens == usage.total_tokens,
           f"usage does not add up: {usage}")
    if max_completion is not None:
        expect(0 < usage.completion_tokens <= max_completion,
               f"completion_tokens {usage.completion_tokens} not in 1..{max_completion}")


class Checks:
    def __init__(self, args):
        self.args = args
        self.client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0,
                                    timeout=args.timeout)
        self.failures = 0
        self.chat_text = None
        self.chat_usage = None

    def run(self, name, check):
        try:
            detail = check()
            print(f"ok   {name}" + (f": {detail}" if detail else ""), flush=True)
        except CheckFailed as e:
            self.failures += 1
            print(f"FAIL {name}: {e}", flush=True)
        except Exception as e:  # an unexpected error is a failure of that check, not the run
            self.failures += 1
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc(file=sys.stderr)

    def models(self):
        ids = [m.id for m in self.client.models.list().data]
        expect(self.args.model in ids, f"{self.args.model!r} not in {ids}")
        if self.args.embedding_model:
            expect(self.args.embedding_model in ids, f"{self.args.embedding_model!r} not in {ids}")
        return ids

    def chat(self):
        r = self.client.chat.completions.create(model=self.args.model, messages=MESSAGES, **GREEDY)
        expect(r.object == "chat.completion", f"object {r.object!r}")
        expect(r.id.startswith("chatcmpl-"), f"id {r.id!r}")
        expect(len(r.choices) == 1, f"{len(r.choices)} choices")
        choice = r.choices[0]
        expect(choice.message.role == "assistant", f"role {choice.message.role!r}")
        content = choice.message.content
        expect(isinstance(content, str) and content != "", f"content {content!r}")
        expect(choice.finish_reason in ("stop", "length"), f"finish_reason {choice.finish_reason!r}")
        check_usage(r.usage, GREEDY["max_tokens"])
        self.chat_text, self.chat_usage = content, r.usage
        return f"{content!r} ({choice.finish_reason}, {r.usage.completion_tokens} tokens)"

    def stream_chat(self, include_usage):
        expect(self.chat_text is not None, "needs the non-streaming chat check")
        extra = {"stream_options": {"include_usage": True}} if include_usage else {}
        stream = self.client.chat.completions.create(
            model=self.args.model, messages=MESSAGES, stream=True, **GREEDY, **extra)
        chunks = list(stream)
        expect(chunks, "no chunks")
        for c in chunks:
            expect(c.object == "chat.completion.chunk", f"object {c.object!r}")
        pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        text = "".join(pieces)
        expect(text == self.chat_text, f"streamed {text!r} != non-streamed {self.chat_text!r}")
        expect(len(finish) == 1 and finish[0] in ("stop", "length"), f"finish_reasons {finish}")
        with_usage = [c for c in chunks if c.usage is not None]
        if include_usage:
            last = chunks[-1]
            expect(last.usage is not None and last.choices == [],
                   f"the last chunk carries no usage: {last}")
            expect(with_usage == [last], f"{len(with_usage)} chunks carry usage")
            check_usage(last.usage, GREEDY["max_tokens"])
            counts = lambda u: (u.prompt_tokens, u.completion_tokens, u.total_tokens)  # noqa: E731
            expect(counts(last.usage) == counts(self.chat_usage),
                   f"usage {last.usage} != {self.chat_usage}")
        else:
            expect(not with_usage, "usage sent without stream_options.include_usage")
        return f"{len(chunks)} chunks, {sum(1 for p in pieces if p)} with text"

    def completion(self):
        r = self.client.completions.create(model=self.args.model, prompt=PROMPT, **GREEDY)
        expect(r.object == "text_completion", f"object {r.object!r}")
        expect(len(r.choices) == 1, f"{len(r.choices)} choices")
        choice = r.choices[0]
        expect(isinstance(choice.text, str) and choice.text != "", f"text {choice.text!r}")
        expect(choice.finish_reason in ("stop", "length"), f"finish_reason {choice.finish_reason!r}")
        check_usage(r.usage, GREEDY["max_tokens"])
        stream = self.client.completions.create(model=self.args.model, prompt=PROMPT, stream=True,
                                                **GREEDY)
        streamed = "".join(c.choices[0].text for c in stream if c.choices)
        expect(streamed == choice.text, f"streamed {streamed!r} != non-streamed {choice.text!r}")
        return f"{choice.text!r} ({choice.finish_reason})"

    def stop(self):
        text = self.chat_text
        expect(text is not None, "needs the non-streaming chat check")
        # A stop string from the middle of the greedy answer, at its first occurrence: the
        # same request with it must end just before it.
        at = next((k for k in range(max(1, len(text) // 3), len(text) - 1)
                   if text[k:k + 2].strip() and text.find(text[k:k + 2]) == k), None)
        expect(at is not None, f"no stop string to cut {text!r} with")
        stop = text[at:at + 2]
        r = self.client.chat.completions.create(model=self.args.model, messages=MESSAGES, stop=[stop],
                                                **GREEDY)
        choice = r.choices[0]
        expect(choice.message.content == text[:at],
               f"stop {stop!r}: {choice.message.content!r}, expected {text[:at]!r}")
        expect(choice.finish_reason == "stop", f"finish_reason {choice.finish_reason!r}")
        return f"stop {stop!r} -> {choice.message.content!r}"

    def unknown_model(self):
        try:
            self.client.chat.completions.create(model="no-such-model", messages=MESSAGES, **GREEDY)
        except openai.NotFoundError as e:
            return f"404: {e.message}"
        raise CheckFailed("no error for an unknown model")

    def wrong_key(self):
        wrong = openai.OpenAI(base_url=self.args.base_url, api_key=self.args.api_key + "-wrong",
                              max_retries=0, timeout=self.args.timeout)
        try:
            wrong.chat.completions.create(model=self.args.model, messages=MESSAGES, **GREEDY)
        except openai.AuthenticationError as e:
            return f"401: {e.message}"
        raise CheckFailed("no error for a wrong API key")

    def embeddings(self):
        model = self.args.embedding_model
        r = self.client.embeddings.create(model=model, input=EMBED_INPUTS)  # base64 by default
        expect(r.object == "list", f"object {r.object!r}")
        expect([d.index for d in r.data] == [0, 1], f"indices {[d.index for d in r.data]}")
        vectors = [d.embedding for d in r.data]
        expect(len(vectors[0]) == len(vectors[1]) > 0, f"lengths {[len(v) for v in vectors]}")
        for v in vectors:
            norm = math.sqrt(sum(x * x for x in v))
            expect(abs(norm - 1) < 1e-3, f"norm {norm}")
        expect(vectors[0] != vectors[1], "two inputs, one vector")
        expect(r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens,
               f"usage {r.usage}")
        floats = self.client.embeddings.create(model=model, input=EMBED_INPUTS, encoding_format="float")
        for a, b in zip(vectors, (d.embedding for d in floats.data)):
            expect(len(a) == len(b), "float and base64 lengths differ")
            diff = max(abs(x - y) for x, y in zip(a, b))
            expect(diff < 1e-6, f"float and base64 differ by {diff}")
        single = self.client.embeddings.create(model=model, input=EMBED_INPUTS[0], encoding_format="float")
        expect(len(single.data) == 1, f"{len(single.data)} vectors for one string")
        diff = max(abs(x - y) for x, y in zip(single.data[0].embedding, vectors[0]))
        expect(diff < 1e-4, f"one string alone differs by {diff} from the same in a batch")
        return f"2 x {len(vectors[0])} dimensions"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", required=True, help="the server, with or without /v1")
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--embedding-model")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    args = parser.parse_args()
    args.base_url = args.base_url.rstrip("/")
    if not args.base_url.endswith("/v1"):
        args.base_url += "/v1"

    checks = Checks(args)
    checks.run("model list", checks.models)
    checks.run("chat completion", checks.chat)
    checks.run("streaming chat", lambda: checks.stream_chat(include_usage=False))
    checks.run("streaming chat with usage", lambda: checks.stream_chat(include_usage=True))
    checks.run("completion", checks.completion)
    checks.run("stop", checks.stop)
    checks.run("unknown model -> NotFoundError", checks.unknown_model)
    checks.run("wrong key -> AuthenticationError", checks.wrong_key)
    if args.embedding_model:
        checks.run("embeddings", checks.embeddings)
    print(f"openai {openai.__version__}: {checks.failures} check(s) failed" if checks.failures
          else f"openai {openai.__version__}: all checks passed")
    return 1 if checks.failures else 0


if __name__ == "__main__":
    sys.exit(main())
