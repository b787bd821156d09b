"""Every typed flag of every script, fed wrong-typed and out-of-range values from the command line and from
a `--config` YAML file: exit code 2, one `error:` line naming the flag, and nothing written.

The cases are generated from the parsers themselves: each flag's type (positive_int, fraction, ...) has
values it must refuse, so a flag added later with one of these types is covered without a new row here.
"""

import contextlib
import io
import os

import pytest
import yaml

import distill_student
import encode
import evaluate
import refine_contrastive
import train_teacher
from common import args as argument_types
from common.alignment import parse_objectives
from common.errors import UserError

SCRIPTS = {
    "train_teacher": train_teacher,
    "distill_student": distill_student,
    "refine_contrastive": refine_contrastive,
    "evaluate": evaluate,
    "encode": encode,
}
# Values each type must refuse, as a user would type them (command line) or write them (YAML).
REFUSED = {
    argument_types.positive_int: ["0", "-3", "2.5", "ten", "1e3"],
    argument_types.non_negative_int: ["-1", "2.5", "x"],
    argument_types.positive_float: ["0", "-1e-4", "nan", "inf", "fast"],
    argument_types.non_negative_float: ["-0.1", "nan", "x"],
    argument_types.finite_float: ["nan", "-inf", "x"],
    argument_types.fraction: ["0", "1.5", "-0.5", "x"],
    argument_types.layer_list: ["3,1", "0,0", "-1,2", "a,b"],
    argument_types.shrinking_schedule: ["4,7", "7,7", "0", "4,x"],
    parse_objectives: ["l3", "0*l2", "l2+l2", "x*kl"],
}
YAML_REFUSED = {  # typed values in YAML: a float for an integer, a string "false" for an on/off flag, ...
    argument_types.positive_int: [2.5, 0, "12abc"],
    argument_types.positive_float: [0, -1.0, "slow", {"a": 1}],
    argument_types.fraction: [2, 0],
}


def typed_flags(module):
    parser = capture_parser(module)
    return [(action.option_strings[0], action.type) for action in parser._actions
            if action.option_strings and action.type in REFUSED]  # fmt: skip


def capture_parser(module):
    """The script's parser, as parse_args builds it (parse_with_config is intercepted)."""
    captured = {}

    def intercept(parser, argv=None):
        captured["parser"] = parser
        return None

    original = module.parse_with_config
    module.parse_with_config = intercept
    try:
        module.parse_args([])
    finally:
        module.parse_with_config = original
    return captured["parser"]


def run_expecting_exit_2(main, argv):
    """main(argv) must stop in argument parsing: SystemExit(2), one line starting with the program's error."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    errors = [line for line in stderr.getvalue().splitlines() if "error:" in line]
    assert len(errors) == 1, stderr.getvalue()
    return errors[0]


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_every_typed_flag_refuses_bad_values_on_the_command_line(name, tmp_path):
    module = SCRIPTS[name]
    flags = typed_flags(module)
    assert flags, f"{name} has no typed flags"
    output = tmp_path / "out"
    for flag, kind in flags:
        for value in REFUSED[kind]:
            line = run_expecting_exit_2(module.main, [flag, value, "--output_dir", str(output)])
            assert flag in line, line
    assert not output.exists()  # nothing was written, not even a folder


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_every_typed_flag_refuses_bad_values_from_yaml(name, tmp_path):
    module = SCRIPTS[name]
    output, config = tmp_path / "out", tmp_path / "config.yaml"
    checked = 0
    for flag, kind in typed_flags(module):
        for value in YAML_REFUSED.get(kind, REFUSED[kind][:2]):
            config.write_text(yaml.safe_dump({flag.lstrip("-"): value, "output_dir": str(output)}))
            with pytest.raises(UserError, match=rf"config\.yaml: {flag.lstrip('-')}") as refused:
                module.main(["--config", str(config)])
            assert "\n" not in str(refused.value)
            checked += 1
    assert checked and not output.exists()


def test_on_off_flags_in_yaml_take_only_true_or_false(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text('overwrite_output_dir: "false"\n')  # a quoted "false" is a string, not false
    with pytest.raises(UserError, match=r"overwrite_output_dir is the text 'false' \(in quotes\); write false without"):
        train_teacher.parse_args(["--config", str(config)])
    config.write_text("overwrite_output_dir: 1\n")
    with pytest.raises(UserError, match="overwrite_output_dir is an on/off flag; set it to true or false, not 1"):
        train_teacher.parse_args(["--config", str(config)])
    config.write_text("overwrite_output_dir: false\nmax_train_steps: 3\nlearning_rate: 2e-4\n")
    args = train_teacher.parse_args(["--config", str(config), "--max_train_steps", "4"])
    assert (args.overwrite_output_dir, args.max_train_steps, args.learning_rate) == (False, 4, 2e-4)
    config.write_text("k: [5, 20]\n")
    assert evaluate.parse_args(["--config", str(config)]).k == [5, 20]
    assert evaluate.parse_args(["--config", str(config), "--k", "1"]).k == [1]  # the command line wins


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--student_num_layers", "7"], "deeper than the 6-layer teacher"),
        (["--student_num_layers", "6"], "is the teacher: aligning it changes nothing"),
        (["--student_layers", "0,6"], "names a layer the 6-layer teacher does not have"),
        (["--student_num_layers", "4", "--prune_schedule", "4,2"], "must start below the student's 4 blocks"),
        (["--max_train_steps", "3", "--num_warmup_steps", "4"], "would never reach its peak"),
    ],
)
def test_combinations_refused_before_any_model_loads(argv, message, tmp_path, monkeypatch):
    from common.demo_data import demo_base_model

    def no_weights(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(distill_student.Encoder, "from_pretrained", no_weights)
    with pytest.raises(UserError, match=message):
        distill_student.main(["--teacher_model", demo_base_model(), "--output_dir", str(tmp_path / "o"), *argv])
    assert not os.path.exists(tmp_path / "o")


def test_a_contrastive_run_without_any_negative_is_refused(tmp_path):
    argv = ["--per_device_train_batch_size", "1", "--num_hard_negatives", "0", "--output_dir", str(tmp_path / "o")]
    with pytest.raises(UserError, match="the contrastive loss is 0"):
        train_teacher.main(argv)
    with pytest.raises(UserError, match="the contrastive loss is 0"):
        refine_contrastive.main([*argv, "--num_random_negatives", "0"])
    assert not os.path.exists(tmp_path / "o")
