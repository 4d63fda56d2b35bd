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
