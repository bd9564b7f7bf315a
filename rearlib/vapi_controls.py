"""Controls of VA-π post-training: runs that differ from the method in one respect, with the same seeds, to tell
what the reward contributes (:attr:`rearlib.vapi.VAPIConfig.control`).

* ``"prior_only"``: the update is the CE prior (β · CE, plus κ · KL if configured) alone; rollouts and rewards are
  still computed and logged. It is the paper's Table 4 row without a reward term, and the floor a reward must beat.
* ``"shuffled_rewards"``: the rewards of a round are permuted across the whole batch before the advantages
  (:func:`shuffle_rewards`), so the update sees rewards with the method's values and spread but no relation to the
  samples they are attached to. A reward that helps must beat this run; if it does not, the gains come from the
  update's other parts (the CE prior, the ratio's dropout noise, the step itself).

The per-scale list of controls is ``rearlib.scales.VAPI[scale]["controls"]``; :func:`rearlib.vapi_config.
control_configs` builds their configs from one base config.
"""

from __future__ import annotations

import torch

from rearlib.vapi_config import CONTROLS

__all__ = ["CONTROLS", "shuffle_rewards", "shuffle_generator"]

#: Offset of the shuffle stream's seed from ``VAPIConfig.seed`` (the data order uses seed, the rollout seed + 1,
#: dropout seed + 2): a separate stream, so that a shuffled run draws the same contexts and samples as the method.
SHUFFLE_SEED_OFFSET = 3


def shuffle_generator(seed: int) -> torch.Generator:
    """The CPU generator that :func:`rearlib.vapi.post_train` draws reward permutations from for ``seed``."""
    return torch.Generator(device="cpu").manual_seed(int(seed) + SHUFFLE_SEED_OFFSET)


def shuffle_rewards(rewards: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``rewards`` with its values permuted across all of its entries by ``generator`` (a CPU generator).

    ``rewards``: [B * G] or [B, G]; the permutation runs over all B·G values (not within a group, where it would
    only relabel the group's samples), and the result has the input's shape and device. The same generator state
    gives the same permutation; the multiset of values is unchanged.
    """
    if not torch.is_tensor(rewards) or not rewards.is_floating_point():
        raise TypeError("rewards must be a float tensor")
    if rewards.numel() < 2:
        raise ValueError(f"shuffling needs at least 2 rewards, got {rewards.numel()}")
    if generator is None or generator.device.type != "cpu":
        raise ValueError("shuffle_rewards needs a CPU torch.Generator (see shuffle_generator), so that the "
                         "permutation is the same on every device")
    perm = torch.randperm(rewards.numel(), generator=generator).to(rewards.device)
    return rewards.reshape(-1)[perm].reshape(rewards.shape)
