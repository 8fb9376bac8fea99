"""The documentation is kept true by running it.

- every ``>>>`` example of ``docs/*.md`` and ``README.md`` runs as a doctest (``# doctest: +SKIP``
  marks the few that need a real model), and every fenced ``python`` block without ``>>>`` runs
  too, unless :data:`NOT_RUN` gives the reason it cannot run here;
- the visibility and presets tables of ``docs/attention.md`` (and the README's presets table) are
  evaluated against ``sinklora_ext.reference`` and ``sinklora_ext.patterns.PRESETS``;
- the flag tables of ``docs/cli.md`` against ``sinklora_ext.cli.build_parser()``, its ``--json``
  key tables against the code (live tiny benchmark runs where cheap, else :data:`JSON_KEYS`), and
  every ``sinklora ...`` command line of ``docs/cli.md`` and the README must parse;
- the op sections of ``docs/ops.md`` against the live ``torch.ops.sinklora_ext`` namespace, schema
  included (so a renamed or added op fails here until its section is written);
- no file of the repository cites the old out-of-tree specification any more, every
  ``docs/<page>.md`` the repository names exists, and every local link and anchor of the docs
  resolves.
"""

from __future__ import annotations

import argparse
import contextlib
import doctest
import io
import json
import re
import shlex
from pathlib import Path

import pytest
import torch

import sinklora_ext
from sinklora_ext.patterns import PRESETS, SHIFTS, resolve_pattern
from sinklora_ext.reference import sf_visibility_mask

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
DOC_FILES = sorted(DOCS.glob("*.md")) + [ROOT / "README.md"]
FENCE = re.compile(r"^```([A-Za-z0-9_+-]*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)

# fenced ```python blocks (without >>>) that are not run, keyed by (file, first line), with why
NOT_RUN = {
    ("README.md", "from sinklora_ext.hf.attention import set_attention"):
        "loads the embedded default model (SmolLM2-135M: a GGUF conversion on first use) and "
        "interpolates it to 16k positions; docs/training.md runs the same calls on a tiny LLaMA",
    ("README.md", "llm = vllm.LLM(model, attention_backend=\"SINKLORA\", enable_prefix_caching=False,"):
        "needs vLLM (.venv-vllm); python_tests/test_vllm_plugin.py runs such engines",
    ("docs/serving.md", "from vllm import LLM, SamplingParams"):
        "needs vLLM (.venv-vllm); python_tests/test_vllm_plugin.py runs such engines",
}


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _blocks(path: Path, languages=("python", "pycon", "py")) -> list[str]:
    return [body for lang, body in FENCE.findall(path.read_text()) if lang in languages]


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every markdown table of ``text``: (header cells, body rows of cells)."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and re.match(r"^\|[\s:|-]+\|$", lines[i + 1].strip()):
            header, rows, i = _cells(lines[i]), [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(_cells(lines[i]))
                i += 1
            out.append((header, rows))
        else:
            i += 1
    return out


def _table(text: str, *first_columns: str) -> list[list[str]]:
    found = [rows for header, rows in _tables(text) if header[: len(first_columns)] == list(first_columns)]
    assert found, f"no table with columns {first_columns}"
    return found[0]


def _code(cell: str) -> str:
    """The text of a cell that is one `code span` (else '')."""
    m = re.fullmatch(r"`([^`]*)`", cell.strip())
    return m.group(1) if m else ""


# -------------------------------------------------------------------------------------------------
# examples
# -------------------------------------------------------------------------------------------------


def _doctest_source(path) -> str:
    """The >>> examples of the file at their own line numbers, everything else blank."""
    text = path.read_text()
    kept = [""] * (text.count("\n") + 1)
    for m in FENCE.finditer(text):
        if m.group(1) in ("python", "pycon", "py") and ">>>" in m.group(2):
            first = text.count("\n", 0, m.start(2))
            for n, line in enumerate(m.group(2).splitlines()):
                kept[first + n] = line
    return "\n".join(kept)


@pytest.mark.parametrize("path", [p for p in DOC_FILES if ">>>" in _doctest_source(p)], ids=_rel)
def test_doctests(path):
    """Every >>> example of the file, in order, in one namespace (like a module's docstring)."""
    source = _doctest_source(path)
    test = doctest.DocTestParser().get_doctest(source, {}, _rel(path), str(path), 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report = io.StringIO()
    runner.run(test, out=report.write)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {_rel(path)} failed:\n" + \
        report.getvalue()


def test_every_doc_has_runnable_examples():
    """The reference pages show examples that run (testing.md describes the tests, not an API)."""
    for page in ("attention.md", "paged_kv.md", "ops.md", "training.md", "errors.md"):
        assert any(">>>" in b and "+SKIP" not in b for b in _blocks(DOCS / page)), page


def test_python_blocks():
    """Fenced python blocks without >>> run as scripts, except those NOT_RUN names with the reason."""
    for path in DOC_FILES:
        for body in _blocks(path, ("python", "py")):
            if ">>>" not in body and (_rel(path), body.strip().splitlines()[0].strip()) not in NOT_RUN:
                exec(compile(body, f"{_rel(path)} block", "exec"), {"__name__": "__docs__"})


def test_not_run_entries_exist():
    """Each NOT_RUN entry still names a block (so a reason cannot outlive its block)."""
    firsts = {(_rel(p), b.strip().splitlines()[0].strip()) for p in DOC_FILES for b in _blocks(p, ("python", "py"))}
    assert set(NOT_RUN) <= firsts, set(NOT_RUN) - firsts


# -------------------------------------------------------------------------------------------------
# docs/attention.md: the visibility rule and the presets
# -------------------------------------------------------------------------------------------------


def _visibility_rows():
    rows = _table((DOCS / "attention.md").read_text(), "shift", "query heads")
    out = []
    for shift, heads, rule in rows:
        heads = "True" if heads == "all" else _code(heads)
        assert _code(shift) in SHIFTS and heads and _code(rule), (shift, heads, rule)
        out.append((_code(shift), compile(heads, "heads", "eval"), compile(_code(rule), "rule", "eval")))
    return out


def _mask_from_table(n, g, s_, shift, hq):
    rows = [r for r in _visibility_rows() if r[0] == shift]
    mask = torch.zeros(hq, n, n, dtype=torch.bool)
    for h in range(hq):
        env = dict(h=h, Hq=hq)
        applying = [rule for _, heads, rule in rows if eval(heads, env)]
        assert len(applying) == 1, f"shift {shift!r}, head {h} of {hq}: {len(applying)} rows of the table apply"
        for i in range(n):
            for j in range(n):
                mask[h, i, j] = bool(eval(applying[0], dict(i=i, j=j, N=n, G=g, S=s_, s=g // 2)))
    return mask


@pytest.mark.parametrize("shift", SHIFTS)
def test_visibility_table_is_the_reference(shift):
    """Each row of the table, evaluated literally, is sf_visibility_mask (the test oracle)."""
    cases = [(n, g, sinks, hq) for n in (1, 7, 12, 16) for g in (1, 3, 4, 16) for sinks in (0, 1, 5)
             for hq in (1, 2, 5)]
    checked = 0
    for n, g, sinks, hq in cases:
        if shift == "roll" and n % g:
            with pytest.raises(ValueError, match="roll"):
                sf_visibility_mask(n, g, sinks, shift, hq)
            continue
        expected = sf_visibility_mask(n, g, sinks, shift, hq)
        assert torch.equal(_mask_from_table(n, g, sinks, shift, hq), expected), (n, g, sinks, hq)
        assert bool(expected.diagonal(dim1=1, dim2=2).all())  # every row sees itself
        checked += 1
    assert checked >= 10


def test_visibility_table_is_the_kernel():
    """The op attends exactly over the table's pairs (one spot check per shift, float64 oracle)."""
    n, g, sinks, hq = 16, 8, 2, 4
    q, k, v = torch.randn(1, n, hq, 8), torch.randn(1, n, 2, 8), torch.randn(1, n, 2, 8)
    from sinklora_ext.reference import attention_ref

    for shift in SHIFTS:
        mask = _mask_from_table(n, g, sinks, shift, hq)
        out = sinklora_ext.sf_attention(q, k, v, g, sinks, shift)
        assert torch.allclose(out, attention_ref(q.double(), k.double(), v.double(), mask)[0].float(), atol=1e-5)


def _check_presets_table(rows, where):
    names = [_code(r[0]) for r in rows]
    assert sorted(names) == sorted(PRESETS), f"{where}: presets {names} vs PRESETS {sorted(PRESETS)}"
    for row in rows:
        p = PRESETS[_code(row[0])]
        assert _code(row[1]) == p.shift, f"{where}: {p.name} shift {row[1]} vs {p.shift!r}"
        assert int(row[2].split(",")[0]) == p.num_sinks, f"{where}: {p.name} sinks {row[2]} vs {p.num_sinks}"


def test_presets_table():
    rows = _table((DOCS / "attention.md").read_text(), "preset", "shift", "sinks")
    _check_presets_table(rows, "docs/attention.md")
    for row in rows:  # the group-size column, evaluated
        rule = _code(row[3])
        assert rule, row
        for n in (1, 5, 100, 4096):
            for ratio in (0.1, 0.25, 1.0):
                pat = resolve_pattern(_code(row[0]), n, group_ratio=ratio)
                assert pat.group_size == eval(rule, dict(N=n, ratio=ratio)), (row[0], n, ratio)
                assert pat.num_sinks == PRESETS[_code(row[0])].num_sinks


def test_readme_presets_table():
    _check_presets_table(_table((ROOT / "README.md").read_text(), "preset", "shift", "sinks"), "README.md")


# -------------------------------------------------------------------------------------------------
# docs/cli.md
# -------------------------------------------------------------------------------------------------


def _subparsers(parser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _commands() -> dict[str, argparse.ArgumentParser]:
    from sinklora_ext.cli import build_parser

    out = {}
    for name, sub in _subparsers(build_parser()).items():
        targets = _subparsers(sub)
        if targets:
            out.update({f"{name} {t}": p for t, p in targets.items()})
        else:
            out[name] = sub
    return out


def _cli_sections() -> dict[str, str]:
    text = (DOCS / "cli.md").read_text()
    parts = re.split(r"^## `sinklora ([a-z-]+(?: [a-z-]+)?)`[ \t]*$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def test_cli_subcommands_documented():
    assert sorted(_cli_sections()) == sorted(_commands())


def _literal(value):
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return value


@pytest.mark.parametrize("command", sorted(_cli_sections()))
def test_cli_flags(command):
    """The flag table is the parser: the same flags, required ones marked, literal defaults equal."""
    parser = _commands()[command]
    actions = {opt: a for a in parser._actions for opt in a.option_strings if opt.startswith("--") and opt != "--help"}
    rows = _table(_cli_sections()[command], "flag", "default")
    documented = {}
    for row in rows:
        flag = re.match(r"`(--[a-z0-9-]+)", row[0])
        assert flag, f"{command}: cannot read the flag of {row}"
        documented[flag.group(1)] = row[1]
    assert sorted(documented) == sorted(actions), (
        f"sinklora {command}: undocumented {sorted(set(actions) - set(documented))}, "
        f"not in the parser {sorted(set(documented) - set(actions))}")
    for flag, default in documented.items():
        action = actions[flag]
        assert (default == "required") == bool(action.required), f"{command} {flag}: {default!r}"
        literal = _code(default)
        if action.default not in (None, False) and not action.required:
            assert literal, f"{command} {flag}: the parser's default {action.default!r} is not written as `...`"
            expected = _literal(action.default)
            if isinstance(expected, (int, float)) and not isinstance(expected, bool):
                assert float(literal) == expected, f"{command} {flag}: {literal} vs {expected!r}"
            else:
                assert literal == str(expected), f"{command} {flag}: {literal} vs {expected!r}"


# The --json keys of the subcommands that need a model to run, as the code builds them
# (train.train's summary, evaluate.eval_ppl/run_eval_ppl, eval_passkey/run_eval_passkey,
# run_eval_kv with engine.teacher_forced_nll's stats, generate.run, demo.main, and the result of
# bench.generate / bench.extension / bench.vllm, whose rows are asdict(bench.vllm.Row)); the cheap benchmarks are run live below.
JSON_KEYS = {
    "train": {"output", "attn", "context", "rope_factor", "steps", "train_loss", "first_loss", "last_loss", "losses",
              "windows"},
    "eval-ppl": {"ppl", "nll", "tokens", "windows", "context", "attn", "group_ratio", "sinks", "text", "model",
                 "adapter", "dtype", "device", "seconds"},
    "eval-passkey": {"accuracy", "correct", "trials", "length", "tokens", "depth", "seed", "answers", "attn", "model",
                     "adapter", "seconds", "answers.key", "answers.answer", "answers.correct"},
    "eval-kv": {"ppl", "tokens", "policy", "kv_budget", "sinks", "recent", "prefill", "context", "full_cache_blocks",
                "kv_blocks", "peak_kv_blocks", "block_size", "kv_slots", "decode_steps", "tokens_per_s", "model",
                "adapter", "seconds"},
    "generate": {"outputs", "tokens", "seconds", "tokens_per_s", "policy", "kv_budget", "model"},
    "demo": {"train", "base_ppl", "kv", "kv_budget", "context", "generated",
             "train.first_loss", "train.last_loss", "train.steps",
             "kv.policy", "kv.ppl", "kv.kv_blocks", "kv.tokens_per_s"},
    "tic-train": {"accuracy", "params", "epochs", "seconds", "seconds_per_epoch", "losses", "first_loss", "last_loss",
                  "model", "resolution", "train_images", "test_images", "processes", "output"},
    "tic-eval": {"accuracy", "params", "model", "trained_resolution", "windows", "test_images", "checkpoint"},
    "bench generate": {"config", "rows"}
    | {f"config.{k}" for k in ("device", "device_name", "threads", "dtype", "torch", "model", "layers", "heads_q",
                               "heads_kv", "batch", "context", "kv_budget", "steps", "block_size", "static")}
    | {f"rows.{k}" for k in ("method", "kv_budget", "ttft_ms", "ms_per_step", "tokens_per_s", "kv_blocks",
                             "speedup_vs_full", "speedup_vs_hf")},
    "bench tic": {"config", "rows"}
    | {f"config.{k}" for k in ("dataset", "epochs", "resolution", "seeds", "test_resolutions", "batch_size", "lr",
                               "limit_train", "limit_test", "device", "dtype")}
    | {f"rows.{k}" for k in ("variant", "model", "shift", "inter_pool", "windows", "params", "accuracy", "accuracy_std", "drop",
                             "seconds_per_epoch", "runs")},
    "bench extension": {"config", "base_ppl", "rows"}
    | {f"config.{k}" for k in ("model", "device", "dtype", "original_context", "context", "rope_factor", "steps", "lr",
                               "batch_size", "grad_accum", "group_ratio", "seed", "train_text", "eval_text",
                               "eval_windows", "torch")}
    | {f"rows.{k}" for k in ("pattern", "ppl", "first_loss", "last_loss", "train_seconds", "recovery")},
    "bench vllm": {"config", "rows"}
    | {f"config.{k}" for k in ("model", "model_dir", "layers", "heads_q", "heads_kv", "head_dim", "dtype", "vllm",
                               "torch", "threads", "cpu_count", "requests", "prompt_tokens", "new_tokens", "text",
                               "prompt_stride", "block_size", "kv_budget", "sinks", "recent", "fit_requests",
                               "kv_blocks_vllm", "kv_blocks_sinklora", "block_bytes", "side_block_bytes",
                               "kv_pool_bytes", "max_num_seqs", "max_num_batched_tokens", "enforce_eager",
                               "scoring_s")}
    | {f"rows.{k}" for k in ("backend", "attention_backend", "kv_budget", "kv_blocks", "kv_bytes", "engine_start_s",
                             "wall_s", "max_running", "mean_running", "preemptions", "output_tokens",
                             "output_tokens_per_s", "total_tokens_per_s", "mean_tpot_ms", "mean_ttft_s", "ppl",
                             "match_vs_vllm", "speedup_vs_vllm", "running_vs_vllm", "tpot_vs_vllm", "error")},
    "bench kv-quality": {"config", "rows"}
    | {f"config.{k}" for k in ("device", "device_name", "threads", "dtype", "torch", "model", "recommended", "texts",
                               "windows",
                               "first_window", "new_tokens", "prompt_tokens", "budgets", "sinks", "recent_frac",
                               "passkey_trials", "block_size", "seconds")}
    | {f"rows.{k}" for k in ("policy", "prompt_tokens", "budget_share", "kv_budget", "recent", "ppl", "per_text",
                             "passkey", "seconds", "vs_full")},
}
LIVE_JSON = {
    "bench attention": ["bench", "attention", "--seqlen", "64", "--heads-q", "2", "--heads-kv", "1", "--head-dim",
                        "16", "--repeats", "1", "--json"],
    "bench decode": ["bench", "decode", "--batch", "1", "--context", "32", "--heads-q", "2", "--heads-kv", "1",
                     "--head-dim", "16", "--prefill", "16", "--repeats", "1", "--json"],
    "bench msa-conv": ["bench", "msa-conv", "--sizes", "5", "--batches", "1", "--dilations", "1", "--heads", "1",
                       "--head-dim", "4", "--kernel-size", "3", "--repeats", "1", "--no-flex", "--no-natten", "--json"],
}


def _documented_json_keys(command: str) -> set[str]:
    keys = set()
    for row in _table(_cli_sections()[command], "key", "meaning"):
        key = _code(row[0])
        assert key, row
        keys.add(key)
        nested = re.match(r"(?:per \w+ )?`?\{([a-z_, ]+)\}`?", row[1])
        if nested:
            keys |= {f"{key}.{k.strip()}" for k in nested.group(1).split(",")}
    return keys


def _actual_keys(result: dict) -> set[str]:
    keys = set(result)
    for key, value in result.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            value = value[0]
        if isinstance(value, dict):
            keys |= {f"{key}.{k}" for k in value}
    return keys


def test_cli_json_keys_fixed():
    assert set(JSON_KEYS) | set(LIVE_JSON) == set(_commands()), "every subcommand's --json keys are checked"
    for command, expected in JSON_KEYS.items():
        assert _documented_json_keys(command) == expected, (
            f"sinklora {command}: documented {sorted(_documented_json_keys(command) ^ expected)} differ")


@pytest.mark.parametrize("command", sorted(LIVE_JSON))
def test_cli_json_keys_live(command):
    from sinklora_ext.cli import build_parser

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        args = build_parser().parse_args(LIVE_JSON[command])
        args.func(args)
    result = json.loads(out.getvalue().strip().splitlines()[-1])
    assert _documented_json_keys(command) == _actual_keys(result)


def _command_lines():
    """`sinklora ...` lines of the bash blocks of docs/cli.md and README.md (synopses with [...] aside)."""
    for path in (DOCS / "cli.md", ROOT / "README.md"):
        for body in _blocks(path, ("bash", "sh", "console", "")):
            for line in body.splitlines():
                line = line.strip()
                if "-m sinklora_ext.cli " in line:
                    line = "sinklora " + line.split("-m sinklora_ext.cli ", 1)[1]
                if not line.startswith("sinklora ") or "[" in line:
                    continue
                yield pytest.param(line, id=f"{_rel(path)}:{line[:60]}")


@pytest.mark.parametrize("line", list(_command_lines()))
def test_cli_command_lines_parse(line):
    from sinklora_ext.cli import build_parser

    argv = shlex.split(line.replace("$TEXT", "README.md"), comments=True)[1:]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            build_parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"{line!r} does not parse: {err.getvalue().strip()}")


# -------------------------------------------------------------------------------------------------
# docs/ops.md
# -------------------------------------------------------------------------------------------------


def _live_ops() -> dict[str, str]:
    names = sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names()
                   if n.startswith("sinklora_ext::"))
    return {n: str(getattr(torch.ops.sinklora_ext, n).default._schema).split("::", 1)[1] for n in names}


def _documented_ops() -> dict[str, str]:
    text = (DOCS / "ops.md").read_text()
    parts = re.split(r"^### torch\.ops\.sinklora_ext\.([A-Za-z0-9_]+)[ \t]*$", text, flags=re.M)
    out = {}
    for name, body in zip(parts[1::2], parts[2::2]):
        schema = next((b for lang, b in FENCE.findall(body) if lang == "" and b.lstrip().startswith(name + "(")), "")
        out[name] = " ".join(schema.split()).replace("( ", "(")
    return out


def test_every_op_documented():
    live, documented = _live_ops(), _documented_ops()
    assert live, "no op registered under torch.ops.sinklora_ext"
    assert sorted(documented) == sorted(live), (
        f"docs/ops.md: undocumented ops {sorted(set(live) - set(documented))}, "
        f"documented but not registered {sorted(set(documented) - set(live))}")
    for name, schema in live.items():
        assert documented[name] == schema, f"docs/ops.md schema of {name}:\n  {documented[name]}\nlive:\n  {schema}"


# -------------------------------------------------------------------------------------------------
# references into docs/
# -------------------------------------------------------------------------------------------------

SOURCE_DIRS = ("sinklora_ext", "csrc", "python_tests", "scripts", "bench", "docs")
TEXT_SUFFIXES = {".py", ".pyi", ".cpp", ".h", ".hpp", ".cu", ".cuh", ".md", ".sh", ".txt", ".cfg", ".toml", ".json",
                 ".yaml", ".yml", ".cmake", ""}


def _repository_files() -> list[Path]:
    files = [ROOT / "README.md"]
    for d in SOURCE_DIRS:
        for p in sorted((ROOT / d).rglob("*")):
            if p.is_file() and p.suffix in TEXT_SUFFIXES and "__pycache__" not in p.parts \
                    and "hypothesis_db" not in p.parts and p.stat().st_size < 2_000_000:
                files.append(p)
    return files


def test_no_reference_to_the_old_spec():
    """The contract lives in docs/: nothing cites the out-of-tree specification's sections."""
    needle = "SPEC " + "\u00a7"
    hits = [f"{_rel(p)}:{n}" for p in _repository_files()
            for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if needle in line]
    assert not hits, f"{len(hits)} lines still cite {needle!r} (point them into docs/): {hits[:20]}"


def test_cited_docs_exist():
    """Every ``docs/<page>.md`` (and ``docs/<page>.md#section``) the repository names exists."""
    missing = set()
    for p in _repository_files():
        for page, anchor in re.findall(r"docs/([A-Za-z0-9_.\-]+\.md)(?:#([A-Za-z0-9_\-]+))?", p.read_text(errors="replace")):
            if not (DOCS / page).is_file():
                missing.add(f"{_rel(p)} -> docs/{page}")
            elif anchor and anchor not in _anchors(DOCS / page):
                missing.add(f"{_rel(p)} -> docs/{page}#{anchor} (no such section)")
    assert not missing, sorted(missing)


def _anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    out = set()
    for heading in re.findall(r"^#{1,6} (.+?)[ \t]*$", text, flags=re.M):
        out.add(re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-"))
    return out


def test_doc_links_resolve():
    """Every relative link of docs/*.md and README.md names a file that exists (and an anchor it has)."""
    bad = []
    for path in DOC_FILES:
        text = FENCE.sub("", path.read_text())
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.exists():
                bad.append(f"{_rel(path)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                bad.append(f"{_rel(path)}: {target} (no such section)")
    assert not bad, bad


# -------------------------------------------------------------------------------------------------
# signatures written in docs/*.md
# -------------------------------------------------------------------------------------------------


def _signature_targets() -> dict[str, str]:
    """Short name -> dotted path of every callable whose signature the docs write out."""
    return {
        **{n: f"sinklora_ext.{n}" for n in ("sf_attention", "sf_attention_varlen", "resolve_pattern", "paged_decode",
                                             "paged_write_", "select_evictions", "column_scores", "causal_prefill")},
        "physical_slots": "sinklora_ext.paged.physical_slots",
        "CachePolicy": "sinklora_ext.kv_cache.CachePolicy",
        "PagedKVCache": "sinklora_ext.kv_cache.PagedKVCache",
        "DecodeEngine": "sinklora_ext.engine.DecodeEngine",
        "Request": "sinklora_ext.engine.Request",
        "StaticDecoder": "sinklora_ext.engine.StaticDecoder",
        "make_cache": "sinklora_ext.engine.PagedLlama.make_cache",
        "teacher_forced_nll": "sinklora_ext.engine.teacher_forced_nll",
        "set_attention": "sinklora_ext.hf.attention.set_attention",
        "apply_lora_plus": "sinklora_ext.hf.lora.apply_lora_plus",
        "extend_context": "sinklora_ext.hf.lora.extend_context",
        "PagedH2OCache": "sinklora_ext.hf.cache.PagedH2OCache",
        "generate_with_policy": "sinklora_ext.hf.cache.generate_with_policy",
        "load_model": "sinklora_ext.hf.models.load_model",
    }


def _resolve(dotted: str):
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr, None)
        return obj
    return None


def _written_signatures(short: str) -> list[tuple[str, str]]:
    """(where, parameter text) of every ``short(...)`` in docs/*.md outside >>> examples that reads
    as a parameter list (what ``def f(...)`` accepts)."""
    import ast

    found = []
    for path in sorted(DOCS.glob("*.md")):
        text = path.read_text()
        for m in re.finditer(rf"(?<![\w]){re.escape(short)}\(", text):
            line = text[text.rfind("\n", 0, m.start()) + 1:].lstrip()
            if line.startswith((">>>", "...")):
                continue
            depth, end = 1, m.end()
            while end < len(text) and depth:
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                end += 1
            params = text[m.end():end - 1]
            try:
                ast.parse(f"def f({params}): pass")
            except SyntaxError:
                continue
            found.append((f"{_rel(path)}:{text.count(chr(10), 0, m.start()) + 1}", params))
    return found


@pytest.mark.parametrize("short", sorted(_signature_targets()))
def test_written_signatures(short):
    """Each signature the docs write is the callable's: the same parameters in order (trailing
    optional ones may be left out), the same defaults, no default where there is none."""
    import ast
    import inspect

    target = _resolve(_signature_targets()[short])
    assert target is not None, f"{_signature_targets()[short]} does not exist (docs/ name it)"
    written = _written_signatures(short)
    assert written, f"docs/ never write the signature of {short}"
    real = [p for p in inspect.signature(target).parameters.values() if p.name not in ("self", "cls")]
    for where, params in written:
        node = ast.parse(f"def f({params}): pass").body[0].args
        doc = [(a.arg, None) for a in node.posonlyargs + node.args]
        for a, d in zip(reversed(node.posonlyargs + node.args), reversed(node.defaults)):
            doc[doc.index((a.arg, None))] = (a.arg, d)
        doc += [("*" + node.vararg.arg, None)] if node.vararg else []
        doc += [(a.arg, d) for a, d in zip(node.kwonlyargs, node.kw_defaults)]
        doc += [("**" + node.kwarg.arg, None)] if node.kwarg else []
        names = [("*" if p.kind is p.VAR_POSITIONAL else "**" if p.kind is p.VAR_KEYWORD else "") + p.name for p in real]
        assert [n for n, _ in doc] == names[: len(doc)], f"{where}: {short}({params}) vs {names}"
        for p in real[len(doc):]:
            assert p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD), \
                f"{where}: {short} leaves out {p.name}, which has no default"
        for (name, default), p in zip(doc, real):
            if default is None:
                assert p.default is p.empty or name.startswith("*"), f"{where}: {short}: {name} has a default"
                continue
            value = eval(compile(ast.Expression(default), where, "eval"), {"torch": torch})
            assert p.default is not p.empty and p.default == value, \
                f"{where}: {short}: {name}={value!r}, the code's default is {p.default!r}"


def test_public_api_documented():
    """Every name the package exports is documented (as ``sinklora_ext.<name>``)."""
    text = "\n".join(p.read_text() for p in DOCS.glob("*.md"))
    missing = [n for n in sinklora_ext.__all__ if f"sinklora_ext.{n}" not in text]
    assert not missing, f"sinklora_ext.__all__ names not in docs/: {missing}"


def test_policies_table():
    from sinklora_ext.kv_cache import POLICIES

    rows = _table((DOCS / "paged_kv.md").read_text(), "policy", "keeps", "evicts")
    assert [_code(r[0]) for r in rows] == list(POLICIES)
    assert f"POLICIES = {POLICIES!r}".replace("'", '"') in (DOCS / "paged_kv.md").read_text()


@pytest.mark.parametrize("module", ["sinklora_ext.cli"] + [f"sinklora_ext.bench.{t}" for t in
                                                              ("attention", "decode", "generate", "extension")])
def test_documented_modules_run(module):
    """docs/ and the README run ``python -m sinklora_ext.cli`` (what torchrun and accelerate launch)
    and ``python -m sinklora_ext.bench.<target>``."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=300,
                         cwd=ROOT)
    assert run.returncode == 0 and "usage:" in run.stdout, (run.returncode, run.stdout[-500:], run.stderr[-2000:])
