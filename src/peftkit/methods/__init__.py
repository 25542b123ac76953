"""The built-in methods, one folder each. Importing this package registers them (peftkit/__init__ does);
adding a method is a new folder plus one line below."""

from ..registry import register
from .adalora import METHOD as ADALORA
from .bottleneck import METHOD as BOTTLENECK
from .ia3 import METHOD as IA3
from .lora import METHOD as LORA
from .lycoris import LOHA_METHOD as LOHA
from .lycoris import LOKR_METHOD as LOKR
from .oft import METHOD as OFT
from .prefix import METHOD as PREFIX
from .prompt import PROMPT_METHOD as PROMPT
from .prompt import PTUNING_METHOD as PTUNING
from .vera import METHOD as VERA

register(LORA)
register(BOTTLENECK)
register(PREFIX)
register(IA3)
register(LOHA)
register(LOKR)
register(VERA)
register(ADALORA)
register(PROMPT)
register(PTUNING)
register(OFT)
