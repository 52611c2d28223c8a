"""An exact denoiser for a small known joint distribution, written as an MDMForMaskedDiffusion subclass.

Sequences of length 4 over 3 real tokens (ids 0, 1, 2; [MASK] = 3). The conditionals p(x0_l | visible tokens)
are computed by enumerating all 81 sequences, so a correct sampler must reproduce the joint exactly.
"""

import itertools

import torch
from transformers.modeling_outputs import MaskedLMOutput

from hf_mdm import MDMConfig, MDMForMaskedDiffusion


LENGTH, TOKENS, MASK = 4, 3, 3
SEQUENCES = torch.tensor(list(itertools.product(range(TOKENS), repeat=LENGTH)))  # (81, 4)
ALL_INPUTS = torch.tensor(list(itertools.product(range(TOKENS + 1), repeat=LENGTH)))  # (256, 4), [MASK] included


def correlated_joint(seed: int = 0) -> torch.Tensor:
    """Random weights times a strong bonus for equal neighbours, so positions are far from independent."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.rand(len(SEQUENCES), generator=generator, dtype=torch.float64) + 0.5
    equal_neighbours = (SEQUENCES[:, 1:] == SEQUENCES[:, :-1]).sum(1).double()
    joint = base * torch.exp(1.2 * equal_neighbours)
    return joint / joint.sum()


def oracle_config(**overrides) -> MDMConfig:
    fields = dict(vocab_size=TOKENS + 1, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, cond_dim=8,
                  max_position_embeddings=16, dropout=0.0)
    fields.update(overrides)
    return MDMConfig(**fields)


class OracleDenoiser(MDMForMaskedDiffusion):
    """Overrides forward only: generate() must get every prediction through it.

    With `time_conditioning`, the joint depends on the time input: the data distribution is a mixture whose
    weights are a function of the noise level, so a sampler that feeds the wrong time gets the wrong samples.
    """

    def __init__(self, config, joint=None, time_joint=None):
        super().__init__(config)
        self.joint = correlated_joint() if joint is None else joint
        self.time_joint = time_joint  # callable: timesteps (B,) -> joint (B, 81)

    def forward(self, input_ids, attention_mask=None, timesteps=None, output_positions=None, **kwargs):
        if self.time_joint is None:
            # Only 4^4 partly masked inputs exist: look their conditionals up in a table computed once.
            if not hasattr(self, "_table"):
                self._table = self.conditional_logits(ALL_INPUTS, self.joint.expand(len(ALL_INPUTS), -1))
            logits = self._table[(input_ids * (TOKENS + 1) ** torch.arange(LENGTH - 1, -1, -1)).sum(-1)]
        else:
            logits = self.conditional_logits(input_ids, self.time_joint(timesteps))
        if output_positions is not None:
            logits = logits.gather(1, output_positions[..., None].expand(-1, -1, TOKENS + 1))
        return MaskedLMOutput(logits=logits.float())

    @staticmethod
    def conditional_logits(ids: torch.Tensor, joint: torch.Tensor) -> torch.Tensor:
        """(B, L) partly masked inputs and (B, 81) joints -> (B, L, 4) log p(x0_l | visible), [MASK] = -inf."""
        visible = ids != MASK
        consistent = ((ids[:, None, :] == SEQUENCES[None]) | ~visible[:, None, :]).all(-1)  # (B, 81)
        onehot = torch.nn.functional.one_hot(SEQUENCES, TOKENS).double()  # (81, L, 3)
        marginals = torch.einsum("bs,slv->blv", consistent.double() * joint, onehot)
        marginals = marginals / marginals.sum(-1, keepdim=True)
        mask_column = torch.full((len(ids), LENGTH, 1), float("-inf"), dtype=torch.float64)
        return torch.cat([marginals.log(), mask_column], -1)


def sequence_index(samples: torch.Tensor) -> torch.Tensor:
    """(N, 4) samples -> (N,) index into SEQUENCES."""
    return (samples * (TOKENS ** torch.arange(LENGTH - 1, -1, -1))).sum(-1)
