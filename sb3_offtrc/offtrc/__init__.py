"""Layer 2: the OffTRC algorithm, its policy and its replay buffer."""

from sb3_offtrc.offtrc.buffers import CostReplayBuffer, WindowBatch
from sb3_offtrc.offtrc.offtrc import OffTRC
from sb3_offtrc.offtrc.policies import MlpPolicy, OffTRCPolicy
from sb3_offtrc.offtrc.presets import PRESETS, get_preset

__all__ = ["PRESETS", "CostReplayBuffer", "MlpPolicy", "OffTRC", "OffTRCPolicy", "WindowBatch", "get_preset"]
