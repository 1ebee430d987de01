"""Stage commands as a newcomer uses them (issue 8, defects 8, 9 and 11).

* An out-of-date stage names the recipe keys that changed, old value to new,
  and a stage command can go on from a run directory's resolved recipe.
* Interrupting a ``--force`` run gives advice that is true, and the files
  beside the checkpoint describe it.
* ``kdc recipes`` lists the shipped recipes and ``kdc recipes copy`` copies one;
  help examples name no file a user does not have.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from kdcompress.checkpoint import load_checkpoint

RUN = Path("runs") / "tiny"


def epochs_in(metrics: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()]


# --------------------------------------------------------------------------- defect 8


def test_out_of_date_upstream_names_the_changed_key_old_to_new(in_tmp, write_recipe, kdc):
    write_recipe()
    kdc.assert_clean_exit(kdc("train-teacher", "recipe.yaml", "--set", "teacher.epochs=1"), 0)
    result = kdc("distill", "recipe.yaml", "--set", "distill.epochs=1")
    kdc.assert_clean_exit(result, 2)
    out = kdc.flat(result)
    assert "'distilled' stage needs the 'teacher' stage first" in out
    assert "teacher.epochs: 1 -> 2" in out  # the checkpoint had 1, the recipe asks for 2
    # the way out that keeps the earlier override: go on from the run directory
    assert f"kdc distill {RUN}" in out


def test_a_stage_command_goes_on_from_a_run_directory(in_tmp, write_recipe, kdc):
    write_recipe()
    kdc.assert_clean_exit(kdc("train-teacher", "recipe.yaml", "--set", "teacher.epochs=1"), 0)
    result = kdc("distill", str(RUN), "--set", "distill.epochs=1")
    kdc.assert_clean_exit(result, 0)
    ckpt = load_checkpoint(in_tmp / RUN / "distilled" / "model.pt")
    assert ckpt["recipe"]["teacher"]["epochs"] == 1 and ckpt["recipe"]["distill"]["epochs"] == 1
    # the run directory's recipe now holds both overrides, so the next stage needs none
    resolved = yaml.safe_load((in_tmp / RUN / "recipe.yaml").read_text())
    assert resolved["teacher"]["epochs"] == 1 and resolved["distill"]["epochs"] == 1
    kdc.assert_clean_exit(kdc("prune", str(RUN)), 0)
    assert (in_tmp / RUN / "pruned" / "model.pt").is_file()


def test_prune_names_the_stage_to_rerun_and_the_key_two_stages_up(in_tmp, write_recipe, kdc):
    write_recipe()
    kdc.assert_clean_exit(kdc("train-teacher", "recipe.yaml", "--set", "teacher.epochs=1"), 0)
    kdc.assert_clean_exit(kdc("distill", str(RUN)), 0)
    result = kdc("prune", "recipe.yaml")
    kdc.assert_clean_exit(result, 2)
    out = kdc.flat(result)
    assert "teacher.epochs: 1 -> 2" in out
    assert "a stage it depends on is missing or out of date" not in out
    assert "run `kdc train-teacher recipe.yaml && kdc distill recipe.yaml`" in out  # from the changed stage on


def test_prune_before_distill_passes_each_command_only_the_keys_its_stage_reads(in_tmp, write_recipe, kdc):
    write_recipe()
    result = kdc("prune", "recipe.yaml", "--set", "prune.rate=0.3", "--set", "distill.temperature=2")
    kdc.assert_clean_exit(result, 2)
    out = kdc.flat(result)
    first = "kdc train-teacher recipe.yaml && kdc distill recipe.yaml --set distill.temperature=2"
    assert f"run `{first}`, then this command again" in out, out
    assert "kdc train-teacher recipe.yaml --set" not in out  # no prune or distill key passed to the teacher
    assert "`kdc run recipe.yaml --set prune.rate=0.3 --set distill.temperature=2` for every stage" in out


def test_the_stage_itself_says_which_keys_changed(in_tmp, write_recipe, kdc):
    from kdcompress.recipe import load_recipe
    from kdcompress.run import stage_status

    path = write_recipe()
    kdc.assert_clean_exit(kdc("run", "recipe.yaml"), 0)
    recipe = load_recipe(path, ["distill.temperature=2", "distill.alpha=0.25"])
    status = stage_status(recipe, "distilled")
    assert not status.done
    assert "distill.temperature: 4.0 -> 2.0" in status.reason
    assert "distill.alpha: 0.5 -> 0.25" in status.reason
    pruned = stage_status(recipe, "pruned")
    assert not pruned.done and "distill.temperature: 4.0 -> 2.0" in pruned.reason
    assert stage_status(load_recipe(path, ["data.workers=0"]), "pruned").done  # read speed is not an input


# --------------------------------------------------------------------------- defect 9


def test_interrupting_a_forced_rerun_gives_true_advice_and_the_rerun_resumes(in_tmp, write_recipe, kdc, fail_training):
    write_recipe()
    kdc.assert_clean_exit(kdc("train-teacher", "recipe.yaml"), 0)
    stage_dir = in_tmp / RUN / "teacher"
    fail_training("teacher", epoch=2, batch=3)
    result = kdc("train-teacher", "recipe.yaml", "--force")
    kdc.assert_clean_exit(result, 130)
    hint = [line for line in result.output.splitlines() if "interrupted" in line]
    assert len(hint) == 1 and "without --force to resume" in hint[0], result.output
    assert (stage_dir / "state.pt").is_file() and epochs_in(stage_dir / "metrics.partial.jsonl") == [1]
    assert epochs_in(stage_dir / "metrics.jsonl") == [1, 2]  # still the finished checkpoint's

    # the advice: the same command without --force goes on from epoch 1; it is not "up to date, skipped"
    result = kdc("train-teacher", "recipe.yaml")
    kdc.assert_clean_exit(result, 0)
    out = kdc.flat(result)
    assert "up to date, skipped" not in out
    assert "teacher: resuming after epoch 1/2" in out
    assert not (stage_dir / "state.pt").exists()
    assert epochs_in(stage_dir / "metrics.jsonl") == [1, 2]


def test_status_of_a_stage_with_an_interrupted_run_is_not_up_to_date(in_tmp, write_recipe, kdc, fail_training):
    from kdcompress.recipe import load_recipe
    from kdcompress.run import stage_status

    path = write_recipe()
    kdc.assert_clean_exit(kdc("train-teacher", "recipe.yaml"), 0)
    fail_training("teacher", epoch=2, batch=3)
    kdc.assert_clean_exit(kdc("train-teacher", "recipe.yaml", "--force"), 130)
    status = stage_status(load_recipe(path), "teacher")
    assert not status.done and "interrupted run stopped after epoch 1" in status.reason


def test_a_skipped_stage_puts_back_the_metrics_that_describe_its_checkpoint(in_tmp, write_recipe, kdc, fail_training):
    write_recipe()
    kdc.assert_clean_exit(kdc("train-teacher", "recipe.yaml"), 0)
    stage_dir = in_tmp / RUN / "teacher"
    before = (stage_dir / "metrics.jsonl").read_text()
    # an interrupted run of other settings keeps its own first epoch in the running log, not in metrics.jsonl
    fail_training("teacher", epoch=2, batch=3)
    kdc.assert_clean_exit(kdc("train-teacher", "recipe.yaml", "--set", "teacher.lr=0.02"), 130)
    assert epochs_in(stage_dir / "metrics.partial.jsonl") == [1]
    assert (stage_dir / "metrics.jsonl").read_text() == before
    (stage_dir / "metrics.jsonl").write_text('{"epoch": 9}\n')  # as a kill between checkpoint and metrics leaves it
    result = kdc("train-teacher", "recipe.yaml")  # the original settings: the checkpoint is up to date
    kdc.assert_clean_exit(result, 0)
    assert "up to date, skipped" in kdc.flat(result)
    assert (stage_dir / "metrics.jsonl").read_text() == before


# --------------------------------------------------------------------------- defect 11


def test_kdc_recipes_lists_the_shipped_recipes(kdc):
    result = kdc("recipes")
    kdc.assert_clean_exit(result, 0)
    assert "quickstart" in result.stdout and "fashion-mnist-mlp" in result.stdout
    assert "kdc recipes copy" in result.output


def test_kdc_recipes_copy_writes_a_recipe_that_runs_as_the_builtin(in_tmp, kdc):
    from kdcompress.recipe import builtin_recipe_path, load_recipe

    result = kdc("recipes", "copy", "quickstart", "mine.yaml")
    kdc.assert_clean_exit(result, 0)
    assert (in_tmp / "mine.yaml").read_text() == builtin_recipe_path("quickstart").read_text()
    assert load_recipe(in_tmp / "mine.yaml").teacher == load_recipe().teacher
    again = kdc("recipes", "copy", "quickstart", "mine.yaml")  # never overwrites without --force
    kdc.assert_clean_exit(again, 2)
    assert "exists" in kdc.flat(again) and "--force" in kdc.flat(again)
    kdc.assert_clean_exit(kdc("recipes", "copy", "fashion-mnist-mlp"), 0)  # default DEST: ./NAME.yaml
    assert (in_tmp / "fashion-mnist-mlp.yaml").is_file()
    (in_tmp / "sub").mkdir()
    kdc.assert_clean_exit(kdc("recipes", "copy", "quickstart", "sub"), 0)  # a folder: NAME.yaml inside it
    assert (in_tmp / "sub" / "quickstart.yaml").is_file()


def test_kdc_recipes_copy_suggests_a_close_name(in_tmp, kdc):
    result = kdc("recipes", "copy", "quikstart")
    kdc.assert_clean_exit(result, 2)
    assert "did you mean 'quickstart'" in kdc.flat(result)
    assert not list(in_tmp.iterdir())


def test_a_shipped_recipe_path_that_is_not_here_points_at_recipes_copy(in_tmp, kdc):
    result = kdc("distill", "recipes/quickstart.yaml")
    kdc.assert_clean_exit(result, 2)
    assert "kdc recipes copy quickstart" in kdc.flat(result)


def test_help_examples_name_no_file_a_user_does_not_have(kdc):
    for command in (
        [],
        ["run"],
        ["train-teacher"],
        ["train-student"],
        ["distill"],
        ["prune"],
        ["validate"],
        ["report"],
    ):
        result = kdc(*command, "--help")
        assert result.exit_code == 0, result.output
        assert "recipes/" not in result.output, (command, result.output)
    assert "kdc recipes" in kdc("--help").output
