"""The native /generate formats, translated without a server: to /v1/completions (vLLM) or SGLang's /generate."""

import pytest

from atropos_verl.serving.generate_formats import (
    HttpError,
    sglang_answer_as_completion,
    sglang_native_request,
    sglang_native_response,
    sglang_request,
    sglang_response,
    vllm_request,
    vllm_request_for_sglang,
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


# --- SGLang backends ----------------------------------------------------------------------


def sglang_item(ids, lps, finish="length", tops=None):
    meta = {"id": "backend-rid", "finish_reason": {"type": finish}, "weight_version": "0"}
    meta["output_token_logprobs"] = [[lp, tid, None] for lp, tid in zip(lps, ids)]
    if tops is not None:
        meta["output_top_logprobs"] = tops
    return {"text": "x", "output_ids": list(ids), "meta_info": meta}


def test_sglang_format_passes_through_checked_with_the_version_stamped():
    native, checked = sglang_native_request(
        {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 3, "n": 2, "top_k": None}, "rid": "r"}, "m"
    )
    # rid stays out (SGLang refuses one it already runs); None values are dropped.
    assert native == {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 3, "n": 2}, "return_logprob": False,
                      "stream": False}  # fmt: skip
    with pytest.raises(HttpError, match="top_logprobs_num"):
        sglang_native_request({"input_ids": [5], "top_logprobs_num": 3}, "m")
    answer = sglang_native_response([sglang_item([1], [-0.1]), sglang_item([2], [-0.2])], checked, 4, "b")
    assert [item["meta_info"]["id"] for item in answer] == ["r-0", "r-1"]
    assert all(item["policy_version"] == 4 and item["meta_info"]["weight_version"] == "4" for item in answer)
    with pytest.raises(HttpError, match="is it SGLang"):
        sglang_native_response({"choices": []}, checked, 4, "b")


def test_vllm_format_becomes_sglang_sampling_params():
    native, checked = vllm_request_for_sglang(
        {"prompt": {"prompt_token_ids": [7, 8]}, "max_tokens": 4, "n": 2, "seed": 3, "logprobs": 2}, "m"
    )
    assert native["input_ids"] == [7, 8] and native["return_logprob"] and native["top_logprobs_num"] == 2
    sampling = native["sampling_params"]
    assert sampling["max_new_tokens"] == 4 and sampling["n"] == 2 and sampling["sampling_seed"] == 3
    # vLLM's native defaults, with its "top_k off" spelled the SGLang way.
    assert sampling["temperature"] == 1.0 and sampling["top_k"] == -1
    assert not checked.prompt_logprobs
    with pytest.raises(HttpError, match="prompt_logprobs"):
        vllm_request_for_sglang({"prompt": {"prompt_token_ids": [7]}, "prompt_logprobs": 1}, "m")
    with pytest.raises(HttpError, match="best_of"):
        vllm_request_for_sglang({"prompt": {"prompt_token_ids": [7]}, "best_of": 2}, "m")


def test_sglang_answer_reads_back_in_the_vllm_format():
    _, checked = vllm_request_for_sglang({"prompt": {"prompt_token_ids": [7, 8]}, "logprobs": 1}, "m")
    tops = [[[-0.1, 3, None], [-2.0, 9, None]], [[-0.5, 9, None]]]
    answer = sglang_item([3, 4], [-0.1, -0.7], finish="stop", tops=tops)
    result = vllm_response(sglang_answer_as_completion(answer, [7, 8], "b"), checked, 2, "b")
    assert result["token_ids"] == [[3, 4]] and result["finish_reasons"] == ["stop"]
    assert result["prompt_token_ids"] == [7, 8] and result["policy_version"] == 2
    # The sampled token first, then the top-k (atroposlib reads the first entry).
    assert result["logprobs"][0] == [[{"3": -0.1, "9": -2.0}], [{"4": -0.7, "9": -0.5}]]
