"""The native /generate formats, translated without a server: requests to /v1/completions and back."""

import pytest

from atropos_verl.serving.generate_formats import (
    HttpError,
    sglang_request,
    sglang_response,
    vllm_request,
    vllm_response,
)


def completion(*choices):
    return {"id": "cmpl-1", "choices": list(choices)}


def choice(index, ids, lps, text="", finish="stop", stop_reason=None, top=None, prompt_ids=(1, 2)):
    return {
        "index": index,
        "text": text,
        "token_ids": list(ids),
        "prompt_token_ids": list(prompt_ids),
        "finish_reason": finish,
        "stop_reason": stop_reason,
        "logprobs": {"token_logprobs": list(lps), "top_logprobs": top},
    }


def test_vllm_request_keeps_native_defaults_and_asks_for_exact_ids():
    request = vllm_request({"prompt": {"prompt_token_ids": [5, 6]}, "n": 2, "max_tokens": 9}, "policy")
    body = request.completion
    assert body["prompt"] == [5, 6] and body["model"] == "policy" and body["n"] == 2 and body["max_tokens"] == 9
    # Sampling the model's generation_config defaults would silently change RL sampling.
    assert (body["temperature"], body["top_p"], body["top_k"]) == (1.0, 1.0, 0)
    assert body["return_token_ids"] and body["return_tokens_as_token_ids"] and body["logprobs"] == 0
    assert not request.prompt_logprobs


@pytest.mark.parametrize(
    "body, message",
    [
        ({"prompt": {"prompt_token_ids": []}}, "non-empty list of token ids"),
        ({"prompt": {"prompt_token_ids": [1, True]}}, "non-empty list of token ids"),
        ({"prompt": 7}, "prompt must be"),
        ({"prompt": "x", "stream": True}, "stream is not supported"),
    ],
)
def test_vllm_request_refusals(body, message):
    with pytest.raises(HttpError, match=message) as info:
        vllm_request(body, "policy")
    assert info.value.status == 400


def test_vllm_response_puts_the_sampled_token_first_with_its_top_k():
    request = vllm_request({"prompt": {"prompt_token_ids": [1, 2]}, "logprobs": 1}, "policy")
    top = [{"token_id:9": -0.1, "token_id:7": -0.5}, {"token_id:3": -0.2}]
    answer = vllm_response(completion(choice(0, [7, 3], [-0.5, -0.2], top=top)), request, 4, "http://b")
    assert answer["logprobs"] == [[[{"7": -0.5, "9": -0.1}], [{"3": -0.2}]]]
    assert answer["token_ids"] == [[7, 3]] and answer["policy_version"] == 4 and answer["prompt_token_ids"] == [1, 2]


def test_responses_refuse_a_backend_without_aligned_ids():
    request = vllm_request({"prompt": "x"}, "policy")
    broken = choice(0, [7, 3], [-0.5])
    with pytest.raises(HttpError, match="aligned") as info:
        vllm_response(completion(broken), request, 0, "http://b")
    assert info.value.status == 502


def test_sglang_request_maps_names_and_refuses_what_it_cannot_serve():
    request = sglang_request(
        {"input_ids": [4, 5], "sampling_params": {"max_new_tokens": 3, "temperature": 0.5}, "return_logprob": True},
        "policy",
    )
    assert request.completion["max_tokens"] == 3 and request.completion["temperature"] == 0.5
    assert request.return_logprob and request.copies == 1
    with pytest.raises(HttpError, match="unsupported sampling_params: \\['json_schema'\\]"):
        sglang_request({"text": "x", "sampling_params": {"json_schema": "{}"}}, "policy")
    with pytest.raises(HttpError, match="top_logprobs_num"):
        sglang_request({"text": "x", "top_logprobs_num": 3}, "policy")


def test_sglang_greedy_n_is_one_backend_sample_repeated():
    request = sglang_request({"input_ids": [4], "sampling_params": {"n": 3, "temperature": 0}}, "policy")
    assert request.completion["n"] == 1 and request.copies == 3
    items = sglang_response(completion(choice(0, [8, 2], [-0.1, -0.3])), request, 2, "http://b")
    assert [item["output_ids"] for item in items] == [[8, 2]] * 3
    assert [item["meta_info"]["id"] for item in items] == ["cmpl-1-0", "cmpl-1-1", "cmpl-1-2"]


def test_sglang_response_finish_reasons_and_logprob_triples():
    request = sglang_request({"input_ids": [4], "return_logprob": True, "rid": "r1"}, "policy")
    one = sglang_response(completion(choice(0, [8, 2], [-0.1, -0.3], finish="stop")), request, 5, "http://b")
    # EOS reported by vLLM as stop with no stop_reason: SGLang names the matched token.
    assert one["meta_info"]["finish_reason"] == {"type": "stop", "matched": 2}
    assert one["meta_info"]["output_token_logprobs"] == [[-0.1, 8, None], [-0.3, 2, None]]
    assert one["meta_info"]["id"] == "r1" and one["meta_info"]["weight_version"] == "5"
    cut = sglang_response(completion(choice(0, [8], [-0.1], finish="length")), request, 5, "http://b")
    assert cut["meta_info"]["finish_reason"] == {"type": "length", "length": 1}
