"""End to end through the installed `specsurgery` console script: build, inspect, schema.

The project is a copy of the example spec in a temporary folder; the commands run
there with their default folders (specs/ -> models/), as a user would run them.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

import specsurgery

REPO = Path(__file__).resolve().parents[1]

# The parameter count of specs/policy.spec, worked out by hand from the parameter
# shapes in docs/language.md (linear: weight [units, in] + bias [units]; embed:
# weight [vocab, dim]; lstm: weight_ih [4u, in], weight_hh [4u, u], bias_ih [4u], bias_hh [4u]).
#   obs.hero numeric = health, max_health, mana, level, alive          = 5
#   obs.units numeric = x, y, health                                    = 3
#   heroes vocab = 4 items, unit_kinds vocab = 4 items
EXPECTED_PARAMETERS = [
    # name                   shape        count
    ("hero_e.embed.weight", [4, 16], 4 * 16),                  # 64
    ("hero_h.linear.weight", [128, 21], 128 * (5 + 16)),      # 2,688  (concat(hero 5, hero_e 16))
    ("hero_h.linear.bias", [128], 128),
    ("unit_h.embed.weight", [4, 8], 4 * 8),                    # 32
    ("unit_h.linear.weight", [128, 11], 128 * (3 + 8)),       # 1,408  (concat(units 3, embed 8))
    ("unit_h.linear.bias", [128], 128),
    ("core.lstm.weight_ih", [2048, 256], 4 * 512 * (128 + 128)),  # 524,288 (concat(hero_h, unit_h))
    ("core.lstm.weight_hh", [2048, 512], 4 * 512 * 512),          # 1,048,576
    ("core.lstm.bias_ih", [2048], 4 * 512),
    ("core.lstm.bias_hh", [2048], 4 * 512),
    ("action.linear.weight", [9, 512], 9 * 512),
    ("action.linear.bias", [9], 9),
    ("value.linear.weight", [1, 512], 1 * 512),
    ("value.linear.bias", [1], 1),
]
EXPECTED_TOTAL = (
    4 * 16                                              # hero_e: embed 4x16
    + 128 * (5 + 16) + 128                              # hero_h: linear 128x21 + bias
    + 4 * 8                                             # unit_h: embed 4x8
    + 128 * (3 + 8) + 128                               # unit_h: linear 128x11 + bias
    + 4 * 512 * 256 + 4 * 512 * 512 + 2 * 4 * 512       # core: lstm 512 over 256 inputs
    + 9 * 512 + 9                                       # action head
    + 1 * 512 + 1                                       # value head
)
assert EXPECTED_TOTAL == 1_586_538 == sum(c for _, _, c in EXPECTED_PARAMETERS)


def specsurgery_cmd() -> list[str]:
    """The installed console script (the one beside this interpreter first), else `python -m`."""
    exe = shutil.which("specsurgery", path=os.path.dirname(sys.executable)) or shutil.which("specsurgery")
    return [exe] if exe else [sys.executable, "-m", "specsurgery"]


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SPECSURGERY_DEBUG"}
    result = subprocess.run(specsurgery_cmd() + list(args), cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=120)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def canonical_policy() -> str:
    from specsurgery.spec.canonical import canonical
    from specsurgery.spec.load import load

    return canonical(load([str(REPO / "specs" / "policy.spec")]).model("policy"))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A fresh project holding the example spec, built once with `specsurgery build`.

    Only specs/policy.spec is copied: the repo's specs/ also holds five.spec and
    five_next.spec, models of about 158M parameters each (630 MB checkpoints),
    far too slow for a test.
    """
    root = tmp_path_factory.mktemp("project")
    (root / "specs").mkdir()
    shutil.copy(REPO / "specs" / "policy.spec", root / "specs" / "policy.spec")
    # a pyproject.toml with no [tool.specsurgery] table: the defaults apply, and no
    # pyproject.toml of a folder above the temporary one can leak in
    (root / "pyproject.toml").write_text('[project]\nname = "demo"\nversion = "0"\n')
    result = run("build", cwd=root)
    root.joinpath("first_build.json").write_text(json.dumps(
        {"returncode": result.returncode, "stdout": result.stdout, "stderr": result.stderr}))
    return root


def first_build(project: Path) -> dict:
    return json.loads(project.joinpath("first_build.json").read_text())


def table_rows(text: str, header_first: str) -> list[list[str]]:
    """Rows of a table printed by cli.table (split on runs of 2+ spaces), header and rule dropped."""
    import re

    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == [header_first])
    assert set(lines[start + 1].replace(" ", "")) == {"-"}
    rows = []
    for line in lines[start + 2:]:
        if not line.strip():
            break
        rows.append(re.split(r"\s{2,}", line.strip()))
    return rows


# ---------------------------------------------------------------------------
# build


@pytest.mark.slow
def test_build_writes_the_checkpoint_and_lists_the_model(project):
    result = first_build(project)
    assert result["returncode"] == 0, result["stderr"]
    # before writing, build says what it will write (tests/test_build_announce.py)
    assert result["stderr"].splitlines()[0].startswith("writing 1 checkpoint to ")
    assert result["stderr"].splitlines()[3].split() == ["policy", "1,586,538", "6.35", "MB", "new"]
    lines = result["stdout"].splitlines()
    assert lines[0].split() == ["model", "parameters", "action", "file"]
    rows = table_rows(result["stdout"], "model")
    assert len(rows) == 1
    model, count, action, file = rows[0]
    assert (model, count, action) == ("policy", f"{EXPECTED_TOTAL:,}", "built")
    assert count == "1,586,538"
    assert Path(file).resolve() == (project / "models" / "policy.safetensors").resolve()
    checkpoint = project / "models" / "policy.safetensors"
    assert checkpoint.is_file()
    # 14 float32 tensors after an 8-byte length and a JSON header
    header_len = int.from_bytes(checkpoint.read_bytes()[:8], "little")
    assert checkpoint.stat().st_size == 8 + header_len + 4 * EXPECTED_TOTAL
    assert sorted(os.listdir(project / "models")) == ["policy.safetensors"]  # no temp files left


@pytest.mark.slow
def test_second_build_is_unchanged_and_does_not_rewrite(project):
    checkpoint = project / "models" / "policy.safetensors"
    before = checkpoint.stat()
    content = checkpoint.read_bytes()
    result = run("build", cwd=project)
    assert result.returncode == 0, result.stderr
    rows = table_rows(result.stdout, "model")
    assert [r[:3] for r in rows] == [["policy", "1,586,538", "unchanged"]]
    after = checkpoint.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)
    assert checkpoint.read_bytes() == content
    assert sorted(os.listdir(project / "models")) == ["policy.safetensors"]


@pytest.mark.slow
def test_build_json(project):
    result = run("build", "--json", cwd=project)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # stdout is the JSON document and nothing else
    assert report["exit"] == 0
    assert len(report["models"]) == 1
    row = report["models"][0]
    assert row["model"] == "policy"
    assert row["parameters"] == EXPECTED_TOTAL
    assert row["action"] == "unchanged"
    assert Path(row["file"]).resolve() == (project / "models" / "policy.safetensors").resolve()
    assert Path(row["spec"]).resolve() == (project / "specs" / "policy.spec").resolve()
    assert "policy" in report["text"]


@pytest.mark.slow
def test_build_dry_run_writes_nothing(project, tmp_path):
    shutil.copytree(project / "specs", tmp_path / "specs")
    shutil.copy(project / "pyproject.toml", tmp_path / "pyproject.toml")
    result = run("build", "--dry-run", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)["models"][0]
    assert (row["model"], row["parameters"], row["action"]) == ("policy", EXPECTED_TOTAL, "would build")
    assert not (tmp_path / "models").exists()


# ---------------------------------------------------------------------------
# inspect


@pytest.mark.slow
def test_inspect_prints_spec_and_parameter_table(project):
    result = run("inspect", "models/policy.safetensors", cwd=project)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    out = result.stdout
    assert out.splitlines()[0] == (
        f"# models/policy.safetensors: model policy, written by specsurgery {specsurgery.__version__}")
    spec_text = canonical_policy()
    assert spec_text in out
    assert "model policy(obs: dota) {" in spec_text and "group units[64] {" in spec_text
    rows = table_rows(out, "parameter")
    expected = [[name, "x".join(map(str, shape)), f"{count:,}"] for name, shape, count in EXPECTED_PARAMETERS]
    assert rows == expected + [["total", f"{EXPECTED_TOTAL:,}"]]
    assert out.rstrip().splitlines()[-1].split() == ["total", "1,586,538"]


@pytest.mark.slow
def test_inspect_json(project):
    result = run("inspect", "--json", "models/policy.safetensors", cwd=project)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report) == {"checkpoint", "model", "version", "spec", "parameters", "total"}
    assert report["checkpoint"] == "models/policy.safetensors"
    assert report["model"] == "policy"
    assert report["version"] == specsurgery.__version__
    assert report["spec"] == canonical_policy()
    assert [(p["name"], p["shape"], p["count"]) for p in report["parameters"]] == EXPECTED_PARAMETERS
    assert report["total"] == EXPECTED_TOTAL == sum(p["count"] for p in report["parameters"])


# ---------------------------------------------------------------------------
# schema

GOOD_RECORD = {
    "hero": {"health": 520.0, "max_health": 600.0, "mana": 75.5, "level": 3, "alive": True, "hero_id": "crystal_maiden"},
    "units": [
        {"x": 1.5, "y": -2.0, "health": 300.0, "kind": "creep"},
        {"x": 0.0, "y": 10.0, "health": 1800.0, "kind": "tower"},
    ],
}


def bad_records() -> dict[str, dict]:
    def changed(edit) -> dict:
        record = json.loads(json.dumps(GOOD_RECORD))
        edit(record)
        return record

    return {
        "unknown category item": changed(lambda r: r["units"][1].update(kind="tree")),
        "missing feature": changed(lambda r: r["hero"].pop("mana")),
        "missing group": changed(lambda r: r.pop("units")),
        "extra feature": changed(lambda r: r["hero"].update(armor=3.0)),
        "extra group": changed(lambda r: r.update(items=[])),
        "float for int": changed(lambda r: r["hero"].update(level=2.5)),
        "bool for int": changed(lambda r: r["hero"].update(level=True)),
        "number for bool": changed(lambda r: r["hero"].update(alive=2)),  # 0 and 1 are bools too
        "string for float": changed(lambda r: r["units"][0].update(x="1.5")),
        "too many entities": changed(lambda r: r.update(units=[r["units"][0]] * 65)),
        "entity set not a list": changed(lambda r: r.update(units=r["units"][0])),
    }


def check_schema_document(schema: dict) -> None:
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert list(schema["properties"]) == ["hero", "units"]
    assert list(schema["properties"]["hero"]["properties"]) == ["health", "max_health", "mana", "level", "alive", "hero_id"]
    assert schema["properties"]["hero"]["properties"]["hero_id"]["enum"] == ["axe", "bane", "crystal_maiden", "drow_ranger"]
    assert schema["properties"]["units"]["maxItems"] == 64
    validator = jsonschema.Draft202012Validator(schema)
    validator.validate(GOOD_RECORD)
    validator.validate({**GOOD_RECORD, "units": []})  # an empty entity set is fine
    for why, record in bad_records().items():
        assert not validator.is_valid(record), why


def test_schema_prints_a_json_schema_that_checks_records(tmp_path):
    result = run("schema", str(REPO / "specs" / "policy.spec"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    schema = json.loads(result.stdout)
    check_schema_document(schema)


def test_schema_json_is_one_line_and_the_same_document(tmp_path):
    shutil.copytree(REPO / "specs", tmp_path / "specs", ignore=shutil.ignore_patterns("five*.spec"))
    pretty = run("schema", "specs/policy.spec", cwd=tmp_path)
    compact = run("schema", "--json", "specs/policy.spec", cwd=tmp_path)
    assert pretty.returncode == compact.returncode == 0
    assert compact.stdout.count("\n") == 1
    assert json.loads(compact.stdout) == json.loads(pretty.stdout)
    check_schema_document(json.loads(compact.stdout))
