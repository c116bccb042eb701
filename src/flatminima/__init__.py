"""flatminima: sharpness-aware minimization (SAM) and its family for PyTorch."""

from . import distributed as distributed  # DCP checkpoints
from ._base import GroupView, SharpnessAware, StepContext
from .ae_sam import AESAM
from .compose import compose, method_class
from .esam import ESAM
from .every_k import SAMEveryK
from .fisher_sam import FisherSAM
from .friendly_sam import FriendlySAM
from .gsam import GSAM
from .looksam import LookSAM
from .momentum_sam import MomentumSAM
from .muon_adamw import MuonAdamW, muon_param_groups
from .param_groups import split_param_groups
from .passes import all_buffers, is_running_buffer, preserve_running_stats
from .registry import MethodSpec, create, get_method, list_methods, register
from .sam import SAM
from .vasso import VaSSO
from .wsam import WSAM

__version__ = "0.1.0"

__all__ = [
    "AESAM",
    "ESAM",
    "GSAM",
    "SAM",
    "WSAM",
    "FisherSAM",
    "FriendlySAM",
    "GroupView",
    "LookSAM",
    "MethodSpec",
    "MomentumSAM",
    "MuonAdamW",
    "SharpnessAware",
    "SAMEveryK",
    "StepContext",
    "VaSSO",
    "all_buffers",
    "compose",
    "create",
    "get_method",
    "is_running_buffer",
    "list_methods",
    "method_class",
    "muon_param_groups",
    "preserve_running_stats",
    "register",
    "split_param_groups",
]
