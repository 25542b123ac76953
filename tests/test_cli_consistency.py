"""Issue 20, item 8: the `peftkit` subcommands agree with each other. The rank flag has the same names
everywhere, a mistyped flag answers with the subcommand's own usage, help texts state a default once, and
`peftkit eval` and `peftkit chat` say who they are (once)."""

from __future__ import annotations

import argparse
import functools

import pytest

from peftkit.cli import build_parser, main
from peftkit.train import commands, options

RANK_FLAGS = ["--rank", "--r", "--lora-r"]


def _choices(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


@pytest.mark.parametrize("flag", RANK_FLAGS)
def test_train_takes_every_rank_flag(flag):
    args = build_parser().parse_args(["train", flag, "8"])  # parse only: nothing trains
    assert options.from_args(args).r == 8


@pytest.mark.parametrize("flag", RANK_FLAGS)
def test_plan_takes_every_rank_flag(flag, capsys):
    assert main(["plan", "llama-7b", flag, "8", "--json"]) == 0
    assert '"r": 8' in capsys.readouterr().out


@pytest.mark.parametrize("flag", RANK_FLAGS)
def test_demo_takes_every_rank_flag(flag):
    assert build_parser().parse_args(["demo", flag, "8"]).rank == 8  # parse only: the demo loads SmolLM2


@pytest.mark.parametrize("flag", RANK_FLAGS)
def test_targets_takes_every_rank_flag(flag, tiny_model_dir, capsys):
    assert main(["targets", "q_proj", "--model", tiny_model_dir, flag, "2"]) == 0
    assert "LoRA r=2 adds" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["train", "eval", "plan", "demo", "targets", "serve", "sweep", "merge"])
def test_a_mistyped_flag_prints_the_subcommands_usage(command, capsys):
    argv = {"plan": ["plan", "llama-7b"], "targets": ["targets", "q_proj"],
            "merge": ["merge", "--adapter", "a", "--out", "b"]}.get(command, [command])
    with pytest.raises(SystemExit) as info:
        main(argv + ["--rnak", "8"])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert f"usage: peftkit {command} " in err and "unrecognized arguments: --rnak 8" in err
    assert "usage: peftkit [-h]" not in err and f"peftkit {command}: error:" in err


def help_texts(name: str, parser: argparse.ArgumentParser) -> list[tuple[str, str]]:
    formatter = parser.formatter_class(prog=f"peftkit {name}")
    return [(a.dest, formatter._expand_help(a)) for a in parser._actions if a.help and a.help != argparse.SUPPRESS]


@pytest.mark.parametrize("name", ["train", "eval", "generate", "chat", "merge", "demo", "inspect", "targets", "plan",
                                  "sweep", "serve"])
def test_no_help_text_states_its_default_twice(name):
    parser = _choices(build_parser())[name]
    doubled = [(dest, text) for dest, text in help_texts(name, parser) if text.count("(default") > 1]
    assert not doubled
    assert "(default" in parser.format_help()  # the defaults are still shown


def test_help_shows_no_empty_defaults_and_no_secrets(monkeypatch):
    monkeypatch.setenv("PEFTKIT_ADMIN_TOKEN", "s3cret")
    serve = " ".join(_choices(build_parser())["serve"].format_help().split())
    assert "s3cret" not in serve and "(default: None)" not in serve and "(default: False)" not in serve
    assert "(default: 64)" in serve  # --max-loaded, a real default, still shown


def test_eval_says_peftkit_eval(tiny_model_dir, capsys):
    assert main(["eval", "--model", tiny_model_dir, "--examples", "1", "--batch-size", "1"]) == 0
    out = capsys.readouterr().out
    assert "peftkit eval: scoring 1 held-out tickets" in out and "peftkit train" not in out


def test_chat_prints_its_intro_once(monkeypatch, capsys):
    import peftkit.train.infer as infer

    def leave(prompt):
        raise EOFError

    monkeypatch.setattr(commands, "_load", lambda args: (None, None))
    monkeypatch.setattr(infer, "chat_loop", functools.partial(infer.chat_loop, read=leave))
    args = build_parser().parse_args(["chat"])
    assert args.func(args) == 0
    assert capsys.readouterr().out.count("peftkit chat") == 1
