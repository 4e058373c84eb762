"""Command-line parsing shared by `streamoe` and every service.

Every flag also reads `STREAMOE_<FLAG>` (upper case, dashes -> underscores); a flag on the
command line wins over the variable, and the variable over the built-in default.
"""
from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping
from pathlib import Path

ENV_PREFIX = "STREAMOE_"
TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off", ""}



def home() -> Path:
    """$STREAMOE_HOME (default ~/.cache/streamoe): presets, runs, the prefix cache, checksums and
    the numerics' calibrations live under it."""
    return Path(os.environ.get("STREAMOE_HOME", Path.home() / ".cache" / "streamoe")).expanduser()


class FlagValueError(argparse.ArgumentTypeError, ValueError):
    """A flag's type function refusing a value, with the reason: argparse shows it for the flag,
    and the environment path below for the variable."""


def env_name(option: str) -> str:
    return ENV_PREFIX + option.lstrip("-").upper().replace("-", "_")


def apply_env_defaults(parser: argparse.ArgumentParser, environ: Mapping[str, str] | None = None) -> None:
    """Replace each optional flag's default with its environment variable, where set."""
    environ = os.environ if environ is None else environ
    for action in parser._actions:
        long_options = [o for o in action.option_strings if o.startswith("--")]
        if not long_options or action.dest == "help":
            continue
        name = env_name(long_options[0])
        if name not in environ:
            continue
        raw = environ[name]
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            word = raw.strip().lower()
            if word not in TRUE_WORDS | FALSE_WORDS:
                parser.error(f"{name}={raw!r}: expected one of {sorted(TRUE_WORDS | FALSE_WORDS)}")
            enabled = word in TRUE_WORDS
            action.default = enabled if isinstance(action, argparse._StoreTrueAction) else not enabled
            continue
        try:
            value = action.type(raw) if action.type else raw
        except FlagValueError as e:
            parser.error(f"{name}={raw!r}: not a valid value for {long_options[0]}: {e}")
        except (TypeError, ValueError):
            parser.error(f"{name}={raw!r}: not a valid value for {long_options[0]}")
        if action.choices is not None and value not in action.choices:
            parser.error(f"{name}={raw!r}: choose from {', '.join(map(str, action.choices))}")
        action.default = value
        action.required = False


def positive_int(raw: str) -> int:
    """A flag's type: a whole number >= 1."""
    return _whole_number(raw, 1)


def non_negative_int(raw: str) -> int:
    """A flag's type: a whole number >= 0."""
    return _whole_number(raw, 0)


def _whole_number(raw: str, least: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = least - 1
    if value < least:
        raise FlagValueError(f"{raw!r}: expected a whole number >= {least}")
    return value


def non_negative_float(raw: str) -> float:
    """A flag's type: a number >= 0."""
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value >= 0):
        raise FlagValueError(f"{raw!r}: expected a number >= 0")
    return value


def positive_float(raw: str) -> float:
    """A flag's type: a number > 0."""
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value > 0):
        raise FlagValueError(f"{raw!r}: expected a number > 0")
    return value


def slo_flag(raw: str):
    """A flag's type: an SLO (shared/planner/slo.py), e.g. 'ttft:2000 itl:100'."""
    from shared.planner.slo import parse_slo

    try:
        return parse_slo(raw)
    except ValueError as e:
        raise FlagValueError(str(e)) from None


def units_flag(raw: str):
    """A flag's type: ranks per role, 'prefill=N,decode=M' (shared/planner/plan.py)."""
    from shared.planner.plan import parse_units

    try:
        return parse_units(raw)
    except ValueError as e:
        raise FlagValueError(str(e)) from None


SPECULATIVE_TOKENS_HELP = ("drafts per running request and step, by the model's MTP layer, verified in one forward "
                           "(lossless); 0: off; auto: 1 when the model has an MTP layer, else 0")


def speculative_tokens_flag(text: str) -> str | int:
    """--speculative-tokens's type: `auto` or a count >= 0."""
    word = text.strip()
    if word == "auto":
        return "auto"
    try:
        value = int(word)
    except ValueError:
        raise FlagValueError(f"{text!r}: expected auto or a whole number >= 0") from None
    if value < 0:
        raise FlagValueError(f"{text!r}: expected auto or a whole number >= 0")
    return value


def resolve_speculative_tokens(value: str | int, has_mtp: bool) -> int:
    """The flag's value for a model: `auto` -> 1 with an MTP layer, else 0; a count on a model
    without one is refused, naming the flag."""
    if value == "auto":
        return 1 if has_mtp else 0
    if value and not has_mtp:
        raise ValueError(f"--speculative-tokens={value}: the model has no MTP layer (num_nextn_predict_layers "
                         "is 0 in its config.json; `streamoe init-model --mtp` makes a preset with one)")
    return int(value)


def cpu_list_flag(text: str) -> frozenset[int]:
    """A list of CPUs like `taskset -c` takes (`0-3,8`), as an argparse type."""
    cpus: set[int] = set()
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        if not first.isdigit() or (dash and not last.isdigit()) or (dash and int(last) < int(first)):
            raise argparse.ArgumentTypeError(f"{text!r}: expected CPU numbers and ranges, e.g. 0-3,8")
        cpus.update(range(int(first), int(last if dash else first) + 1))
    return frozenset(cpus)


def cpu_list_text(cpus) -> str:
    """The CPUs as `cpu_list_flag` reads them (ranges joined)."""
    runs: list[list[int]] = []  # [first, last] of each run of consecutive CPUs
    for cpu in sorted(cpus):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
