"""benchmarks/time_to_quality.py: the crossing time, the verdict, the tables, and both runs' command lines."""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from PIL import Image

from hf_ddpm.presets import get_preset
from hf_ddpm.training_args import parse_training_args

spec = importlib.util.spec_from_file_location("time_to_quality", REPO_ROOT / "benchmarks" / "time_to_quality.py")
ttq = sys.modules["time_to_quality"] = importlib.util.module_from_spec(spec)  # dataclasses look it up there
spec.loader.exec_module(ttq)


def history(*points: tuple[int, float, float]) -> list[dict]:
    """eval_history entries from (global_step, train_seconds, digits_fd)."""
    return [
        {"global_step": step, "train_seconds": seconds, "digits_fd": fd, "digits_confidence": 0.5,
         "digits_class_entropy": 0.9, "digits_fd_real_halves": 6.5}
        for step, seconds, fd in points
    ]  # fmt: skip


def test_crossing_is_interpolated_linearly_between_the_evaluations_around_it():
    h = history((100, 10.0, 50.0), (200, 20.0, 30.0), (300, 30.0, 10.0))
    assert ttq.first_crossing(h, 20.0) == pytest.approx(25.0)  # half-way from 30 down to 10
    assert ttq.first_crossing(h, 30.0) == pytest.approx(20.0)  # reached exactly at an evaluation
    assert ttq.first_crossing(h, 45.0) == pytest.approx(12.5)


def test_crossing_is_the_first_one_even_when_the_metric_goes_back_up():
    h = history((300, 30.0, 40.0), (100, 10.0, 50.0), (200, 20.0, 15.0), (400, 40.0, 10.0))  # any order
    assert ttq.first_crossing(h, 20.0) == pytest.approx(10.0 + 30 / 35 * 10)


def test_crossing_at_the_first_evaluation_is_its_time_and_never_is_none():
    h = history((100, 10.0, 5.0), (200, 20.0, 4.0))
    assert ttq.first_crossing(h, 8.0) == 10.0
    assert ttq.first_crossing(h, 3.9) is None


def test_ratio_to_the_paper_recipes_time_and_the_goal():
    paper = history((300, 30.0, 40.0), (900, 90.0, 20.0))
    met = ttq.compare(history((100, 10.0, 50.0), (200, 20.0, 30.0), (300, 30.0, 10.0)), paper)
    assert (met.target_fd, met.paper_seconds, met.default_seconds) == (20.0, 90.0, pytest.approx(25.0))
    assert met.ratio == pytest.approx(25 / 90) and met.goal_met
    assert "goal <= 1/3: met" in ttq.comparison_text(met)

    late = ttq.compare(history((200, 20.0, 50.0), (600, 60.0, 10.0)), paper)
    assert late.ratio == pytest.approx(50 / 90) and not late.goal_met  # 20 s + 30/40 of the 40 s to 60 s
    assert "goal <= 1/3: not met" in ttq.comparison_text(late)

    boundary = ttq.compare(history((300, 30.0, 20.0)), paper)
    assert boundary.ratio == pytest.approx(1 / 3) and boundary.goal_met


def test_never_reaching_the_paper_recipes_fd_has_no_ratio_and_misses_the_goal():
    c = ttq.compare(history((100, 10.0, 50.0), (200, 20.0, 30.0)), history((900, 90.0, 20.0)))
    assert c.default_seconds is None and c.ratio is None and not c.goal_met
    assert "not met (never reached)" in ttq.comparison_text(c)


def test_table_has_one_row_per_evaluation_in_step_order():
    lines = ttq.markdown_table(history((200, 20.04, 30.123), (100, 10.0, 50.0))).splitlines()
    assert lines[0] == "| step | train seconds | digits FD | confident (>0.9) | class entropy |"
    assert lines[2:] == ["| 100 | 10.0 | 50.00 | 0.500 | 0.900 |", "| 200 | 20.0 | 30.12 | 0.500 | 0.900 |"]


def test_figure_is_a_600_by_400_png(tmp_path):
    path = ttq.fd_vs_seconds_figure({"a": history((1, 1.0, 9.0), (2, 2.0, 8.0))}, 6.5, tmp_path / "f.png")
    with Image.open(path) as image:
        assert (image.format, image.size) == ("PNG", (600, 400))


def test_both_command_lines_parse_with_train_pys_parser_and_b_is_the_papers_recipe(tmp_path):
    args = ttq.parse_args(["--eval_every", "50", "--default_steps", "100", "--output_dir", str(tmp_path)])
    assert args.paper_steps == 300
    preset = get_preset("digits-16").train_defaults
    default = parse_training_args(ttq.train_command(ttq.RECIPES["default"], tmp_path / "a", 100, 3, args)[2:])
    assert (default.learning_rate, default.max_train_steps, default.eval_every) == (preset["learning_rate"], 100, 50)
    assert default.seed == 3 and args.seeds == [0]
    paper = parse_training_args(ttq.train_command(ttq.RECIPES["paper"], tmp_path / "b", 300, 3, args)[2:])
    assert (paper.prediction_type, paper.loss_weighting, paper.timestep_sampler) == ("epsilon", "uniform", "uniform")
    assert (paper.beta_schedule, paper.beta_start, paper.beta_end) == ("linear", 1e-4, 0.02)
    assert (paper.learning_rate, paper.lr_scheduler) == (2e-4, "constant_with_warmup")
    assert paper.lr_warmup_steps == preset["lr_warmup_steps"]
    assert paper.use_ema and paper.ema_max_decay == 0.9999
    for run in (default, paper):
        assert (run.eval_metric, run.eval_num_samples, run.sample_every, run.preset) == ("digits", 512, 0, "digits-16")
    with pytest.raises(SystemExit):
        ttq.parse_args(["--eval_every", "40", "--default_steps", "100"])  # the last step would not be evaluated


# Stands in for scripts/train.py: writes the training_summary.json the benchmark reads, FD falling faster with
# the larger learning rate, and appends its argv to runs.jsonl so the test sees the order of the runs.
FAKE_TRAIN = """
import json, sys
from pathlib import Path
argv = sys.argv[1:]
flag = lambda name, default=None: argv[argv.index(name) + 1] if name in argv else default
out, steps, every = Path(flag("--output_dir")), int(flag("--max_train_steps")), int(flag("--eval_every"))
rate = 4.0 if flag("--learning_rate") is None else 1.0
shift = 2 * int(flag("--seed")) - 1  # seed 0 one FD point better and 1 s faster, seed 1 as much worse and slower
history = [{"global_step": s, "train_seconds": s / 10 + shift, "digits_fd": 6.5 + 100 / (1 + rate * s / 100) + shift,
            "digits_confidence": 0.9, "digits_class_entropy": 0.99, "digits_fd_real_halves": 6.5}
           for s in range(every, steps + 1, every)]
out.mkdir(parents=True)
results = {"eval_history": history, "wall_time_s": steps / 5, "hardware": "fake CPU (2 cores), 2 torch thread(s)"}
(out / "training_summary.json").write_text(json.dumps({"config": {}, "results": results}))
with open(out.parent / "runs.jsonl", "a") as f:
    f.write(json.dumps(argv) + "\\n")
"""


def test_main_alternates_the_recipes_over_the_seeds_and_judges_the_seed_averaged_curves(tmp_path, monkeypatch, capsys):
    fake = tmp_path / "fake_train.py"
    fake.write_text(textwrap.dedent(FAKE_TRAIN))
    monkeypatch.setattr(ttq, "TRAIN_SCRIPT", fake)
    figure = tmp_path / "ttq.png"
    ttq.main(["--eval_every", "100", "--default_steps", "300", "--eval_num_samples", "256",
              "--seeds", "0", "1", "--output_dir", str(tmp_path / "runs"), "--figure", str(figure)])  # fmt: skip
    out = capsys.readouterr().out
    runs = [json.loads(line) for line in (tmp_path / "runs" / "runs.jsonl").read_text().splitlines()]
    names = ["default-seed0", "paper-seed0", "default-seed1", "paper-seed1"]
    assert [Path(run[run.index("--output_dir") + 1]).name for run in runs] == names
    assert [run[run.index("--seed") + 1] for run in runs] == ["0", "0", "1", "1"]
    assert "--learning_rate" not in runs[0] and runs[1][runs[1].index("--max_train_steps") + 1] == "900"
    assert "hardware: fake CPU" in out and "warning: below 512 samples" in out
    # the seeds' shifts cancel in the means: (b) ends at 6.5 + 100/10 = 16.5 after 90 s; (a) passes 6.5 + 100/9 at
    # 20 s and 6.5 + 100/13 at 30 s
    crossing = 20 + (100 / 9 - 10) / (100 / 9 - 100 / 13) * 10
    assert f"after {crossing:.1f} training seconds" in out
    assert f"ratio (a) / (b): {crossing / 90:.3f}; goal <= 1/3: met" in out
    assert out.count("| step | train seconds |") == 4 and figure.is_file()
    assert "averaged over the 2 seeds" in out and "seed 0: ratio (a) / (b) " in out and "seed 1: ratio" in out


def test_seed_average_is_point_by_point_and_needs_the_same_evaluation_steps():
    mean = ttq.mean_history(
        [history((200, 20.0, 30.0), (100, 10.0, 50.0)), history((100, 12.0, 40.0), (200, 24.0, 20.0))]
    )
    assert [(p["global_step"], p["train_seconds"], p["digits_fd"]) for p in mean] == [
        (100, 11.0, 45.0),
        (200, 22.0, 25.0),
    ]
    with pytest.raises(SystemExit, match="different steps"):
        ttq.mean_history([history((100, 10.0, 50.0)), history((150, 10.0, 50.0))])
