"""Config schema: every error at once with its field path; overrides; prompt files."""
import pytest

from vfeedback.config import apply_overrides, load_config, read_prompts
from vfeedback.errors import UserError

GOOD = """
algorithm: refl
output_dir: {out}
model: {{family: sd15, path: tiny:sd15}}
reward: color
prompts: {{train: [a red apple]}}
"""


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_good_config_and_defaults(tmp_path):
    cfg = load_config(write(tmp_path, GOOD.format(out=tmp_path / "run")))
    assert cfg.refl.stop_range == (30, 39) and cfg.refl.margin == 2.0 and cfg.refl.grad_scale == 1e-3
    assert cfg.sampling.steps == 40 and cfg.train.lr == 1e-5
    assert cfg.reward.rewards[0].name == "color"


def test_all_errors_reported_at_once_with_paths(tmp_path):
    text = GOOD.format(out=tmp_path / "run") + "train: {lr: -1, batch_size: 0, bogus: 1}\nsampling: {steps: zero}\n"
    with pytest.raises(UserError) as e:
        load_config(write(tmp_path, text))
    msg = str(e.value)
    for path in ("train.lr", "train.batch_size", "train.bogus", "sampling.steps"):
        assert path in msg
    assert "unknown key" in msg
    assert "4 problem" in msg


def test_cross_field_check(tmp_path):
    with pytest.raises(UserError, match="stop_range"):
        load_config(write(tmp_path, GOOD.format(out=tmp_path / "r")), ["sampling.steps=20"])


def test_overrides_typed(tmp_path):
    cfg = load_config(write(tmp_path, GOOD.format(out=tmp_path / "r")),
                      ["train.max_steps=7", "model.lora.rank=2", "prompts.eval=[x, y]", "model.lora.text_encoder=true"])
    assert cfg.train.max_steps == 7 and cfg.model.lora.rank == 2 and cfg.prompts.eval == ["x", "y"] and cfg.model.lora.text_encoder is True
    with pytest.raises(UserError, match="key=value"):
        apply_overrides({}, ["novalue"])


def test_override_inside_a_shorthand_is_refused_not_dropped(tmp_path):
    """`reward.shaping=par` on `reward: color` used to replace the reward by {shaping: par}, so the
    error spoke of a missing `reward.rewards`; a value that is not a mapping is never silently replaced."""
    data = {"reward": "clip", "train": {"max_steps": 4}, "cost": None}
    with pytest.raises(UserError, match=r"reward is 'clip'.*reward=\{rewards: \[\{name: clip\}\], shaping: \.\.\.\}"):
        apply_overrides(data, ["reward.shaping=par"])
    with pytest.raises(UserError, match=r"reward.ensemble.mode cannot be set.*\{rewards: \[\{name: clip\}\], ensemble: \.\.\.\}"):
        apply_overrides(data, ["reward.ensemble.mode=wco"])
    with pytest.raises(UserError, match=r"train.max_steps is 4 in this config"):
        apply_overrides(data, ["train.max_steps.x=1"])
    assert data["reward"] == "clip" and data["train"] == {"max_steps": 4}  # nothing replaced
    assert apply_overrides(data, ["cost.name=color", "new.key=1"])["cost"] == {"name": "color"}  # absent / null: a new section
    assert data["new"] == {"key": 1}
    cfg = load_config(write(tmp_path, GOOD.format(out=tmp_path / "r")), ["reward={rewards: [{name: color}], shaping: par}"])
    assert cfg.reward.shaping == "par" and [r.name for r in cfg.reward.rewards] == ["color"]


@pytest.mark.parametrize("text,match", [
    ("algorithm: refl\n  bad: [", "YAML syntax error at line"),
    ("", "empty"),
    ("- a\n- b\n", "top level must be a mapping"),
])
def test_yaml_problems(tmp_path, text, match):
    with pytest.raises(UserError, match=match):
        load_config(write(tmp_path, text))


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("# comment\na red apple\n\na blue lake\n")
    assert read_prompts(str(tmp_path / "p.txt"), "prompts.train") == ["a red apple", "a blue lake"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "x"}\n{"oops": 1}\n')
    with pytest.raises(UserError, match="line 2"):
        read_prompts(str(tmp_path / "p.jsonl"), "prompts.train")
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    with pytest.raises(UserError, match="no prompts"):
        read_prompts(str(tmp_path / "empty.txt"), "prompts.train")


def test_prompt_file_with_a_byte_order_mark_and_a_comment(tmp_path):
    # Windows editors save UTF-8 with a BOM; without utf-8-sig the comment line read as a prompt
    (tmp_path / "p.txt").write_bytes("\ufeff# my prompts\na red apple\n".encode("utf-8"))
    assert read_prompts(str(tmp_path / "p.txt"), "prompts.train") == ["a red apple"]


def test_yaml_strictness(tmp_path):
    from vfeedback.config import MAX_YAML_NODES, parse_yaml

    with pytest.raises(UserError, match=r"'lr' is given twice \(lines 2 and 3\)"):
        parse_yaml("train:\n  lr: 1\n  lr: 2\n", "c.yaml")
    # merge keys may override (that is what they are for)
    assert parse_yaml("base: &b {lr: 1}\ntrain: {<<: *b, lr: 2}\n", "c.yaml")["train"] == {"lr": 2}
    # each level holds 10 aliases of the one before: a is 11 nodes, b 111, ..., e 111,111 (over the 100,000 limit)
    small = "a: &a [x,x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
    assert len(parse_yaml(small, "c.yaml")["b"]) == 10
    bomb = small + "".join(f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("bcd", "cde"))
    with pytest.raises(UserError, match=f"limit {MAX_YAML_NODES}"):
        parse_yaml(bomb, "c.yaml")
    p = tmp_path / "big.yaml"
    p.write_text("a: " + "x" * (1 << 20) + "\n")
    with pytest.raises(UserError, match="larger than 1024 KiB"):
        load_config(p)
