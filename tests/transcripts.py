"""The command transcripts in the READMEs, made by running their commands for real.

A fenced ``console`` block right after an HTML comment ``<!-- transcript: NAME -->`` in one of
:data:`DOCS` is a checked transcript: its ``$ `` lines are the commands, the lines after each are
what the command printed. :func:`run_scenario` runs every such command, in :data:`SCENARIO` order,
in a fresh folder laid out as a clone would be, against a real ``rankserve serve`` (real
tritonserver): ``path/to/cross-encoder`` is the ranker (the ``build`` transcript builds
``model_repository`` from it), ``clients/`` is this checkout's, ``.venv/bin/rankserve`` is the
running interpreter's. The ``serve`` block's command runs in the background: its lines up to
``^C`` are what it printed once ready, the lines after, what it printed when stopped with SIGINT
after the other transcripts. The server listens on free ports; commands and output are shown with
the documented ones (8000, 8001, 8002).

``tests/e2e/test_first_hour_docs.py`` compares each block with a fresh run after
:func:`normalize` (figures and timings differ between rankers and runs); ``make docs-transcripts``
(``python tests/transcripts.py --write``) rewrites the blocks from a run. Normalization:

- every number (``12``, ``-0.216``, ``1.19e-06``, ``8,181``), sign included, becomes ``N``;
- a size unit (``B``, ``KiB``, ``MiB``, ``GiB``) after a number becomes ``MiB``;
- a path under ``/tmp/`` keeps only its last component (``/tmp/.../tritonserver.log``);
- a run of lines starting with ``N.`` (a ranked list) is compared sorted: the order is the
  ranker's, and the test ranker has random weights;
- trailing whitespace is ignored.

Progress bars are turned off (``HF_HUB_DISABLE_PROGRESS_BARS``, ``TQDM_DISABLE``).
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "clients/README.md", "loadtest/README.md")
SCENARIO = ("build", "serve", "health", "rank", "curl", "curl-error")
"""The order the transcripts run in; ``serve`` keeps running until all the others have run."""
DOC_PORTS = (8000, 8001, 8002)
MARKER = re.compile(r"^<!-- transcript: ([\w-]+) -->\s*$")
HINT = ("regenerate the transcripts with `make docs-transcripts` (python tests/transcripts.py --write, runs the commands "
        "against a real server) and review the README diff")


@dataclass
class Block:
    doc: str
    name: str
    start: int  # line index of the opening fence
    end: int  # line index of the closing fence
    body: str  # the lines between the fences


def find_blocks(root: Path = ROOT) -> dict[str, Block]:
    """Every checked transcript of :data:`DOCS`, by name."""
    blocks: dict[str, Block] = {}
    for doc in DOCS:
        lines = (root / doc).read_text().splitlines()
        for i, line in enumerate(lines):
            match = MARKER.match(line)
            if not match:
                continue
            name = match.group(1)
            start = i + 1
            if start >= len(lines) or not lines[start].startswith("```console"):
                raise ValueError(f"{doc}:{i + 1}: a transcript marker must be followed by a ```console block")
            end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("```")), None)
            if end is None:
                raise ValueError(f"{doc}:{start + 1}: the transcript block {name!r} is not closed")
            if name in blocks:
                raise ValueError(f"{doc}:{i + 1}: transcript {name!r} is also in {blocks[name].doc}")
            blocks[name] = Block(doc, name, start, end, "\n".join(lines[start + 1:end]))
    return blocks


def commands(body: str) -> list[str]:
    return [line[2:] for line in body.splitlines() if line.startswith("$ ")]


_NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:,\d{3})*(?:\.\d+)?(?:[eE][-+]?\d+)?(?![\w])")
_SIZE = re.compile(r"\bN (?:B|KiB|MiB|GiB)\b")
_TMP = re.compile(r"/tmp/(?:[^\s/]+/)*")


def normalize(text: str) -> str:
    """The transcript with what differs between rankers and runs masked (module docstring)."""
    out: list[str] = []
    ranked: list[str] = []
    for line in text.splitlines():
        line = _SIZE.sub("N MiB", _NUMBER.sub("N", _TMP.sub("/tmp/.../", line))).rstrip()
        if re.match(r"\s*N\.\s", line):
            ranked.append(line)
            continue
        out.extend(sorted(ranked))
        ranked = []
        out.append(line)
    out.extend(sorted(ranked))
    return "\n".join(out).strip("\n")


def diff(block: Block, generated: str) -> str:
    """An empty string when ``block`` matches ``generated`` after normalization, else a unified diff."""
    want, got = normalize(block.body), normalize(generated)
    if want == got:
        return ""
    return "\n".join(difflib.unified_diff(want.splitlines(), got.splitlines(), f"{block.doc} ({block.name}, normalized)",
                                          "a fresh run (normalized)", lineterm=""))


class Workspace:
    """A fresh folder laid out as a clone, where the transcripts' commands run."""

    def __init__(self, folder: Path, ranker: Path) -> None:
        from rankserve.server.embedded import free_serve_settings

        self.folder = folder
        (folder / "path" / "to").mkdir(parents=True)
        (folder / "path" / "to" / "cross-encoder").symlink_to(ranker.resolve())
        (folder / "clients").symlink_to(ROOT / "clients")
        (folder / ".venv" / "bin").mkdir(parents=True)
        script = Path(sys.executable).parent / "rankserve"
        (folder / ".venv" / "bin" / "rankserve").symlink_to(script)
        s = free_serve_settings()
        self.ports = (s.http_port, s.grpc_port, s.metrics_port)
        self.env = {**os.environ, "PATH": f"{folder / '.venv' / 'bin'}:{os.environ.get('PATH', '')}",
                    "PYTHONUNBUFFERED": "1", "COLUMNS": "120",
                    "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}  # progress bars: \r-redrawn, not a transcript
        self.server: subprocess.Popen | None = None

    def to_real(self, command: str) -> str:
        for doc, real in zip(DOC_PORTS, self.ports):
            command = re.sub(rf"(?<=:){doc}\b", str(real), command)
        return command

    def to_doc(self, output: str) -> str:
        for doc, real in zip(DOC_PORTS, self.ports):
            output = re.sub(rf"\b{real}\b", str(doc), output)
        return output.replace(f"{self.folder}/", "").replace(str(self.folder), ".")

    def run(self, command: str, timeout: float = 600) -> str:
        done = subprocess.run(["bash", "-c", self.to_real(command)], cwd=self.folder, env=self.env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout)
        output = self.to_doc(done.stdout).rstrip()
        if done.returncode:
            raise RuntimeError(f"`{command}` exited {done.returncode}:\n{output}")
        return output

    def start_server(self, command: str, timeout: float = 180) -> str:
        ports = " --http-port {} --grpc-port {} --metrics-port {}".format(*self.ports)
        real = self.to_real(command.split("#", 1)[0].rstrip()) + ports
        self.server = subprocess.Popen(["bash", "-c", f"exec {real}"], cwd=self.folder, env=self.env, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True)
        self._lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self._lines.extend(self.server.stdout), daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self.server.poll() is not None:
                self._reader.join(5)
                raise RuntimeError(f"`{command}` exited {self.server.returncode}:\n{''.join(self._lines)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"`{command}` not ready after {timeout:.0f} s:\n{''.join(self._lines)}")
            time.sleep(0.2)
        seen, quiet = -1, time.monotonic()
        while time.monotonic() - quiet < 1.5:  # what it prints once ready
            if len(self._lines) != seen:
                seen, quiet = len(self._lines), time.monotonic()
            time.sleep(0.1)
        self._shown = seen
        return self.to_doc("".join(self._lines[:seen])).rstrip()

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports[0]}/v2/health/ready", timeout=2) as answer:
                return answer.status == 200
        except OSError:
            return False

    def stop_server(self, timeout: float = 60) -> str:
        if self.server is None:
            return ""
        if self.server.poll() is None:
            self.server.send_signal(signal.SIGINT)
        try:
            self.server.wait(timeout=timeout)
        finally:
            if self.server.poll() is None:
                self.server.kill()
        self._reader.join(10)
        self.server = None
        return self.to_doc("".join(self._lines[self._shown:])).rstrip()


def run_scenario(blocks: dict[str, Block], workspace: Workspace) -> dict[str, str]:
    """Run every transcript's commands in :data:`SCENARIO` order; returns each block's new body."""
    missing = [n for n in SCENARIO if n not in blocks]
    unknown = [n for n in blocks if n not in SCENARIO]
    if missing or unknown:
        raise ValueError(f"transcripts missing from the docs: {missing}; marked in the docs but unknown to "
                         f"tests/transcripts.py: {unknown}")
    out: dict[str, str] = {}
    try:
        for name in SCENARIO:
            cmds = commands(blocks[name].body)
            if not cmds:
                raise ValueError(f"{blocks[name].doc}: transcript {name!r} has no `$ ` command line")
            if name == "serve":
                (command,) = cmds
                out[name] = f"$ {command}\n{workspace.start_server(command)}"
                continue
            out[name] = "\n".join(f"$ {c}\n{workspace.run(c)}".rstrip() for c in cmds)
    finally:
        stopped = workspace.stop_server()
    if "serve" in out:
        out["serve"] += f"\n^C\n{stopped}"
    return out


def write(blocks: dict[str, Block], generated: dict[str, str], root: Path = ROOT) -> list[str]:
    """Replace each block's body with its generated one; returns the docs changed."""
    changed = []
    for doc in DOCS:
        path = root / doc
        lines = path.read_text().splitlines()
        for block in sorted((b for b in blocks.values() if b.doc == doc), key=lambda b: -b.start):
            lines[block.start + 1:block.end] = generated[block.name].splitlines()
        text = "\n".join(lines) + "\n"
        if text != path.read_text():
            path.write_text(text)
            changed.append(doc)
    return changed


def default_ranker(tmp: Path) -> Path:
    """The demo ranker when `make demo` trained it, else the test suite's tiny random-weight ranker."""
    demo = ROOT / "artifacts" / "ranker"
    if (demo / "config.json").is_file():
        return demo
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_tiny_ranker

    return make_tiny_ranker(tmp / "tiny_ranker")


def main(argv: list[str] | None = None) -> int:
    import tempfile

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", action="store_true", help="rewrite the blocks (default: only check them)")
    p.add_argument("--ranker", help="the ranker the transcripts use (default: artifacts/ranker if trained, else the "
                                    "tests' tiny random-weight ranker)")
    args = p.parse_args(argv)
    blocks = find_blocks()
    with tempfile.TemporaryDirectory(prefix="rankserve-transcripts-") as tmp:
        ranker = Path(args.ranker) if args.ranker else default_ranker(Path(tmp))
        print(f"running the transcripts' commands with the ranker {ranker}", flush=True)
        (Path(tmp) / "clone").mkdir()
        workspace = Workspace(Path(tmp) / "clone", ranker)
        generated = run_scenario(blocks, workspace)
    if args.write:
        changed = write(blocks, generated)
        print(f"rewrote {', '.join(changed)}" if changed else "the transcripts are up to date")
        return 0
    stale = [d for b in blocks.values() if (d := diff(b, generated[b.name]))]
    for d in stale:
        print(d)
    print(f"{len(stale)} of {len(blocks)} transcripts differ; {HINT}" if stale else f"{len(blocks)} transcripts match")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
