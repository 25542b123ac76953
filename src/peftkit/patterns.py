"""Regular expressions from adapter configs, matched with a bound: patterns in a file are untrusted input.

A config's `target_modules` string, `exclude_modules` string, `rank_pattern` / `alpha_pattern` keys and
`layers_pattern` are regexes that someone else wrote. Python's `re` can backtrack for hours on a pattern such
as `(.*.*)*Z`, in C code that holds the interpreter lock: a server stops answering everything, and a
training script hangs. Every such pattern goes through this module instead:

- `check_pattern`: before anything is compiled, a size limit, a nesting limit and a limit on counted
  repetitions (`(?:a{1000}){1000}` costs seconds and gigabytes to compile), then the syntax;
- `Matcher`: matching with the `regex` package under one time budget for all the matches of one config:
  MATCH_BUDGET_S, plus PER_MATCH_S for each module name matched (a legitimate match takes microseconds, so
  a model with 50,000 modules fits, and a pattern that backtracks cannot multiply a per-match timeout by the
  number of names). A first try of each match holds the interpreter lock for at most FIRST_TRY_S; a slow
  match is retried with the lock released (`concurrent=True`) and the budget's remainder as its timeout.
  A pattern that runs out of budget raises PatternError naming it and the module name.
"""

from __future__ import annotations

import time
from functools import lru_cache
from typing import Any

import regex

MAX_PATTERN_CHARS = 1000  # module-name patterns are short; anything longer is refused before compiling
MAX_NESTING = 50  # groups inside groups (the `regex` compiler recurses once per level)
MAX_REPEAT_PRODUCT = 10_000  # product of every {m,n} bound: what a compiler may unroll
MATCH_BUDGET_S = 1.0  # CPU seconds all of one config's matches may take together ...
PER_MATCH_S = 0.0005  # ... plus this much for each (pattern, module name) matched: 100x a legitimate match
FIRST_TRY_S = 0.01  # how long one match may hold the interpreter lock before it is retried without it
ADVICE = "list the module names instead, or use a simpler regex (no nested repetition such as '(.*)*')"


class PatternError(ValueError):
    """A pattern from a config that is refused or ran out of its time budget; the message names it."""


@lru_cache(maxsize=512)
def _structure(pattern: str) -> tuple[int, int]:
    """(deepest group nesting, product of counted-repetition bounds) of a pattern, read conservatively:
    escapes are skipped, braces inside a character class are literal, a `{m,n}` counts max(m, n)."""
    depth = deepest = 0
    product = 1
    i, in_class = 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
            i += 2 if pattern[i + 1: i + 2] == "]" else 1  # `[]...]`: a leading ] is literal
            continue
        elif c == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif c == ")":
            depth = max(depth - 1, 0)
        elif c == "{":
            bound = regex.match(r"\{(\d*)(?:,(\d*))?\}", pattern[i:])
            if bound:
                product *= max(int(n) for n in (bound.group(1) or "0", bound.group(2) or "0")) or 1
        i += 1
    return deepest, product


def check_pattern(pattern: Any, what: str) -> None:
    """Raise PatternError naming `what` (e.g. "target_modules") and the pattern when it is not a string, is
    too long, nests too deeply, repeats too much, or is not a valid regex. Nothing is matched."""
    if not isinstance(pattern, str):
        raise PatternError(f"{what} must be a string (a regex), got {type(pattern).__name__} {pattern!r:.80}")
    shown = repr(pattern) if len(pattern) <= 120 else repr(pattern[:120]) + f"... ({len(pattern)} characters)"
    if len(pattern) > MAX_PATTERN_CHARS:
        raise PatternError(f"{what} {shown} is longer than {MAX_PATTERN_CHARS} characters; {ADVICE}")
    deepest, product = _structure(pattern)
    if deepest > MAX_NESTING:
        raise PatternError(f"{what} {shown} nests groups {deepest} deep (at most {MAX_NESTING}); {ADVICE}")
    if product > MAX_REPEAT_PRODUCT:
        raise PatternError(f"{what} {shown} has counted repetitions ({{m,n}}) whose bounds multiply to {product} "
                           f"(at most {MAX_REPEAT_PRODUCT}); {ADVICE}")
    _compile(pattern, pattern, what, shown)


def pattern_problems(pairs: list[tuple[str, str]]) -> list[str]:
    """The check_pattern error of each (field, pattern) that fails, for a config's own validation."""
    problems = []
    for what, pattern in pairs:
        try:
            check_pattern(pattern, what)
        except PatternError as err:
            problems.append(str(err))
    return problems


def _compile(pattern: str, text: str, what: str, shown: str | None = None) -> regex.Pattern:
    """`text` (the checked `pattern`, or a regex built around it) compiled, or PatternError naming `pattern`."""
    try:
        return _compiled(text)
    except (regex.error, RecursionError, MemoryError, OverflowError) as err:
        raise PatternError(f"{what} {shown or repr(pattern)} is not a valid regex: {err}") from None


@lru_cache(maxsize=512)
def _compiled(text: str) -> regex.Pattern:
    return regex.compile(text)


class Matcher:
    """Matches one config's untrusted patterns against module names under one time budget (CPU seconds of
    the matching thread), remembering each answer so that asking again costs nothing and no budget."""

    def __init__(self, budget_s: float = MATCH_BUDGET_S, per_match_s: float = PER_MATCH_S) -> None:
        self.budget_s = budget_s  # grows by per_match_s with every new match
        self.per_match_s = per_match_s
        self.spent = 0.0
        self.memo: dict[tuple[str, str, str], tuple | None] = {}
        self.refused: PatternError | None = None  # once out of budget, every later match raises this at once

    def fullmatch(self, pattern: str, name: str, what: str) -> bool:
        """Whether `pattern` matches the whole of `name` (PEFT's rule for a regex target_modules)."""
        return self.groups(pattern, name, what, pattern, mode="fullmatch") is not None

    def groups(self, pattern: str, name: str, what: str, text: str | None = None,
               mode: str = "match") -> tuple | None:
        """The groups of `text` (a regex built around the untrusted `pattern`; `pattern` itself when None)
        matched at the start of `name` (mode "match") or against all of it ("fullmatch"), or None."""
        text = pattern if text is None else text
        key = (mode, text, name)
        if key in self.memo:
            return self.memo[key]
        if self.refused is not None:
            raise PatternError(str(self.refused))
        check_pattern(pattern, what)
        compiled = _compile(pattern, text, what)
        run = compiled.fullmatch if mode == "fullmatch" else compiled.match
        self.budget_s += self.per_match_s
        start = time.thread_time()
        try:
            try:  # nearly every match ends in microseconds: no need to give the lock away for it
                found = run(name, timeout=max(min(self.budget_s - self.spent, FIRST_TRY_S), 1e-6))
            except TimeoutError:
                found = run(name, timeout=max(self.budget_s - (self.spent + time.thread_time() - start), 1e-6),
                            concurrent=True)
        except TimeoutError:
            self.refused = PatternError(
                f"{what} {pattern!r} takes too long to match module names: it ran past its time budget "
                f"({self.budget_s:.2f} s in all) on {name!r}, so the adapter is refused; {ADVICE}")
            raise PatternError(str(self.refused)) from None
        finally:
            self.spent += time.thread_time() - start
        self.memo[key] = result = None if found is None else found.groups()
        return result


def matcher_for(owner: Any) -> Matcher:
    """The Matcher that `owner` (a config object) keeps for its patterns, made on first use and stored on it:
    one budget and one memory for every module name its patterns ever meet, however often it is asked."""
    found = getattr(owner, "pattern_matcher", None)
    if isinstance(found, Matcher):
        return found
    made = Matcher()
    try:
        object.__setattr__(owner, "pattern_matcher", made)  # frozen dataclasses too: not a field
    except (AttributeError, TypeError):  # an object that takes no attributes: a budget for this call only
        pass
    return made
