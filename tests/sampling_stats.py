"""The statistical check of sampled tokens against a reference model's own probabilities (used
by test_sampling.py and test_real_model.py; a helper module, not a test module).

Over many sampled steps, the sum of an observed quantity (the sampled token's log-probability;
whether it was the argmax) is compared with its expectation under the reference distribution at
that step, in standard deviations (z). A pipeline that samples only the first token and then
decodes greedily gives an argmax rate of 1 and z-scores above 10.
"""
from __future__ import annotations

import math

import torch

Z_LIMIT = 5.0    # |z| above this has probability < 1e-6 for a correct sampler


def z_score(observed: list[float], expected: list[float], variance: list[float]) -> float:
    return (sum(observed) - sum(expected)) / math.sqrt(max(sum(variance), 1e-12))


class Draws:
    """Sampled steps and what the reference model expected of each."""

    def __init__(self):
        self.logp_obs, self.logp_exp, self.logp_var = [], [], []
        self.top_obs, self.top_exp, self.top_var = [], [], []

    def add(self, tokens: list[int], logits: torch.Tensor, temperature: float, first: int = 1) -> None:
        """``tokens`` sampled at ``temperature``; ``logits``: the reference's (len(tokens), vocab),
        teacher-forced; steps from ``first`` on count (1: decode steps only)."""
        logp = torch.log_softmax(logits.float() / temperature, dim=-1)
        for step in range(first, len(tokens)):
            lp, p = logp[step], logp[step].exp()
            mean = float((p * lp).sum())
            self.logp_obs.append(float(lp[tokens[step]]))
            self.logp_exp.append(mean)
            self.logp_var.append(float((p * lp * lp).sum()) - mean * mean)
            p_top = float(p.max())
            self.top_obs.append(float(tokens[step] == int(lp.argmax())))
            self.top_exp.append(p_top)
            self.top_var.append(p_top * (1 - p_top))

    @property
    def expected_argmax_rate(self) -> float:
        return sum(self.top_exp) / len(self.top_exp)

    def check(self) -> None:
        """Both z-scores within Z_LIMIT."""
        argmax_rate = sum(self.top_obs) / len(self.top_obs)
        assert abs(z_score(self.top_obs, self.top_exp, self.top_var)) < Z_LIMIT, (argmax_rate,
                                                                                  self.expected_argmax_rate)
        assert abs(z_score(self.logp_obs, self.logp_exp, self.logp_var)) < Z_LIMIT, (sum(self.logp_obs),
                                                                                     sum(self.logp_exp))
