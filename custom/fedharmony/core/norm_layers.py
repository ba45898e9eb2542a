"""What counts as a normalization layer, in the one place it is defined (no NVFlare import).

Two views of the same layers: :data:`NORM_TYPES`, the module classes (routing and test-time
adaptation work on modules), and :data:`NORM_LAYER_KEYS`, a regex over state-dict keys (FedBN
and PRR-FL keep those keys on each site, and the server's aggregator must skip the same keys,
so it travels in the job as a string). :func:`norm_layer_keys` lists a network's keys from the
module types; the tests check that the regex selects exactly those keys in every bundle network.
"""

from __future__ import annotations

from typing import List

from torch import nn

__all__ = ["NORM_TYPES", "NORM_LAYER_KEYS", "norm_layer_keys"]

NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)  # BatchNorm*, InstanceNorm*, ...

# MONAI's ADN blocks ("adn.N"), torchvision-style "bn1" / "norm1", and DenseNet's "norm"
NORM_LAYER_KEYS = r"(\.adn\.N\.|(^|\.)(bn|norm)\d*\.)"


def norm_layer_keys(network: nn.Module) -> List[str]:
    """State-dict keys (parameters and buffers) of the network's normalization modules."""
    names = [n for n, m in network.named_modules() if isinstance(m, NORM_TYPES)]
    return [k for k in network.state_dict() if any(k.startswith(n + ".") for n in names)]
