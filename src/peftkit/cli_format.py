"""Help formatting shared by the `peftkit` subcommands."""

from __future__ import annotations

import argparse


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: X)" after each option's help, but only where it says something: not when the help
    text already states its default in words, nor for a default of None or False (an unset option, a flag)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or "%(default)" in text or action.default in (None, False):
            return text
        return super()._get_help_string(action)
