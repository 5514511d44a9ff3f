"""Datasets as Atropos environments, without servers: loading and normalising rows, prompt
rendering, filtering and skip counts, shuffling, scoring with verl's reward functions and a
user's, group building, evaluation, the prepare CLI and the data config groups.

The dataset environment is constructed for real (its tokenizer is the tiny model's); only the
inference server is replaced, by fakes standing in for atroposlib's server calls.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hydra import compose, initialize_config_dir

from atropos_verl.config import ConfigError, load_config
from atropos_verl.data import prepare as prepare_cli
from atropos_verl.data.scoring import Score, Scorer, interpret
from atropos_verl.data.sources import (
    Fields,
    SourceError,
    UnreadableRow,
    is_local,
    load_rows,
    normalize,
    render_prompt,
    select,
)
from atropos_verl.data.tasks import BadRow
from atropos_verl.envs.dataset import DatasetEnv, DatasetEnvConfig, Sample
from atropos_verl.train import CONF_DIR

CONF = CONF_DIR

GSM8K_ROWS = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples?", "answer": "3 + 4 = 7\n#### 7"},
    {"question": "A box holds 12 eggs. How many eggs in 2 boxes?", "answer": "12 * 2 = 24\n#### 24"},
    {"question": "Sam ran 1,000 m twice. How far?", "answer": "2 * 1,000 = 2,000\n#### 2,000"},
]


def verl_row(question: str, truth: str, data_source: str = "openai/gsm8k") -> dict[str, Any]:
    return {
        "data_source": data_source,
        "prompt": [{"role": "user", "content": question}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": truth},
        "extra_info": {"split": "train", "index": 0},
    }


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def user_reward(solution_str: str, ground_truth: str, extra_info: dict) -> float:
    """A user's scorer, found by import path: 1 for mentioning the ground truth, 0.25 otherwise."""
    return 1.0 if str(ground_truth) in solution_str else 0.25


USER_REWARD = f"{__name__}:user_reward"


# --- loading and normalising ----------------------------------------------------------------


def test_verl_parquet_rows_load_as_they_are(tmp_path):
    path = write_parquet(tmp_path / "train.parquet", [verl_row("What is 2+2?", "4"), verl_row("And 3+3?", "6")])
    rows = load_rows(str(path))
    examples = [normalize(row, i) for i, row in enumerate(rows)]
    assert [e.prompt for e in examples] == [
        [{"role": "user", "content": "What is 2+2?"}],
        [{"role": "user", "content": "And 3+3?"}],
    ]
    assert [e.ground_truth for e in examples] == ["4", "6"]
    assert {e.data_source for e in examples} == {"openai/gsm8k"}
    # A verl prompt is final: no instruction is appended to it.
    assert "####" not in examples[0].prompt[0]["content"]
    assert examples[0].extra_info == {"split": "train", "index": 0}


def test_plain_gsm8k_rows_get_the_number_after_hashes_and_verls_instruction(tmp_path):
    rows = load_rows(str(write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS)))
    examples = [normalize(row, i, Fields(data_source="openai/gsm8k")) for i, row in enumerate(rows)]
    assert [e.ground_truth for e in examples] == ["7", "24", "2000"]  # commas dropped, as verl's scorer drops them
    assert examples[0].prompt == [{
        "role": "user",
        "content": GSM8K_ROWS[0]["question"] + ' Let\'s think step by step and output the final answer after "####".',
    }]  # fmt: skip
    assert (examples[0].data_source, examples[0].ability) == ("openai/gsm8k", "math")
    assert examples[0].extra_info["answer"] == GSM8K_ROWS[0]["answer"]


def test_field_mapping_and_overrides():
    row = {"q": "Name a prime.", "a": "2", "data_source": "row-source", "ability": "row-ability"}
    example = normalize(
        row, 0, Fields(prompt="q", answer="a", data_source="math_dapo", ability="arith", instruction="")
    )
    assert example.prompt == [{"role": "user", "content": "Name a prime."}]
    assert (example.ground_truth, example.data_source, example.ability) == ("2", "math_dapo", "arith")
    # Without overrides the row's own data_source and ability stand.
    plain = normalize({"question": "Q?", "answer": "A", "data_source": "mine", "ability": "x"}, 1)
    assert (plain.data_source, plain.ability, plain.ground_truth) == ("mine", "x", "A")
    # A prompt field holding chat messages is used as the messages.
    chat = normalize({"msgs": [{"role": "user", "content": "hi"}], "answer": "5"}, 2, Fields(prompt="msgs"))
    assert chat.prompt == [{"role": "user", "content": "hi"}]


def test_math_rows_take_the_last_boxed_answer():
    solution = "First \\boxed{1}, then actually $\\boxed{\\frac{1}{2}}$."
    example = normalize(
        {"problem": "Half of one?", "solution": solution}, 0, Fields(data_source="DigitalLearningGmbH/MATH-lighteval")
    )
    assert example.ground_truth == "\\frac{1}{2}"
    assert example.prompt[0]["content"].endswith("output the final answer within \\boxed{}.")
    # MATH-500 rows carry the short answer in "answer": it wins over the solution.
    m500 = normalize(
        {"problem": "p", "solution": "s \\boxed{3}", "answer": "3"}, 1, Fields(data_source="HuggingFaceH4/MATH-500")
    )
    assert m500.ground_truth == "3"


def test_hellaswag_rows_become_lettered_multiple_choice():
    row = {"ctx": "A man [header] sits on a bench.", "activity_label": "Resting",
           "endings": ["he stands up.", "he flies.", "he melts.", "he sings."], "label": "0"}  # fmt: skip
    example = normalize(row, 0, Fields(data_source="Rowan/hellaswag"))
    content = example.prompt[0]["content"]
    assert content.startswith("Resting: A man sits on a bench.")
    assert "A. he stands up.\nB. he flies.\nC. he melts.\nD. he sings." in content
    assert content.endswith('"Answer: X".')
    assert example.ground_truth == "A"


@pytest.mark.parametrize("row, kind", [
    ({"answer": "#### 1"}, "missing field"),
    ({"question": "   ", "answer": "#### 1"}, "empty prompt"),
    ({"question": "Q", "answer": "seven"}, "bad ground truth"),
    ({"question": "Q", "answer": ""}, "missing field"),
    ({"prompt": [], "reward_model": {"ground_truth": "1"}}, "empty prompt"),
    ({"prompt": [{"role": "user", "content": ""}], "reward_model": {"ground_truth": "1"}}, "empty prompt"),
    ({"prompt": [{"role": "user", "content": "Q"}], "reward_model": {}}, "bad ground truth"),
    ({"prompt": [{"content": "Q"}], "reward_model": {"ground_truth": "1"}}, "missing field"),
    ({"question": "Q", "answer": {"not": "text"}}, "bad ground truth"),
    ([1, 2], "unreadable"),
    (UnreadableRow("line 3: invalid JSON"), "unreadable"),
])  # fmt: skip
def test_bad_rows_raise_bad_row_with_a_reason(row, kind):
    with pytest.raises(BadRow) as info:
        normalize(row, 0, Fields(data_source="openai/gsm8k"))
    assert info.value.kind == kind and info.value.reason


def test_bad_rows_are_skipped_counted_and_explained(tmp_path):
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [GSM8K_ROWS[0], "{not json", {"question": "Q"}, {"question": "Q", "answer": "x"}, GSM8K_ROWS[1]],
    )
    rows = load_rows(str(path))
    examples, skipped = select(rows, lambda raw, i: normalize(raw, i, Fields(data_source="openai/gsm8k")))
    assert [e.ground_truth for e in examples] == ["7", "24"]
    assert dict(skipped.counts) == {"unreadable": 1, "missing field": 1, "bad ground truth": 1}
    summary = skipped.summary()
    assert "skipped 3 rows" in summary and "mixed.jsonl line 2: invalid JSON" in summary
    assert "row 3: bad ground truth: no '#### <number>' in answer: 'x'" in summary


def test_json_files_and_folders_of_split_files(tmp_path):
    (tmp_path / "rows.json").write_text(json.dumps(GSM8K_ROWS))
    assert len(load_rows(str(tmp_path / "rows.json"))) == 3
    folder = tmp_path / "prepared"
    folder.mkdir()
    write_parquet(folder / "train.parquet", [verl_row("a", "1"), verl_row("b", "2")])
    write_jsonl(folder / "test.jsonl", [verl_row("c", "3")])
    assert [r["reward_model"]["ground_truth"] for r in load_rows(str(folder), "train")] == ["1", "2"]
    assert [r["reward_model"]["ground_truth"] for r in load_rows(str(folder), "test")] == ["3"]
    # Named for splits but not this one: an error, never the training file in disguise.
    with pytest.raises(SourceError, match="no file for split 'validation'"):
        load_rows(str(folder), "validation")
    shards = tmp_path / "shards"
    shards.mkdir()
    write_jsonl(shards / "part-0.jsonl", GSM8K_ROWS[:1])
    write_jsonl(shards / "part-1.jsonl", GSM8K_ROWS[1:])
    assert len(load_rows(str(shards), "train")) == 3
    with pytest.raises(SourceError, match="no such file"):
        load_rows(str(tmp_path / "missing.jsonl"))


def test_hub_names_go_to_datasets_load_dataset(monkeypatch):
    import datasets

    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or GSM8K_ROWS)
    assert not is_local("openai/gsm8k") and is_local("./gsm8k") and is_local("x.parquet")
    assert load_rows("openai/gsm8k", "test", "main") == GSM8K_ROWS
    assert calls == [(("openai/gsm8k", "main"), {"split": "test"})]


def test_shuffling_is_deterministic_and_limits_read_lazily():
    rows = [{"question": f"q{i}", "answer": str(i)} for i in range(50)]
    seen: list[int] = []

    def check(raw, index):
        seen.append(index)
        return normalize(raw, index, Fields(data_source="x"))

    first, _ = select(rows, check, shuffle=True, seed=3)
    again, _ = select(rows, check, shuffle=True, seed=3)
    other, _ = select(rows, check, shuffle=True, seed=4)
    assert [e.ground_truth for e in first] == [e.ground_truth for e in again]
    assert [e.ground_truth for e in first] != [e.ground_truth for e in other]
    assert sorted(e.ground_truth for e in first) == sorted(str(i) for i in range(50))
    seen.clear()
    limited, _ = select(rows, check, shuffle=True, seed=3, limit=5)
    assert [e.ground_truth for e in limited] == [e.ground_truth for e in first[:5]] and len(seen) == 5


# --- prompts --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def test_chat_prompts_use_the_template_and_plain_prompts_the_text(tokenizer):
    messages = [{"role": "user", "content": "What is 2+2?"}]
    chat = render_prompt(tokenizer, messages, "chat")
    assert chat.text == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat.text.endswith("<|im_start|>assistant\n")
    assert chat.token_ids == tokenizer.encode(chat.text)
    plain = render_prompt(tokenizer, messages, "plain", system_prompt="Be brief.")
    assert plain.text == "Be brief.\n\nWhat is 2+2?"
    assert plain.messages[0] == {"role": "system", "content": "Be brief."}
    with_system = render_prompt(tokenizer, messages, "chat", system_prompt="Be brief.")
    assert "<|im_start|>system\nBe brief.<|im_end|>" in with_system.text
    # A prompt that brings its own system message keeps it.
    own = [{"role": "system", "content": "Mine."}, *messages]
    assert render_prompt(tokenizer, own, "plain", system_prompt="Be brief.").text == "Mine.\n\nWhat is 2+2?"


class _BosTokenizer:
    """A tokenizer whose encode() adds BOS and whose chat template writes it too (Llama 3 style)."""

    bos_token, bos_token_id = "<s>", 0

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        return "<s>" + "".join(f"[{m['role']}]{m['content']}" for m in messages) + "[assistant]"

    def encode(self, text, add_special_tokens=True):
        return ([0] if add_special_tokens else []) + [ord(c) for c in text]


def test_a_template_bos_is_not_doubled_by_encode():
    rendered = render_prompt(_BosTokenizer(), [{"role": "user", "content": "hi"}], "chat")
    assert rendered.text == "[user]hi[assistant]"
    assert rendered.token_ids.count(0) == 1 and rendered.token_ids[0] == 0


# --- scoring --------------------------------------------------------------------------------


def gsm8k_example():
    return normalize(GSM8K_ROWS[0], 0, Fields(data_source="openai/gsm8k"))


def test_gsm8k_scores_correct_above_wrong_and_reports_format_separately():
    scorer, example = Scorer("verl"), gsm8k_example()
    correct = scorer(example, "3 + 4 = 7 apples.\n#### 7")
    wrong = scorer(example, "3 + 4 = 8 apples.\n#### 8")
    unformatted = scorer(example, "He has 7 apples.")
    assert correct == Score(1.0, True, True)
    # verl's gsm8k gives the wrong answer and the missing answer the same 0; format tells them apart.
    assert wrong == Score(0.0, False, True)
    assert unformatted == Score(0.0, False, False)
    assert correct.value > wrong.value
    shaped = Scorer("verl", format_score=0.1)
    assert shaped(example, "#### 8").value == 0.1 and shaped(example, "no number").value == 0.0


def test_math_scores_correct_above_wrong():
    scorer = Scorer("verl")
    lighteval = normalize(
        {"problem": "Half?", "solution": "\\boxed{\\frac12}"},
        0,
        Fields(data_source="DigitalLearningGmbH/MATH-lighteval"),
    )
    assert scorer(lighteval, "so it is \\boxed{\\frac{1}{2}}") == Score(1.0, True, True)  # verl normalises \frac12
    assert scorer(lighteval, "so it is \\boxed{2}") == Score(0.0, False, True)
    assert scorer(lighteval, "one half") == Score(0.0, False, False)
    # math_dapo returns a dict: -1/1 score, acc, and pred "[INVALID]" when nothing was found.
    dapo = normalize(verl_row("Q", "42", data_source="math_dapo"), 0)
    assert scorer(dapo, "Answer: 42") == Score(1.0, True, True)
    assert scorer(dapo, "Answer: 41") == Score(-1.0, False, True)
    assert scorer(dapo, "no idea") == Score(-1.0, False, False)


def test_a_users_scoring_function_by_import_path():
    scorer, example = Scorer(USER_REWARD), gsm8k_example()
    assert scorer(example, "it is 7") == Score(1.0, True, True)
    assert scorer(example, "it is 8") == Score(0.25, False, False)
    assert interpret({"score": 0.5, "correct": True, "formatted": True}, "", None) == Score(0.5, True, True)
    with pytest.raises(ValueError, match="package.module:function"):
        Scorer("not_a_path")
    with pytest.raises(ValueError, match="has no function"):
        Scorer(f"{__name__}:missing")
    with pytest.raises(ValueError, match="'score' key"):
        interpret({"acc": True}, "", None)


def test_rows_verl_cannot_score_are_bad_rows_unless_the_user_scores_them():
    unknown = normalize({"question": "Q", "answer": "A", "data_source": "my/dataset"}, 0)
    with pytest.raises(BadRow, match="no reward function for data_source 'my/dataset'"):
        Scorer("verl").check(unknown)
    with pytest.raises(BadRow, match="no data_source"):
        Scorer("verl").check(normalize({"question": "Q", "answer": "A"}, 0))
    Scorer(USER_REWARD).check(unknown)
    Scorer("verl").check(gsm8k_example())


# --- the environment ------------------------------------------------------------------------


def make_env(tiny_model: str, server_type: str = "vllm", **settings: Any) -> DatasetEnv:
    config, servers = DatasetEnv.config_init()
    fields = {**config.model_dump(), "tokenizer_name": tiny_model, **settings}
    server = servers[0].model_copy(
        update={"model_name": tiny_model, "tokenizer_name": tiny_model, "server_type": server_type}
    )
    return DatasetEnv(DatasetEnvConfig(**fields), [server])


def test_env_setup_filters_long_prompts_and_bad_rows_and_logs_the_counts(tiny_model, tmp_path, caplog):
    rows = [*GSM8K_ROWS, {"question": "word " * 300, "answer": "#### 1"}, {"question": "Q"}, "{broken"]
    source = write_jsonl(tmp_path / "train.jsonl", rows)
    env = make_env(tiny_model, source=str(source), data_source="openai/gsm8k", max_prompt_length=128, shuffle=False)
    with caplog.at_level(logging.INFO, logger="atropos_verl"):
        asyncio.run(env.setup())
    assert [p.example.ground_truth for p in env.prompts] == ["7", "24", "2000"]
    assert all(len(p.rendered.token_ids) <= 128 for p in env.prompts)
    line = next(r.getMessage() for r in caplog.records if "train data" in r.getMessage())
    assert "3 prompts from 6 of its 6 rows" in line
    assert (
        "skipped 3 rows (" in line
        and "prompt too long 1" in line
        and "missing field 1" in line
        and "unreadable 1" in line
    )
    assert "row 3: prompt too long: " in line and "> max_prompt_length 128" in line
    assert env.config.steps_per_eval == 0  # nothing to evaluate: never pause training for it


def test_env_with_no_usable_rows_fails_at_start_up_with_the_reasons(tiny_model, tmp_path):
    source = write_jsonl(tmp_path / "bad.jsonl", [{"question": "Q", "answer": "x"}])
    env = make_env(tiny_model, source=str(source), data_source="openai/gsm8k")
    with pytest.raises(SourceError, match=r"no usable train prompts .*\(bad ground truth 1\)"):
        asyncio.run(env.setup())


def test_env_items_are_a_deterministic_reshuffled_stream(tiny_model, tmp_path):
    rows = [{"question": f"What is {i} + 0?", "answer": f"#### {i}"} for i in range(6)]
    source = str(write_jsonl(tmp_path / "t.jsonl", rows))

    def stream(seed):
        env = make_env(tiny_model, source=source, data_source="openai/gsm8k", seed=seed)
        asyncio.run(env.setup())

        async def take():
            return [env.prompts[await env.get_next_item()].example.ground_truth for _ in range(18)]

        return asyncio.run(take())

    first = stream(1)
    assert first == stream(1) and first != stream(2)
    epochs = [first[i : i + 6] for i in range(0, 18, 6)]
    assert all(sorted(e) == [str(i) for i in range(6)] for e in epochs)  # every prompt once per epoch
    assert epochs[0] != epochs[1]  # reshuffled each epoch


def test_collect_builds_a_group_with_masks_scores_and_format_metrics(tiny_model, tmp_path, monkeypatch):
    source = str(write_jsonl(tmp_path / "t.jsonl", GSM8K_ROWS[:1]))
    env = make_env(tiny_model, source=source, data_source="openai/gsm8k", group_size=4, temperature=0.7)
    asyncio.run(env.setup())
    replies = ["so #### 7", "so #### 8", "seven", "#### 7"]

    async def fake_sample(prompt, n, temperature):
        assert (n, temperature) == (4, 0.7)
        prompt_len = len(prompt.token_ids)
        return [
            Sample(
                prompt.token_ids + [5, 6], [-100] * prompt_len + [5, 6], [1.0] * prompt_len + [-0.5, -0.5], text, "stop"
            )
            for text in replies
        ]

    monkeypatch.setattr(env, "_sample", fake_sample)
    group, backlog = asyncio.run(env.collect_trajectories(0))
    assert backlog == []
    assert group["scores"] == [1.0, 0.0, 0.0, 1.0]
    assert group["group_overrides"] == {"metrics": {"correct": 0.5, "formatted": 0.75}}
    assert group["generation_params"] == {"temperature": 0.7}
    assert len(group["inference_logprobs"]) == 4
    assert env.total.means()["formatted"] == 0.75


def test_openai_server_type_tokenizes_chat_and_plain_answers(tiny_model, tmp_path, tokenizer):
    source = str(write_jsonl(tmp_path / "t.jsonl", GSM8K_ROWS[:1]))
    calls: dict[str, dict] = {}

    async def chat_completion(**kwargs):
        calls["chat"] = kwargs
        return SimpleNamespace(
            choices=[SimpleNamespace(message=SimpleNamespace(content="#### 7"), finish_reason="stop")]
        )

    async def completion(**kwargs):
        calls["completion"] = kwargs
        return SimpleNamespace(choices=[SimpleNamespace(text=" #### 7", finish_reason="stop")])

    for prompt_format in ("chat", "plain"):
        env = make_env(tiny_model, "openai", source=source, data_source="openai/gsm8k", prompt_format=prompt_format,
                       group_size=1, max_response_length=17)  # fmt: skip
        asyncio.run(env.setup())
        env.server.chat_completion, env.server.completion = chat_completion, completion
        group, _ = asyncio.run(env.collect_trajectories(0))
        tokens, masks = group["tokens"][0], group["masks"][0]
        prompt_len = sum(1 for m in masks if m == -100)
        assert masks[:prompt_len] == [-100] * prompt_len and masks[prompt_len:] == tokens[prompt_len:]
        answer = tokenizer.decode(tokens[prompt_len:], skip_special_tokens=True)
        assert "#### 7" in answer and group["scores"] == [1.0]
        assert "inference_logprobs" not in group
    assert calls["chat"]["max_tokens"] == 17 and calls["chat"]["messages"][0]["role"] == "user"
    assert calls["completion"]["prompt"].endswith('after "####".') and tokens[-1] == tokenizer.eos_token_id


def test_scoring_failures_score_zero_and_are_counted(tiny_model, tmp_path):
    env = make_env(
        tiny_model, source=str(write_jsonl(tmp_path / "t.jsonl", GSM8K_ROWS[:1])), data_source="openai/gsm8k"
    )
    asyncio.run(env.setup())
    env.scorer = Scorer(f"{__name__}:exploding_reward")
    assert env._score(env.prompts[0].example, "anything") == Score(0.0, False, False)
    assert env.scoring_failures == 1


def exploding_reward(solution_str, ground_truth, extra_info):
    raise RuntimeError("boom")


def test_evaluate_scores_held_out_data_greedily_and_logs_eval_metrics(tiny_model, tmp_path, monkeypatch, caplog):
    train = write_jsonl(tmp_path / "train.jsonl", GSM8K_ROWS)
    held_out = write_jsonl(tmp_path / "test.jsonl", GSM8K_ROWS[:2])
    evals = tmp_path / "evals"
    env = make_env(tiny_model, source=str(train), eval_source=str(held_out), data_source="openai/gsm8k",
                   data_dir_to_save_evals=str(evals), steps_per_eval=5)  # fmt: skip
    asyncio.run(env.setup())
    assert env.config.steps_per_eval == 5 and len(env.eval_prompts) == 2

    async def fake_sample(prompt, n, temperature):
        assert (n, temperature) == (1, 0.0)
        text = "#### 7" if "apples" in prompt.text else "no idea"
        return [Sample(prompt.token_ids, [-100] * len(prompt.token_ids), None, text, "stop")]

    monkeypatch.setattr(env, "_sample", fake_sample)
    with caplog.at_level(logging.INFO, logger="atropos_verl"):
        asyncio.run(env.evaluate())
    assert env.pending_eval_metrics == {
        "eval/correct": 0.5,
        "eval/formatted": 0.5,
        "eval/score": 0.5,
        "eval/prompts": 2.0,
    }
    assert any("eval at step 0 on 2 prompts (greedy): correct 0.500" in r.getMessage() for r in caplog.records)
    saved = json.loads((evals / "metrics.json").read_text())
    assert saved["results"]["all"]["eval/correct"] == 0.5
    assert len((evals / "samples.jsonl").read_text().splitlines()) == 2
    # The next wandb_log carries the eval metrics once (wandb itself is off here).
    logged: list[dict] = []

    async def base_wandb_log(self, metrics=None):
        logged.append(metrics)

    monkeypatch.setattr("atroposlib.envs.base.BaseEnv.wandb_log", base_wandb_log)
    asyncio.run(env.wandb_log({}))
    asyncio.run(env.wandb_log({}))
    assert logged[0]["eval/correct"] == 0.5 and "eval/correct" not in logged[1]


# --- prepare --------------------------------------------------------------------------------


def test_prepare_writes_verl_parquet_that_loads_back_unchanged(tmp_path, capsys):
    source = write_jsonl(tmp_path / "raw.jsonl", [*GSM8K_ROWS, {"question": "Q", "answer": "none"}])
    code = prepare_cli.main(["gsm8k", "--out", str(tmp_path / "out"), "--source", str(source)])
    assert code == 0
    assert "wrote 3 rows to" in capsys.readouterr().out
    table = pq.read_table(tmp_path / "out" / "train.parquet")
    assert table.column_names == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
    prepared = [normalize(row, i) for i, row in enumerate(load_rows(str(tmp_path / "out"), "train"))]
    direct = [normalize(row, i, Fields(data_source="openai/gsm8k")) for i, row in enumerate(GSM8K_ROWS)]
    for got, want in zip(prepared, direct):
        assert (got.prompt, got.ground_truth, got.data_source, got.ability) == (
            want.prompt,
            want.ground_truth,
            want.data_source,
            want.ability,
        )
        assert got.extra_info["split"] == "train"
    assert len(prepared) == 3


def test_prepare_jsonl_with_field_flags_and_errors(tmp_path, capsys):
    source = write_jsonl(tmp_path / "mine.jsonl", [{"q": "Double 21?", "a": "42"}])
    code = prepare_cli.main(["jsonl", "--out", str(tmp_path / "o"), "--source", str(source), "--split", "test",
                             "--prompt-field", "q", "--answer-field", "a", "--data-source", "math_dapo"])  # fmt: skip
    assert code == 0
    (row,) = pq.read_table(tmp_path / "o" / "test.parquet").to_pylist()
    assert row["prompt"] == [{"role": "user", "content": "Double 21?"}] and row["reward_model"]["ground_truth"] == "42"
    assert prepare_cli.main(["jsonl", "--out", str(tmp_path / "o")]) == 2
    no_source = [
        "jsonl",
        "--out",
        str(tmp_path / "o"),
        "--source",
        str(source),
        "--prompt-field",
        "q",
        "--answer-field",
        "a",
    ]
    assert prepare_cli.main(no_source) == 2
    errors = capsys.readouterr().err
    assert "jsonl needs --source" in errors and "(no data_source 1)" in errors


# --- the data config groups -----------------------------------------------------------------


def composed(*overrides: str):
    with initialize_config_dir(CONF, version_base=None):
        cfg = compose("config", overrides=list(overrides))
    cfg.trainer.run_dir = "."
    cfg.trainer.experiment_name = "test"
    return cfg


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


@pytest.mark.parametrize("group", ["gsm8k", "math", "hellaswag", "gsm8k_math"])
def test_dataset_groups_compose_into_dataset_environments(group):
    run = load_config(composed(f"data={group}"))
    assert run.data.envs and all(env.module == "atropos_verl.envs.dataset" for env in run.data.envs)
    for env in run.data.envs:
        config = DatasetEnvConfig(**{a[len("--env.") :]: b for a, b in zip(env.argv()[::2], env.argv()[1::2])})
        assert config.source and config.max_response_length == run.data.max_response_length


def test_data_keys_reach_the_environment_arguments():
    run = load_config(
        composed(
            "data=gsm8k",
            "data.path=/data/train.jsonl",
            "data.max_prompts=5",
            "data.eval_path=/data/test.jsonl",
            "data.group_size=4",
            "data.max_response_length=300",
        )
    )
    args = run.data.envs[0].argv()
    assert flag(args, "--env.source") == "/data/train.jsonl" and flag(args, "--env.max_prompts") == "5"
    assert flag(args, "--env.eval_source") == "/data/test.jsonl" and flag(args, "--env.group_size") == "4"
    assert flag(args, "--env.max_response_length") == "300" and flag(args, "--env.data_source") == "openai/gsm8k"
    mixed = load_config(composed("data=gsm8k_math"))
    assert [flag(e.argv(), "--env.inference_weight") for e in mixed.data.envs] == ["2.0", "1.0"]


@pytest.mark.parametrize("overrides, key", [
    (["data=parquet"], "data.path"),
    (["data=jsonl"], "data.path"),
    (["data=gsm8k", "trainer.max_token_len=1024"], "data.max_response_length"),
    (["data=gsm8k", "trainer.batch_size=12"], "data.group_size"),
    (["data=gsm8k", "data.max_prompts=-1"], "data.max_prompts"),
    (["data=gsm8k", "data.reward_fn=nonsense"], "data.reward_fn"),
    (["data=gsm8k", "data.split="], "data.split"),
])  # fmt: skip
def test_bad_data_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        load_config(composed(*overrides))
    assert key in str(info.value)
