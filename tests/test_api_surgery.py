"""ss.plan, ss.surgery (in memory), ss.apply (file to file) and ss.verify, and the
commands over them: the same plan, the same weights, the same messages."""
from __future__ import annotations

import copy
import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch

import specsurgery as ss
from specsurgery.checkpoint import read_header
from specsurgery.cli import main
from specsurgery.features import random_record
from specsurgery.spec.load import load_text

OLD = """schema s {
  vocab kinds = [a, b]
  group g {
    x: float
    z: float
    k: category(kinds)
  }
}

model m(obs: s) {
  h = relu(linear(concat(obs.g, embed(obs.g.k, 2)), 6))
  out score = linear(h, 2)
}
"""
NEW = OLD.replace("    x: float\n", "    x: float\n    y: float\n").replace("[a, b]", "[a, b, c]")
LOSSY = OLD.replace("    x: float\n", "")
RECURRENT = NEW.replace("  out score = linear(h, 2)", "  core = lstm(h, 4)\n  out score = linear(concat(h, core), 2)")


def trained(text: str, seed: int = 1):
    model = ss.compile(text, seed=seed)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def records(n: int, seed: int = 0) -> list:
    schema = load_text(OLD).model().schema
    rng = random.Random(seed)
    return [random_record(schema, rng) for _ in range(n)]


def test_plan_from_any_source(tmp_path):
    old = trained(OLD)
    ckpt = str(tmp_path / "m.safetensors")
    old.save(ckpt)
    spec = tmp_path / "new.spec"
    spec.write_text(NEW)
    plans = [ss.plan(old, NEW), ss.plan(ckpt, str(spec)), ss.plan(OLD, NEW)]
    assert {p.to_json().replace(str(spec), "<string>") for p in plans[:1] + plans[2:]} == {plans[0].to_json()}
    p = plans[1]
    assert p.function_preserving
    s = p.summary
    assert (s.old_params, s.new_params, s.transferred, s.dropped) == (48, 56, 48, 0)
    assert s.zeroed + s.fresh == s.new_params - s.transferred
    again = ss.Plan.from_json(p.to_json())
    assert again.to_json() == p.to_json()
    lossy = ss.plan(OLD, LOSSY)
    assert not lossy.function_preserving
    r = lossy.reasons[0]
    assert (r.file, r.line, r.column) == ("<string>", 4, 5) and "g.x" in r.message
    with pytest.raises(ss.UserError, match="plan: error: not JSON"):
        ss.Plan.from_json("{")
    with pytest.raises(ss.UserError, match="plan: error: not a valid plan"):
        ss.Plan.from_json(json.dumps({"format": "nope"}))


def test_surgery_in_memory_leaves_the_old_model_and_matches_apply(tmp_path):
    old = trained(OLD)
    before = copy.deepcopy(old.state_dict())
    done = ss.surgery(old, NEW)
    assert isinstance(done.model, ss.Model) and done.optimizer is None and done.plan.function_preserving
    for k, v in old.state_dict().items():
        assert torch.equal(v, before[k]), k
    result = ss.verify(old, done.model, states=200)
    assert result.ok and result.compared_in == "float64" and result.max_diff["score"] < 1e-6
    # the same as file to file, to the last bit
    ckpt, out = str(tmp_path / "old.safetensors"), str(tmp_path / "new.safetensors")
    old.save(ckpt, metadata={"run": "r1"})
    applied = ss.apply(ckpt, NEW, out)
    assert applied.to_json() == done.plan.to_json()
    on_disk = ss.load(out)
    assert on_disk.metadata == {"run": "r1"}
    for k, v in done.model.state_dict().items():
        assert torch.equal(v, on_disk.state_dict()[k]), k
    # gradients flow in the new model
    out_ = done.model(done.model.featurise([{"g": {"x": 1.0, "y": 2.0, "z": 0.5, "k": "c"}}]))
    out_["score"].sum().backward()
    assert all(p.grad is not None for p in done.model.parameters())


def test_lossy_is_refused_unless_allowed(tmp_path):
    old = trained(OLD)
    with pytest.raises(ss.UserError) as e:
        ss.surgery(old, LOSSY)
    assert str(e.value).startswith("error: the surgery does not preserve the function; allow it with allow_lossy=True")
    assert "<string>:4:5: " in str(e.value)
    assert not ss.surgery(old, LOSSY, allow_lossy=True).plan.function_preserving
    ckpt = str(tmp_path / "old.safetensors")
    old.save(ckpt)
    spec = tmp_path / "lossy.spec"
    spec.write_text(LOSSY)
    out = str(tmp_path / "out.safetensors")
    with pytest.raises(ss.UserError):
        ss.apply(ckpt, str(spec), out)
    assert main(["apply", ckpt, str(spec), "-o", out]) == 1
    assert main(["apply", ckpt, str(spec), "-o", out, "--allow-lossy"]) == 1  # 87.5% carried: under min_transfer
    assert main(["apply", ckpt, str(spec), "-o", out, "--allow-lossy", "--min-transfer", "0.8"]) == 0


@pytest.mark.parametrize("dtype, name", [(torch.bfloat16, "BF16"), (torch.float16, "F16"), (torch.float64, "F64")])
def test_every_dtype_through_save_apply_verify_inspect(tmp_path, dtype, name, capsys):
    old = trained(OLD).to(dtype)
    ckpt, out = str(tmp_path / "old.safetensors"), str(tmp_path / "new.safetensors")
    old.save(ckpt)
    ss.apply(ckpt, NEW, out)
    assert {i.dtype for i in read_header(out).tensors.values()} == {name}
    new = ss.load(out)
    assert all(p.dtype == dtype for p in new.parameters())
    assert ss.verify(ckpt, out, states=100).ok
    in_memory = ss.surgery(old, NEW).model
    for k, v in in_memory.state_dict().items():
        assert v.dtype == dtype and torch.equal(v, new.state_dict()[k]), k
    assert main(["inspect", out]) == 0
    assert main(["verify", ckpt, out, "--states", "50"]) == 0
    assert "compared in float64" in capsys.readouterr().out


def test_verify_heads_only_on_one_side_nan_and_records(tmp_path):
    old = trained(OLD)
    more = OLD.replace("  out score = linear(h, 2)", "  out score = linear(h, 2)\n  out value = linear(h, 1)")
    grown = ss.surgery(old, more).model
    v = ss.verify(old, grown, states=20)
    assert v.ok and v.only_new == ["value"] and v.only_old == [] and list(v.max_diff) == ["score"]
    back = ss.verify(grown, old, states=20)
    assert back.only_old == ["value"]
    broken = copy.deepcopy(grown)
    with torch.no_grad():
        broken.score.linear.bias[0] = float("nan")
    bad = ss.verify(old, broken, states=10)
    assert math.isnan(bad.max_diff["score"]) and not bad.ok
    assert bad.report()["max"] is None
    mine = records(7)
    v = ss.verify(old, grown, records=mine)
    assert v.ok and v.states == 7 and v.inputs == "records"
    with pytest.raises(ss.UserError, match=r"record 0: g: 'k' is a required property"):
        ss.verify(old, grown, records=[{"g": {"x": 1.0, "z": 0.0}}])
    for states in (0, -5, True, 2.5):
        with pytest.raises(ss.UserError, match="states must be a whole number of at least 1"):
            ss.verify(old, grown, states=states)


def test_verify_a_recurrent_model_against_the_feed_forward_one(one_thread):
    old = trained(OLD)
    new = ss.surgery(old, RECURRENT).model
    assert new.initial_state(1)  # it is recurrent
    v = ss.verify(old, new, states=30)
    assert v.ok and v.steps == 3, v
    v = ss.verify(old, new, records=records(5))
    assert v.ok and v.steps == 1


def test_verify_command_usage_and_exit_codes(tmp_path):
    old = trained(OLD)
    ckpt = str(tmp_path / "old.safetensors")
    old.save(ckpt)
    for states in ("0", "-5", "x"):
        r = subprocess.run([sys.executable, "-m", "specsurgery", "verify", ckpt, ckpt, "--states", states],
                           capture_output=True, text=True)
        assert r.returncode == 2 and "--states" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "specsurgery", "verify", ckpt, ckpt, "--states", "5", "--json"],
                       capture_output=True, text=True)
    report = json.loads(r.stdout)
    assert r.returncode == 0 and report["ok"] and report["compared_in"] == "float64" and report["states"] == 5


def test_user_metadata_through_build(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "m.spec").write_text(OLD)
    assert main(["build"]) == 0
    path = tmp_path / "models" / "m.safetensors"
    model = ss.load(str(path))
    model.save(str(path), metadata={"run": "seven", "step": "100"})
    (tmp_path / "specs" / "m.spec").write_text(NEW)
    assert main(["build"]) == 0
    after = ss.load(str(path))
    assert after.metadata == {"run": "seven", "step": "100"} and "y" in after.spec


@pytest.mark.parametrize("call, args", [
    (lambda p: ss.load(p / "nope.safetensors"), ["inspect", "{p}/nope.safetensors"]),
    (lambda p: ss.verify(p / "nope.safetensors", p / "nope.safetensors"), ["verify", "{p}/nope.safetensors", "{p}/nope.safetensors"]),
    (lambda p: ss.plan(p / "a.spec", OLD), ["plan", "{p}/a.spec", "{p}/a.spec"]),
])
def test_the_command_prints_what_the_api_raises(tmp_path, capsys, call, args):
    with pytest.raises((ss.UserError, ss.SpecError)) as e:
        call(tmp_path)
    capsys.readouterr()
    assert main([a.format(p=tmp_path) for a in args]) == 1
    assert capsys.readouterr().err.strip() == str(e.value).strip()


def test_surgery_is_the_function_and_its_subpackage_still_imports():
    code = ("import specsurgery.surgery.diff as diff, specsurgery as ss, inspect; "
            "from specsurgery.surgery.verify import Verification; "
            "print(diff.make_plan.__name__, list(inspect.signature(ss.surgery).parameters)[:2], "
            "ss.surgery.__doc__.split()[0], Verification is ss.Verification)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out == "make_plan ['model', 'new'] Carry True\n"


def test_seeds_have_one_range_in_python_and_on_the_command_line(tmp_path):
    old = trained(OLD)
    ckpt = str(tmp_path / "old.safetensors")
    old.save(ckpt)
    out = str(tmp_path / "new.safetensors")
    message = "error: 9223372036854775808 is not a seed: seeds run from 0 to 9223372036854775807"
    for call in (lambda s: ss.compile(OLD, seed=s), lambda s: ss.surgery(old, NEW, seed=s),
                 lambda s: ss.apply(ckpt, NEW, out, seed=s), lambda s: ss.verify(old, old, states=2, seed=s)):
        with pytest.raises(ss.UserError) as e:
            call(1 << 63)
        assert str(e.value) == message
        with pytest.raises(ss.UserError, match=r"^error: -1 is not a seed"):
            call(-1)
        with pytest.raises(ss.UserError, match=r"^error: seed must be a whole number, got True$"):
            call(True)
    assert not os.path.exists(out)
    assert ss.verify(old, old, states=2, seed=(1 << 63) - 1).ok
