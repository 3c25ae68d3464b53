"""``trellis journal``: verify, tail and export a journal.

Example::

    $ trellis journal verify sqlite:///journal.db      # exit 0 ok, 1 broken, 2 bad input
    $ trellis journal verify ./journal.db --anchor /backup/journal.db.anchor
    $ trellis journal tail -f -n 50                    # URL from $TRELLIS_JOURNAL
    $ trellis journal export sqlite:///journal.db -o journal.jsonl
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.text import Text

from ..journal._errors import JournalError
from ..journal._format import KEY_ENV
from ..journal._paths import journal_dir
from ..journal._read import DEFAULT_MAX_UNSIGNED, VerifyResult, export, tail, verify
from ..journal._store import parse_url

__all__ = ["journal_group"]

URL_ENV = "TRELLIS_JOURNAL"  # else the only journal in journal_dir()
_F = TypeVar("_F", bound=Callable[..., Any])


class BadInput(click.ClickException):
    """A bad URL, a missing journal, an unreadable file: exit code 2."""

    exit_code = 2


def _url_arguments(fn: _F) -> _F:
    fn = click.option(
        "--journal",
        "journal_opt",
        metavar="URL",
        help=f"The journal URL or file path (instead of the URL argument; default ${URL_ENV}).",
    )(fn)
    return click.argument("url", required=False, metavar="[URL|PATH]")(fn)


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def as_url(text: str) -> str:
    """A journal URL from what the user typed: a URL (``sqlite:///...``,
    ``postgresql://...``) as it is, anything without a ``scheme:`` prefix as the path
    of a SQLite file (``journal.db`` -> ``sqlite:///journal.db``, ``/var/j.db`` ->
    ``sqlite:////var/j.db``). A path that contains a colon is taken as a path when
    the file exists."""
    if _SCHEME.match(text) and not os.path.exists(text):
        return text
    return f"sqlite:///{text}"


def _resolve(url: str | None, journal_opt: str | None) -> str:
    if url and journal_opt and url != journal_opt:
        raise BadInput(f"two journal URLs given: {url!r} and --journal {journal_opt!r}")
    if url or journal_opt:
        chosen = as_url(url or journal_opt or "")
        source = "the argument" if url else "--journal"
    elif os.environ.get(URL_ENV):
        chosen, source = as_url(os.environ[URL_ENV]), f"${URL_ENV}"
    else:
        found = sorted(journal_dir().glob("*.journal.db"))
        if len(found) != 1:
            where = (
                f"; {journal_dir()} holds {', '.join(p.name for p in found)}"
                if found
                else f"; no journal in {journal_dir()}"
            )
            raise BadInput(
                f"no journal URL: give URL (sqlite:///PATH or postgresql://...) or a file "
                f"path, --journal URL, or set ${URL_ENV}{where}"
            )
        chosen, source = f"sqlite:///{found[0]}", f"the only journal in {journal_dir()}"
    _say_which(chosen, source)
    return chosen


def _say_which(url: str, source: str) -> None:
    """Tell the user (on stderr) which journal is read, and where the name came from."""
    try:
        target = parse_url(url)
    except JournalError:
        return  # the command reports the bad URL
    where = ""
    if target.backend == "sqlite":
        where = f" (file {os.path.abspath(target.path)})"
    click.echo(f"journal: {target.shown}{where}, from {source}", err=True)


@click.group("journal")
def journal_group() -> None:
    """Verify, tail and export the event journal (URL from the argument, --journal,
    or $TRELLIS_JOURNAL)."""


@journal_group.command("verify")
@_url_arguments
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@click.option(
    "--anchor",
    "anchor",
    metavar="FILE",
    type=click.Path(dir_okay=False),
    default=None,
    help="The anchor file the writer mirrors its last checkpoint to: the journal must "
    "still hold that checkpoint (default: <db>.anchor beside a SQLite journal, "
    "pg-HOST-PORT-DB.anchor in the state dir for PostgreSQL, when it "
    "exists and a key is set).",
)
@click.option("--no-anchor", is_flag=True, help="Do not compare with any anchor file.")
@click.option(
    "--max-unsigned",
    type=click.IntRange(min=0),
    default=None,
    metavar="N",
    help="With a key: the most records allowed after the last checkpoint (default: the "
    f"anchor's, else {DEFAULT_MAX_UNSIGNED} = the default checkpoint_every + max_batch).",
)
def verify_cmd(
    url: str | None,
    journal_opt: str | None,
    as_json: bool,
    anchor: str | None,
    no_anchor: bool,
    max_unsigned: int | None,
) -> None:
    """Check the hash chain and the signed checkpoints (key from $TRELLIS_JOURNAL_KEY).

    With a key, the journal must also end signed (no more than --max-unsigned records
    after its last checkpoint) and, with an anchor, still hold the anchor's checkpoint.

    Exit 0 when intact, 1 when broken (naming the first bad seq), 2 for bad input."""
    if anchor is not None and no_anchor:
        raise BadInput("--anchor and --no-anchor: give one")
    target = _resolve(url, journal_opt)
    try:
        result = verify(
            target,
            anchor=False if no_anchor else anchor,
            max_unsigned=max_unsigned,
        )
    except (JournalError, ValueError) as e:
        raise BadInput(str(e)) from None
    if as_json:
        out = dataclasses.asdict(result)
        out["journal"] = parse_url(target).shown
        click.echo(json.dumps(out))
    else:
        click.echo(_describe(result))
    click.get_current_context().exit(0 if result.ok else 1)


def _describe(r: VerifyResult) -> str:
    if not r.ok:
        return (
            f"BROKEN at seq {r.first_bad_seq}: {r.problem}\n"
            f"{r.records} record{'s' if r.records != 1 else ''} intact before it"
        )
    lines = [f"ok: {r.records} record{'s' if r.records != 1 else ''}, hash chain intact"]
    if r.checkpoints:
        how = "HMAC verified" if r.signed else f"hashes match; HMAC not checked (no ${KEY_ENV})"
        lines.append(f"{r.checkpoints} checkpoints up to seq {r.last_checkpoint_seq}: {how}")
        if r.last_seq > r.last_checkpoint_seq:
            lines.append(
                f"seq {r.last_checkpoint_seq + 1}..{r.last_seq} rest on the hash chain alone "
                "(written after the last checkpoint)"
            )
    elif r.signed and r.records:
        lines.append("no signed checkpoints: the records rest on the hash chain alone")
    if r.anchor:
        lines.append(f"anchor {r.anchor}: the journal holds its checkpoint at seq {r.anchor_seq}")
    return "\n".join(lines)


@journal_group.command("tail")
@_url_arguments
@click.option(
    "-n",
    "n",
    type=click.IntRange(min=0),
    default=20,
    show_default=True,
    help="How many of the last records to show.",
)
@click.option("-f", "--follow", is_flag=True, help="Keep printing new records (Ctrl-C stops).")
@click.option(
    "--since",
    "since_seq",
    type=click.IntRange(min=1),
    default=None,
    help="Start at this seq instead of the last N records.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def tail_cmd(
    url: str | None,
    journal_opt: str | None,
    n: int,
    follow: bool,
    since_seq: int | None,
    as_json: bool,
) -> None:
    """Show the last records, oldest first; -f follows new ones as they are committed."""
    target = _resolve(url, journal_opt)
    try:
        records = tail(target, n=n, follow=follow, since_seq=since_seq)
    except (JournalError, ValueError) as e:
        raise BadInput(str(e)) from None
    console = Console(highlight=False, soft_wrap=True)
    try:
        for rec in records:
            if as_json:
                click.echo(json.dumps(rec, separators=(",", ":")))
            else:
                console.print(_line(rec))
            if follow:
                sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    except JournalError as e:
        raise BadInput(str(e)) from None


_STYLES = {"crash": "bold red", "killed": "red", "hung": "red", "oom": "red", "timeout": "red"}


def _line(rec: dict[str, Any]) -> Text:
    data = rec["data"]
    style = ""
    if isinstance(data, dict):
        style = _STYLES.get(str(data.get("reason_class")), "")
        fields = " ".join(f"{k}={_value(v)}" for k, v in data.items())
    else:
        fields = str(data)
    if rec["kind"] in ("supervisor.gave_up", "journal.dropped"):
        style = "bold red"
    line = Text()
    line.append(f"{rec['seq']:>7} ", style="dim")
    line.append(f"{rec['utc']} ", style="dim")
    line.append(f"{rec['node']} ")
    line.append(f"{rec['kind']:<20} ", style=style or "bold")
    line.append(f"{rec['path'] or '-'} ", style="cyan")
    line.append(fields)
    return line


def _value(v: Any) -> str:
    return v if isinstance(v, str) and v and " " not in v else json.dumps(v)


@journal_group.command("export")
@_url_arguments
@click.option("--format", "fmt", type=click.Choice(["jsonl"]), default="jsonl", show_default=True)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help="Write to this file instead of stdout.",
)
def export_cmd(url: str | None, journal_opt: str | None, fmt: str, output: str | None) -> None:
    """Write every record, oldest first, one JSON object per line."""
    target = _resolve(url, journal_opt)
    try:
        if output is None:
            count = export(target, sys.stdout, format=fmt)
        else:
            count = export(target, output, format=fmt)
    except (JournalError, ValueError) as e:
        raise BadInput(str(e)) from None
    except OSError as e:
        raise BadInput(f"cannot write {output!r}: {e.strerror or e}") from None
    if output is not None:
        click.echo(f"exported {count} records to {output}", err=True)
