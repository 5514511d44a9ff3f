"""A real atroposlib ``BaseEnv`` that samples the policy through an inference server.

Each item asks for a short completion of a fixed chat prompt; a completion scores
the fraction of its tokens with an even id. With ``server_type vllm`` (or ``sglang``)
it uses ``ManagedServer`` for exact tokens and sampler log-probs; with ``openai`` it
gets text from chat completions and tokenizes the chat itself. The reward depends only on tokens the
policy chose, so advantage-weighted training can raise it, and the groups carry
exact tokens, masks and ``inference_logprobs`` from ``ManagedServer``. Run with::

    python tests/envs/parity_env.py serve --env.rollout_server_url API \\
        --env.tokenizer_name MODEL_DIR --openai.base_url GATEWAY/v1 \\
        --openai.model_name NAME --openai.server_type vllm
"""

from __future__ import annotations

from atroposlib.envs.base import APIServerConfig, BaseEnv, BaseEnvConfig, ScoredDataGroup
from ledger import PostLedger
from pydantic import Field

from atropos_verl.envs.sampling import supervised_env_defaults

PROMPT = [{"role": "user", "content": "Write a few words."}]


def parity_score(completion_tokens: list[int]) -> float:
    if not completion_tokens:
        return 0.0
    return sum(1 for t in completion_tokens if t % 2 == 0) / len(completion_tokens)


class ParityEnvConfig(BaseEnvConfig):
    max_new_tokens: int = Field(default=8, description="Tokens sampled per completion")
    temperature: float = Field(default=1.0, description="Sampling temperature")


class ParityEnv(PostLedger, BaseEnv):
    name = "parity"
    env_config_cls = ParityEnvConfig

    @classmethod
    def config_init(cls):
        config = ParityEnvConfig(
            **supervised_env_defaults(cls.name),
            group_size=4,
            max_num_workers=2,
            max_batches_offpolicy=2,
            steps_per_eval=0,
            ensure_scores_are_not_same=False,
        )
        server = APIServerConfig(
            base_url="http://127.0.0.1:9000/v1", model_name="policy", server_type="vllm", api_key="unused"
        )
        return config, [server]

    async def setup(self):
        pass

    async def get_next_item(self):
        return PROMPT

    async def collect_trajectories(self, item):
        if self.server.servers[0].config.server_type == "openai":
            return await self._collect_via_chat(item), []
        prompt = self.tokenizer.apply_chat_template(item, tokenize=False, add_generation_prompt=True)
        async with self.server.managed_server(tokenizer=self.tokenizer) as managed:
            await managed.completion(
                prompt=prompt,
                n=self.config.group_size,
                max_tokens=self.config.max_new_tokens,
                temperature=self.config.temperature,
            )
            nodes = managed.get_state()["nodes"]
        group = ScoredDataGroup(tokens=[], masks=[], scores=[], inference_logprobs=[])
        for node in nodes:
            completion = [t for t, m in zip(node.tokens, node.masked_tokens) if m != -100]
            group["tokens"].append(node.tokens)
            group["masks"].append(node.masked_tokens)
            group["inference_logprobs"].append(node.logprobs)
            group["scores"].append(parity_score(completion))
        group["generation_params"] = {"temperature": self.config.temperature}
        return group, []

    async def _collect_via_chat(self, messages):
        """The OpenAI server type gives text only: tokenize the chat here, as such environments do.

        (atroposlib's tokenize_for_trainer returns a BatchEncoding under transformers 5,
        so the ids are taken from apply_chat_template directly.)
        """
        completion = await self.server.chat_completion(
            messages=messages,
            n=self.config.group_size,
            max_tokens=self.config.max_new_tokens,
            temperature=self.config.temperature,
        )
        prefix = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        group = ScoredDataGroup(tokens=[], masks=[], scores=[])
        for choice in completion.choices:
            chat = messages + [{"role": "assistant", "content": choice.message.content or ""}]
            tokens = list(self.tokenizer.apply_chat_template(chat, return_dict=False))
            group["tokens"].append(tokens)
            group["masks"].append([-100] * len(prefix) + tokens[len(prefix) :])
            group["scores"].append(parity_score(tokens[len(prefix) :]))
        return group

    async def evaluate(self, *args, **kwargs):
        return None


if __name__ == "__main__":
    ParityEnv.cli()
