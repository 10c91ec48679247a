"""The documentation keeps up with the program: the command and configuration references are
what the parser and the config schema render now, every command and key is described, and
every relative link in README.md and docs/ leads to a file and a heading that exist."""

from __future__ import annotations

import re
from pathlib import Path

from contimg_publisher import config as config_mod
from contimg_publisher import reference, states
from contimg_publisher.cli import build_parser

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
HOW = f"regenerate with `{reference.REGENERATE}` (from the checkout's top folder) and commit"


def _pages() -> list[Path]:
    return [REPO / "README.md", *sorted(DOCS.rglob("*.md"))]


def test_the_cli_reference_is_what_the_parser_renders() -> None:
    committed = (DOCS / reference.CLI_FILE).read_text(encoding="utf-8")
    headings = set(re.findall(r"^## `([^`]+)`$", committed, re.MULTILINE))
    names = [name for name, _help, _sub in reference.subcommands(build_parser())]
    undocumented = [name for name in names if name not in headings]
    assert not undocumented, f"docs/cli.md lacks the commands {undocumented}: {HOW}"
    gone = sorted(headings - set(names))
    assert not gone, f"docs/cli.md documents commands that no longer exist {gone}: {HOW}"
    assert committed == reference.render_cli(), \
        f"docs/cli.md differs from the parser's commands, options or help: {HOW}"


def test_the_config_reference_is_what_the_schema_renders() -> None:
    committed = (DOCS / reference.CONFIG_FILE).read_text(encoding="utf-8")
    sections = re.split(r"^## `\[+([^\]`]+)\]+`$", committed, flags=re.MULTILINE)
    documented = {table: set(re.findall(r"^\| `([^`]+)` \|", body, re.MULTILINE))
                  for table, body in zip(sections[1::2], sections[2::2], strict=True)}
    undocumented = [f"{table}.{key}" for table, keys in config_mod.schema().items()
                    for key in keys if key not in documented.get(table, set())]
    assert not undocumented, f"docs/config.md lacks the keys {undocumented}: {HOW}"
    assert committed == reference.render_config(), \
        f"docs/config.md differs from the config schema, defaults or descriptions: {HOW}"


def test_the_check_command_agrees(capsys) -> None:
    """`python -m contimg_publisher.reference --check`, as a developer would run it."""
    assert reference.main(["--check", str(DOCS)]) == 0, capsys.readouterr().err


def test_every_subcommand_has_a_description() -> None:
    bare = [name for name, text, _sub in reference.subcommands(build_parser())
            if not text.strip()]
    assert not bare, f"subcommands without help= in build_parser(): {bare}"


def test_every_option_and_argument_has_a_description() -> None:
    bare = [f"{name} {action.option_strings[0] if action.option_strings else action.dest}"
            for name, _text, sub in reference.subcommands(build_parser())
            for action in reference.options(sub) if not (action.help or "").strip()]
    assert not bare, f"options and arguments without help= in build_parser(): {bare}"


def test_every_config_key_has_a_description_and_a_type() -> None:
    tables = config_mod.schema()
    missing = [f"{table}.{key}" for table, keys in tables.items() for key in keys
               if not config_mod.DESCRIPTIONS.get(table, {}).get(key, "").strip()]
    assert not missing, f"keys without a description in config.DESCRIPTIONS: {missing}"
    extra = [f"{table}.{key}" for table, keys in config_mod.DESCRIPTIONS.items()
             for key in keys if key not in tables.get(table, {})]
    assert not extra, f"config.DESCRIPTIONS describes keys the schema lacks: {extra}"
    kinds = {kind for keys in tables.values() for _field, kind in keys.values()} - {"rule"}
    untyped = sorted(kinds - set(config_mod.KIND_TEXT))
    assert not untyped, f"kinds without a type text in config.KIND_TEXT: {untyped}"


# --- links ------------------------------------------------------------------------------------

_FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the page's headings: lower case, punctuation dropped,
    spaces as hyphens, a repeated one numbered."""
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", _FENCE.sub("", page.read_text()),
                              re.MULTILINE):
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def test_relative_links_lead_to_files_and_headings_that_exist() -> None:
    broken = []
    for page in _pages():
        text = _CODE.sub("", _FENCE.sub("", page.read_text(encoding="utf-8")))
        for target in _LINK.findall(text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):
                continue  # https:, mailto:, file:
            path_part, _sep, anchor = target.partition("#")
            linked = (page.parent / path_part).resolve() if path_part else page
            where = f"{page.relative_to(REPO)}: ({target})"
            if not linked.exists():
                broken.append(f"{where}: no such file")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                broken.append(f"{where}: no heading with anchor #{anchor}")
    assert not broken, "\n".join(broken)


def test_every_docs_page_is_reachable_from_the_readme() -> None:
    reached: set[Path] = set()
    todo = [REPO / "README.md"]
    while todo:
        page = todo.pop()
        if page in reached:
            continue
        reached.add(page)
        text = _CODE.sub("", _FENCE.sub("", page.read_text(encoding="utf-8")))
        for target in _LINK.findall(text):
            path_part = target.partition("#")[0]
            if path_part.endswith(".md") and not re.match(r"[a-z][a-z0-9+.-]*:", target):
                linked = (page.parent / path_part).resolve()
                if linked.exists():
                    todo.append(linked)
    orphans = [str(p.relative_to(REPO)) for p in DOCS.rglob("*.md") if p.resolve() not in reached]
    assert not orphans, f"pages no link from README.md leads to: {orphans}"


def test_the_readme_starts_with_the_two_commands_and_stays_short() -> None:
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; the details go in docs/"
    first_block = "\n".join(lines[: lines.index("```", lines.index("```sh") + 1)])
    assert "./.ci/dev run" in first_block and "./.ci/dev test" in first_block


def test_the_design_page_shows_every_status_transition_of_states_py() -> None:
    """The diagram and table of docs/design.md are rendered from states.TRANSITIONS: a move
    added there without regenerating fails here."""
    design = (DOCS / reference.DESIGN_FILE).read_text(encoding="utf-8")
    assert reference.TRANSITIONS_BEGIN in design and reference.TRANSITIONS_END in design, \
        "docs/design.md lost the markers around its generated transitions"
    rows = set(re.findall(r"^\| `([a-z_]+)` \| `", design, re.MULTILINE))
    missing = [move.value for move in states.TRANSITIONS if move.value not in rows]
    assert not missing, f"docs/design.md lacks the moves {missing}: {HOW}"
    assert reference.render_transitions() in design, \
        f"docs/design.md's transitions differ from states.TRANSITIONS: {HOW}"
