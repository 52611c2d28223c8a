"""Exact values, by enumeration on the oracle denoiser (tests/oracle.py), of what each RL log-probability estimator
estimates: the expectation of its sequence estimate over its own random masks, the exact log p(completion | prompt)
and the exact ELBO. Shared by tests/test_rl.py and benchmarks/rl_estimators.py."""

import itertools
import math

import numpy as np
import torch

from oracle import LENGTH, MASK, SEQUENCES, OracleDenoiser, oracle_config


def oracle() -> OracleDenoiser:
    return OracleDenoiser(oracle_config())


def conditional_logps(model, ids: torch.Tensor) -> torch.Tensor:
    """(4,) sequence with [MASK]s -> (4, 3) log p(x_l = v | visible), float64."""
    return model.conditional_logits(ids[None], model.joint[None])[0, :, :3]


def exact_logp(model, sequence: list[int], prompt_length: int) -> float:
    joint = model.joint
    match = (SEQUENCES == torch.tensor(sequence)).all(1)
    prefix = (SEQUENCES[:, :prompt_length] == torch.tensor(sequence[:prompt_length])).all(1)
    return math.log(float(joint[match].sum())) - math.log(float(joint[prefix].sum()))


def masked_logps(model, sequence: list[int], masked: tuple[int, ...]) -> dict[int, float]:
    ids = torch.tensor(sequence)
    ids[list(masked)] = MASK
    table = conditional_logps(model, ids)
    return {j: float(table[j, sequence[j]]) for j in masked}


def expected_diffu_grpo(model, sequence, prompt_length, p_mask_prompt) -> float:
    """Sum over prompt-mask patterns (each prompt token masked with probability p) of the pattern's probability times
    the sum of log p(y_j | masked prompt, completion all masked)."""
    completion = tuple(range(prompt_length, LENGTH))
    total = 0.0
    for pattern in itertools.product([False, True], repeat=prompt_length):
        chosen = tuple(i for i, m in enumerate(pattern) if m)
        probability = p_mask_prompt ** len(chosen) * (1 - p_mask_prompt) ** (prompt_length - len(chosen))
        logps = masked_logps(model, sequence, chosen + completion)
        total += probability * sum(logps[j] for j in completion)
    return total


def expected_coupled(model, sequence, prompt_length, t_low=0.2, t_high=0.8, nodes=24) -> float:
    """(1/2) sum_j log p(y_j | completion masked) + (1/2) E_t sum over subsets S of the completion, with
    P(S) = t^|S| (1-t)^(m-|S|), of [sum_{j in S} logp_S(j) / t + sum_{j not in S} logp_{S^c}(j) / (1 - t)]:
    a polynomial in t, integrated exactly by Gauss-Legendre."""
    completion = tuple(range(prompt_length, LENGTH))
    m = len(completion)
    full = masked_logps(model, sequence, completion)
    subsets = [S for r in range(m + 1) for S in itertools.combinations(completion, r)]
    scored = {S: masked_logps(model, sequence, S) for S in subsets if S}
    x, w = np.polynomial.legendre.leggauss(nodes)
    ts = t_low + (t_high - t_low) * (x + 1) / 2
    expectation = 0.0
    for t, weight in zip(ts, w):
        value = 0.0
        for S in subsets:
            probability = t ** len(S) * (1 - t) ** (m - len(S))
            complement = tuple(j for j in completion if j not in S)
            value += probability * (sum(scored[S].values()) / t if S else 0.0)
            value += probability * (sum(scored[complement].values()) / (1 - t) if complement else 0.0)
        expectation += weight / 2 * value  # Gauss-Legendre on [-1, 1]; the uniform density cancels the Jacobian
    return 0.5 * sum(full.values()) + 0.5 * expectation


def exact_elbo(model, sequence, prompt_length) -> float:
    """The ELBO over the number of masked tokens: E_l E_S (m / l) sum_{j in S} log p(y_j | y outside S)."""
    completion = tuple(range(prompt_length, LENGTH))
    m = len(completion)
    total = 0.0
    for size in range(1, m + 1):
        subsets = list(itertools.combinations(completion, size))
        for S in subsets:
            total += (1 / m) * (1 / len(subsets)) * (m / size) * sum(masked_logps(model, sequence, S).values())
    return total
