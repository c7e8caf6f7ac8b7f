"""`jacdistill <command> --help`: the config groups the command uses (those of its own config's defaults list,
with the options Hydra finds for them, a user's --config-dir included) and its config, through Hydra's help
template (`hydra.help.template: ${jd_help:${hydra.job.name}}` in each command's config). Hydra's own help
lists every group on the search path, those of the other commands too."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

# Groups that only assemble an option of another group (an architecture shared by teacher and student, the
# teacher block shared by train and teacher): not chosen on the command line.
ASSEMBLY_GROUPS = ("arch", "teacher_training")


def command_yaml(command: str) -> str:
    return (resources.files("jacdistill_cli.conf") / f"{command}.yaml").read_text()


def command_groups(command: str) -> list[str]:
    """The groups of the command's own defaults list (not Hydra's, nor those assembling another's option)."""
    import yaml

    defaults = (yaml.load(command_yaml(command), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}).get(
        "defaults") or []
    groups = []
    for entry in defaults:
        if not isinstance(entry, dict):
            continue
        for key in entry:
            group = str(key).removeprefix("override ").lstrip("/").split("@")[0]
            if not group.startswith("hydra") and group not in ASSEMBLY_GROUPS:
                groups.append(group)
    return list(dict.fromkeys(groups))


def search_folders() -> list:
    """The folders of the config search path: the shipped conf/ and a user's --config-dir (or searchpath)."""
    from hydra.core.global_hydra import GlobalHydra

    folders = [resources.files("jacdistill_cli.conf")]
    if GlobalHydra.instance().is_initialized():
        for source in GlobalHydra.instance().config_loader().get_sources():
            if source.scheme() == "file":
                folders.append(Path(source.path))
    return folders


def group_options(group: str, folders: list) -> list[str]:
    """The options of a group in the search path's folders (its yaml files)."""
    found = set()
    for folder in folders:
        if (folder / group).is_dir():
            found |= {e.name.removesuffix(".yaml") for e in (folder / group).iterdir() if e.name.endswith(".yaml")}
    return sorted(found)


def help_template(command: str) -> str:
    """Hydra's help template for `jacdistill <command> --help` ($CONFIG and $FLAGS_HELP are Hydra's)."""
    first = command_yaml(command).splitlines()[0].lstrip("# ").strip()
    folders = search_folders()
    listed = {group: group_options(group, folders) for group in command_groups(command)}
    groups = "\n".join(f"{group}: {', '.join(options)}" for group, options in listed.items())
    return (f"{first}\n\n== Config groups ==\nChoose an option of a group with group=option (e.g. "
            f"{next(iter(listed), 'group')}=NAME); a sweep with -m and comma-separated options.\n\n"
            f"{groups or '(none)'}\n\n== Config ==\nOverride any setting with key=value "
            "(a setting of your own model with +key=value); these are the defaults:\n\n$CONFIG\n"
            "Hydra's own options (--cfg job, -m, --config-dir, ...): --hydra-help")
