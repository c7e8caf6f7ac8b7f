"""`jacdistill <command> [overrides]`: picks the command and hands the rest of argv to its Hydra app.

The entry, last in the order of parts (docs/concepts/architecture.md): it imports the commands (and what they need) only once
a command is chosen, so that `jacdistill --help` answers at once.
"""

from __future__ import annotations

import importlib
import os
import sys

# name -> (module holding the Hydra app `main`, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("jacdistill_cli.commands.train", "distil a student from a teacher (trains and caches the teacher if needed)"),
    "teacher": ("jacdistill_cli.commands.teacher", "train a teacher (with cross-entropy, or adversarially) and save its checkpoint"),
    "evaluate": ("jacdistill_cli.commands.evaluate", "a checkpoint on the test split: accuracy, teacher agreement, gradient cosine, explanation agreement, noise robustness"),
    "check": ("jacdistill_cli.commands.check", "prove each Jacobian method right: reference error, gradient flow, finite differences"),
    "bench": ("jacdistill_cli.commands.bench", "time one step of each Jacobian method against plain distillation"),
    "report": ("jacdistill_cli.commands.report", "table, CSV and plot of the final metrics of the runs of a sweep: jacdistill report DIR"),
}

# Shell completion: the commands, then each command's Hydra overrides (Hydra's own completion, asked with
# `jacdistill <command> -sc query=bash` and a COMP_LINE without the command word, which Hydra does not expect).
SHELLS = ("bash", "zsh")
BASH_COMPLETION = """# jacdistill: tab completion of the commands and of each command's overrides (from Hydra).
# Load it with: eval "$(jacdistill completion bash)"   (e.g. in ~/.bashrc)
_jacdistill_complete()
{
    local cur=${COMP_WORDS[COMP_CWORD]}
    if (( COMP_CWORD <= 1 )); then
        COMPREPLY=($(compgen -W "{commands} completion" -- "$cur"))
        return 0
    fi
    local command=${COMP_WORDS[1]}
    case "$command" in
        completion) COMPREPLY=($(compgen -W "{shells}" -- "$cur")); return 0 ;;
        {alternatives}) ;;
        *) return 0 ;;
    esac
    local before=${COMP_LINE:0:COMP_POINT}
    local overrides=${before#*"$command"}
    local choices
    choices=$(COMP_LINE="jacdistill$overrides" COMP_POINT=$(( ${#overrides} + 10 )) \\
              "${COMP_WORDS[0]}" "$command" -sc query=bash 2>/dev/null)
    COMPREPLY=($(compgen -o nospace -o default -W "$choices" -- "$cur"))
}
COMP_WORDBREAKS=${COMP_WORDBREAKS//=}
complete -o nospace -o default -F _jacdistill_complete jacdistill
"""
# zsh runs the bash function through its bash-completion emulation.
ZSH_PREFIX = """# Load it with: eval "$(jacdistill completion zsh)"   (e.g. in ~/.zshrc)
autoload -Uz compinit bashcompinit && compinit && bashcompinit
"""


def completion_script(shell: str) -> str:
    script = (BASH_COMPLETION.replace("{commands}", " ".join(COMMANDS)).replace("{shells}", " ".join(SHELLS))
              .replace("{alternatives}", "|".join(COMMANDS)))
    return script if shell == "bash" else ZSH_PREFIX + script


def completion_install_request(args: list[str]) -> str | None:
    """`-sc install=bash` (or uninstall) among a command's arguments, as written, else None. Hydra's own
    script would bind completion to the words `jacdistill` and `<command>` and ask `jacdistill -sc ...`,
    which is no command: it breaks the shell's completion of jacdistill."""
    for i, arg in enumerate(args):
        value = None
        if arg in ("-sc", "--shell-completion") and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(("-sc=", "--shell-completion=")):
            value = arg.partition("=")[2]
        if value is not None and value.split("=")[0] in ("install", "uninstall"):
            return f"{arg} {value}" if "=" not in arg else arg
    return None


USAGE = """usage: jacdistill <command> [key=value ...] [-m] [--cfg job] [--help]

Knowledge distillation with Jacobian matching. Each command is a Hydra application with its
own config (conf/<command>.yaml): every Hydra override, -m/--multirun, --cfg and --help work.

commands:
{commands}

  completion  print the shell's tab completion of the commands and their overrides: jacdistill completion bash|zsh

examples:
  jacdistill train
  jacdistill train loss=kl jacobian=exact alpha=0.3
  jacdistill train -m alpha=0,0.1,0.3 jacobian=top1,exact
  jacdistill train --help          # the config groups and their options
"""


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = "\n".join(f"  {name.ljust(width)}  {text}" for name, (_, text) in COMMANDS.items())
    return USAGE.format(commands=lines)


def completion(args: list[str]) -> int:
    """`jacdistill completion bash|zsh`: print the shell's completion script."""
    shell = args[0] if len(args) == 1 else None
    if shell not in SHELLS:
        given = " ".join(args) or "(none)"
        print(f"jacdistill completion: error: shell={given} is not allowed: it must be one of "
              f"{', '.join(SHELLS)}, as in eval \"$(jacdistill completion bash)\"", file=sys.stderr)
        return 2
    print(completion_script(shell), end="")
    return 0


def refused_before_hydra(command: str, args: list[str]) -> str | None:
    """Why `jacdistill COMMAND ARGS` is refused before Hydra sees it (one line), or None."""
    if command not in COMMANDS:
        return f"jacdistill: error: unknown command {command!r}; the commands are: {', '.join(COMMANDS)}"
    install = completion_install_request(args)
    if install is None:
        return None
    shell = install.rpartition("=")[2]
    shell = shell if shell in SHELLS else "bash"
    return (f"jacdistill {command}: error: {install} is not allowed: it would complete `{command}` as a command of "
            f"its own; use eval \"$(jacdistill completion {shell})\", which completes the commands and their "
            "overrides")


def run_command(command: str, args: list[str]) -> int:
    """The command's Hydra app on its overrides. Hydra prints an error in composing the config (an unknown key
    or option, bad override syntax) in several lines; asked for full errors, it raises it instead, and it is
    said here in one line (so is a sweep refused before its first job). The job itself unsets the request
    (config/entry.composition_done), so its errors get Hydra's usual report. A user who set HYDRA_FULL_ERROR gets
    Hydra's own output throughout."""
    from jacdistill_cli.config import entry
    from jacdistill_cli.config.keys import home_paths
    from jacdistill_cli.loop.device import keep_freed_memory

    keep_freed_memory()
    module = importlib.import_module(COMMANDS[command][0])
    # Hydra reads sys.argv itself; it sees only this command's overrides. A command may read bare arguments of
    # its own (report: the directory) before Hydra sees them.
    overrides = home_paths(getattr(module, "translate_argv", list)(args))
    sys.argv = [f"jacdistill {command}", *overrides]
    user_asked = "HYDRA_FULL_ERROR" in os.environ
    if not user_asked:
        os.environ["HYDRA_FULL_ERROR"] = "1"
        entry.hydra_full_error_for_composition = True
    try:
        module.main()
    except Exception as err:
        from hydra.errors import CompactHydraException

        from jacdistill_cli.config.keys import composition_message
        from jacdistill_cli.errors import UsageError

        if user_asked or not isinstance(err, (UsageError, CompactHydraException)):
            raise
        message = str(err) if isinstance(err, UsageError) else composition_message(command, overrides, err)
        print(f"jacdistill {command}: error: {message}", file=sys.stderr)
        return 2
    finally:
        entry.composition_done()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if args[0] == "--version":
        from importlib.metadata import version

        print(f"jacdistill {version('jacdistill')}")
        return 0
    if args[0] == "completion":
        return completion(args[1:])
    refusal = refused_before_hydra(args[0], args[1:])
    if refusal is not None:
        print(refusal, file=sys.stderr)
        return 2
    return run_command(args[0], args[1:])


if __name__ == "__main__":
    sys.exit(main())
