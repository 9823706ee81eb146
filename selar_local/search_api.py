"""Search methods (the registry's `Method.search`, e.g. latentseek) behind the OpenAI-shaped
facade: the search decodes whole answers and gradings through the scheduler, one after the
other, and the response carries its final answer. A streamed request gets the final answer
as one chunk after the search (its intermediate answers are not the answer), then the closing
chunk; the `selar` field holds the search's iterations, rewards, generations and gradings.
A thinking model's final answer is split as any chat answer is: the text after its thinking
span in `content`, the span in `reasoning_content`."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Sequence

from selar_local.methods import REGISTRY, is_search
from selar_local.openai_schema import PreparedRequest, RequestError

if TYPE_CHECKING:
    from selar_local.api import Selar


def wants_search(req: PreparedRequest) -> bool:
    return is_search(req.params.method)


def question_of(messages: Sequence[Any], method: str = "latentseek") -> str:
    """What the self-grading shows as the problem: the last user message's text."""
    for message in reversed(list(messages)):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
            if isinstance(content, str) and content.strip():
                return content
    raise RequestError(f"method '{method}' grades its answer to the last user message: "
                       "the request has none with text", param="messages")


def check_search_request(req: PreparedRequest, messages: Sequence[Any] | None) -> str:
    """The question a search request answers; a 400 for what a search cannot do."""
    method = req.params.method
    if req.kind != "chat" or messages is None:
        raise RequestError(f"method '{method}' is a search over a chat: use /v1/chat/completions", param="method",
                           code="unsupported_method")
    if len(req.choices) != 1:
        raise RequestError(f"method '{method}' searches one answer: n must be 1, not {len(req.choices)}", param="n")
    if req.tools is not None or req.logprobs:
        raise RequestError(f"method '{method}' supports neither tools nor logprobs", param="method",
                           code="unsupported_method")
    return question_of(messages, method)


def run_search(llm: "Selar", req: PreparedRequest, messages: Sequence[Any]) -> tuple[Any, dict[str, Any]]:
    """Run the request's search (blocking: call it off the event loop): its result, and the
    response's `selar` field (the search's course and settings)."""
    question = check_search_request(req, messages)
    params = req.params
    search = REGISTRY[params.method].search_function()
    started = time.perf_counter()
    found = search(llm.runtime, question, req.prompt_tokens, params, decode=llm._decode_as_requests)
    return found, {"method": params.method, "seed": params.seed, **found.summary(),
                   "decoded_tokens": found.decoded_tokens,
                   "search_seconds": round(time.perf_counter() - started, 6), **found.settings}


def search_response(llm: "Selar", req: PreparedRequest, messages: Sequence[Any]) -> dict[str, Any]:
    """Run the request's search (blocking: call it off the event loop) and answer like a
    chat.completion."""
    found, selar = run_search(llm, req, messages)
    completion = len(found.tokens)
    message = {"role": "assistant", "content": found.content}
    if found.answer is not None:  # a thinking model: its reasoning apart, as completion_response does
        message["reasoning_content"] = found.reasoning
    return {"id": req.id, "object": "chat.completion", "created": req.created, "model": req.model,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": found.finish_reason}],
            "usage": {"prompt_tokens": len(req.prompt_tokens), "completion_tokens": completion,
                      "total_tokens": len(req.prompt_tokens) + completion,
                      "prompt_tokens_details": {"cached_tokens": 0}},
            "selar": selar}


def response_chunks(response: dict[str, Any], include_usage: bool = False) -> list[dict[str, Any]]:
    """A finished search's response as chat.completion.chunk objects: the role, the whole
    answer in one chunk, the closing chunk with the `selar` field (and usage if asked)."""
    head = {"id": response["id"], "object": "chat.completion.chunk", "created": response["created"],
            "model": response["model"]}
    choice = response["choices"][0]

    def chunk(delta: dict, finish: str | None, **extra: Any) -> dict[str, Any]:
        return {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}

    message = choice["message"]
    answer = {"content": message["content"]}
    if "reasoning_content" in message:
        answer["reasoning_content"] = message["reasoning_content"]
    chunks = [chunk({"role": "assistant", "content": ""}, None), chunk(answer, None),
              chunk({}, choice["finish_reason"], selar=response["selar"])]
    if include_usage:
        chunks.append({**head, "choices": [], "usage": response["usage"]})
    return chunks
