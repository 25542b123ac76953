"""LoHa and LoKr (the LyCORIS family, HF PEFT's peft_type LOHA and LOKR): configs, the shared layer, factor
shapes, PEFT file keys, plan terms, and the two registered methods."""

from .config import LoHaConfig, LoKrConfig
from .family import LOHA, LOKR
from .layer import LycorisLayer, lycoris_layers
from .method import LOHA_METHOD, LOKR_METHOD
from .targets import select_lycoris_targets

__all__ = ["LOHA", "LOHA_METHOD", "LOKR", "LOKR_METHOD", "LoHaConfig", "LoKrConfig", "LycorisLayer",
           "lycoris_layers", "select_lycoris_targets"]
