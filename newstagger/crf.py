"""Learned tag transitions: a linear-chain CRF over the BIO tags, restricted to valid sequences.

The token head's scores say how well each tag fits each token alone; the CRF adds a score for
every tag -> tag move (and for the first tag), trained with the sequence likelihood, so the
decoder learns how entities start, continue and end (an O -> B- move must earn its place;
a short I- run is likely to continue). Invalid BIO moves stay forbidden, as in
`decoding.bio_transitions`; with all learned scores at zero the CRF decodes exactly like the
constrained Viterbi, which is why it can be attached to a trained model.

Partial labels (see training.train.TagTargets) train the usual way for a CRF: the loss is
log Z(all paths) - log Z(paths through the allowed tags), the negative log-probability of the
set of paths the labels allow.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .decoding import bio_transitions

# Stands in for -inf inside the forward algorithm: a row of only -inf gives NaN gradients.
FORBIDDEN = -1e4


class BioCrf(nn.Module):
    def __init__(self, num_tags: int):
        super().__init__()
        self.transitions = nn.Parameter(torch.zeros(num_tags, num_tags))
        self.start = nn.Parameter(torch.zeros(num_tags))

    @property
    def num_tags(self) -> int:
        return self.start.shape[0]

    def scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(transitions [T, T], start [T]) with invalid BIO moves forbidden.

        The rules are rebuilt here, not kept as buffers: `from_pretrained` leaves buffers that are
        not in the checkpoint uninitialised.
        """
        transitions, start = bio_transitions((self.num_tags - 1) // 2)
        device = self.transitions.device
        return (self.transitions.masked_fill(torch.from_numpy(np.isinf(transitions)).to(device), FORBIDDEN),
                self.start.masked_fill(torch.from_numpy(np.isinf(start)).to(device), FORBIDDEN))

    def decoding_scores(self) -> tuple[np.ndarray, np.ndarray]:
        """What `decoding.constrained_viterbi` adds to the token log-probabilities (-inf forbidden)."""
        transitions, start = bio_transitions((self.num_tags - 1) // 2)
        return (transitions + self.transitions.detach().float().cpu().numpy(),
                start + self.start.detach().float().cpu().numpy())

    def log_partition(self, emissions: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """log of the summed exp-scores of all valid paths, per row: emissions [B, L, T] (disallowed
        tags already at FORBIDDEN), lengths [B] >= 1; positions past a row's length are ignored."""
        transitions, start = self.scores()
        alpha = emissions[:, 0] + start
        for t in range(1, emissions.shape[1]):
            step = torch.logsumexp(alpha.unsqueeze(2) + transitions, dim=1) + emissions[:, t]
            alpha = torch.where((t < lengths).unsqueeze(1), step, alpha)
        return torch.logsumexp(alpha, dim=1)

    def negative_log_likelihood(self, emissions: torch.Tensor, allowed: torch.Tensor,
                                lengths: torch.Tensor) -> torch.Tensor:
        """-log P(the path lies in the allowed tags) per row; allowed [B, L, T] bool."""
        both = torch.cat([emissions, emissions.masked_fill(~allowed, FORBIDDEN)])
        log_z = self.log_partition(both, lengths.repeat(2))
        return log_z[: len(emissions)] - log_z[len(emissions) :]

    def grown(self, num_tags: int) -> "BioCrf":
        """A CRF over more tags (appended ones), keeping the learned scores of the existing tags."""
        crf = BioCrf(num_tags).to(self.transitions.device)
        with torch.no_grad():
            crf.transitions[: self.num_tags, : self.num_tags] = self.transitions
            crf.start[: self.num_tags] = self.start
        return crf
