"""The built-in methods, one folder each. Importing this package registers them (peftkit/__init__ does);
adding a method is a new folder plus one line below."""

from ..registry import register
from .bottleneck import METHOD as BOTTLENECK
from .ia3 import METHOD as IA3
from .lora import METHOD as LORA
from .prefix import METHOD as PREFIX

register(LORA)
register(BOTTLENECK)
register(PREFIX)
register(IA3)
