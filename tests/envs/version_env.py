"""A real ``BaseEnv`` that reports which policy version sampled each group, through a channel of its own.

It posts the vLLM-native ``/generate`` request to the gateway itself and reads the
``policy_version`` field of the answer, which it sends as the group's env metric
``sampled_version``; the trainer logs its mean as ``env/sampled_version``. The trainer's
own staleness comes from the gateway's lineage (token ids), so a test can compare the
two. Tokens, masks and ``inference_logprobs`` are the sampler's exact ones; the reward
is the parity score of :mod:`parity_env`, so training moves the policy.
"""

from __future__ import annotations

import aiohttp
from atroposlib.envs.base import APIServerConfig, BaseEnv, BaseEnvConfig, ScoredDataGroup

from atropos_verl.envs.sampling import placeholder_server, supervised_env_defaults

PROMPT = [{"role": "user", "content": "Write a few words."}]
MAX_NEW_TOKENS = 8
REQUEST_TIMEOUT_S = 120


class VersionEnv(BaseEnv):
    name = "version"

    @classmethod
    def config_init(cls) -> tuple[BaseEnvConfig, list[APIServerConfig]]:
        config = BaseEnvConfig(
            **supervised_env_defaults(cls.name),
            group_size=4,
            max_num_workers=2,
            max_batches_offpolicy=2,
            steps_per_eval=0,
            ensure_scores_are_not_same=False,
        )
        return config, placeholder_server()

    async def setup(self):
        ids = self.tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_dict=False)
        self.prompt_ids = list(ids)

    async def get_next_item(self):
        return PROMPT

    async def collect_trajectories(self, item):
        server = self.server.servers[0].config
        body = {
            "prompt": {"prompt_token_ids": self.prompt_ids},
            "n": self.config.group_size,
            "max_tokens": MAX_NEW_TOKENS,
            "temperature": 1.0,
            "logprobs": 0,
        }
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as session:
            async with session.post(
                server.base_url.removesuffix("/v1") + "/generate",
                json=body,
                headers={"Authorization": f"Bearer {server.api_key}"},
            ) as response:
                response.raise_for_status()
                answer = await response.json()
        prompt = self.prompt_ids
        group = ScoredDataGroup(tokens=[], masks=[], scores=[], inference_logprobs=[])
        for completion, positions in zip(answer["token_ids"], answer["logprobs"]):
            group["tokens"].append(prompt + completion)
            group["masks"].append([-100] * len(prompt) + completion)
            sampled = [entry[0][str(token)] for token, entry in zip(completion, positions)]
            group["inference_logprobs"].append([1.0] * len(prompt) + sampled)
            group["scores"].append(sum(t % 2 == 0 for t in completion) / max(len(completion), 1))
        group["generation_params"] = {"temperature": 1.0}
        group["group_overrides"] = {"metrics": {"sampled_version": answer["policy_version"]}}
        return group, []

    async def evaluate(self, *args, **kwargs):
        return None


if __name__ == "__main__":
    VersionEnv.cli()
